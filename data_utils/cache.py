"""Decode a dataset once into a uint8 array on disk; every later run and trial just loads it.

The cache is keyed by the sha256 of every file's bytes, the image size and the resize mode, so
renaming files reuses it and changing one pixel rebuilds it. It lives outside the data folder
(default ~/.cache/ctscan, or $CTSCAN_CACHE_DIR), which is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_utils.decode import RESIZE_MODES, decode_image
from data_utils.files import atomic_write
from data_utils.sources import DataError, Sample, discover

CACHE_FORMAT = 2  # bump when decoding changes what pixels a file yields
PHASH_SIZE = 16  # 256-bit pHash: the 64-bit default cannot tell two patients' CT slices apart


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class CTDataset:
    """Every readable file of a dataset, decoded. Row i of each array/list is one file."""

    root: Path
    class_names: tuple[str, str]  # (negative, positive); label 1 = class_names[1]
    images: np.ndarray  # uint8 [N, S, S]
    phash: np.ndarray  # uint8 [N, 32]: packed perceptual hash, for near-duplicate grouping
    labels: np.ndarray  # int64 [N]
    paths: list[str]  # relative to root
    sha256: list[str]
    groups: list[str | None]  # manifest group (patient id), None for class folders
    modes: list[str]  # image mode as stored, e.g. "RGB"; the pixels never depend on it
    bits: list[int | str]  # the scale each file was read with: Decoded.bits (8, 12, 16, "HU"...)
    sizes: list[tuple[int, int]]  # (width, height) as stored
    skipped: list[Skipped]
    image_size: int
    resize: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def positive_class(self) -> str:
        return self.class_names[1]


def default_cache_dir() -> Path:
    if "CTSCAN_CACHE_DIR" in os.environ:
        return Path(os.environ["CTSCAN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctscan"


def load_dataset(
    data: Path,
    image_size: int = 224,
    resize: str = "pad",
    cache_dir: Path | None = None,
    positive_class: str | None = None,
    progress: bool = True,
) -> CTDataset:
    """Discover, hash and (once per content/size/mode) decode a dataset; see the module doc."""
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if image_size < 8:
        raise DataError(f"image size must be at least 8 pixels, got {image_size}")
    source = discover(data, positive_class)
    digests, skipped = _hash_files(source.samples, progress)
    entries, pixels, phashes = _load_or_build(
        sorted(set(digests.values())), digests, image_size, resize, cache_dir, progress
    )

    rows, kept, first_label = [], [], {}
    for sample in source.samples:
        digest = digests.get(sample.path)
        if digest is None:
            continue
        entry = entries[digest]
        if "error" in entry:
            skipped.append(Skipped(sample.rel, entry["error"]))
            continue
        other = first_label.setdefault(digest, sample)
        if other.class_name != sample.class_name:
            raise DataError(
                f"{source.root}: {other.rel} and {sample.rel} are byte-identical but labelled "
                f"{other.class_name!r} and {sample.class_name!r}; fix the labels"
            )
        rows.append(entry["row"])
        kept.append(sample)
    skipped.sort(key=lambda s: s.path)
    for name in source.class_names:
        if not any(s.class_name == name for s in kept):
            raise DataError(f"{source.root}: class {name!r} has no readable images")

    return CTDataset(
        root=source.root,
        class_names=source.class_names,
        images=pixels[rows],
        phash=phashes[rows],
        labels=np.array([source.label(s) for s in kept], np.int64),
        paths=[s.rel for s in kept],
        sha256=[digests[s.path] for s in kept],
        groups=[s.group for s in kept],
        modes=[entries[digests[s.path]]["mode"] for s in kept],
        bits=[entries[digests[s.path]]["bits"] for s in kept],
        sizes=[tuple(entries[digests[s.path]]["size"]) for s in kept],
        skipped=skipped,
        image_size=image_size,
        resize=resize,
    )


def _hash_files(samples: list[Sample], progress: bool) -> tuple[dict[Path, str], list[Skipped]]:
    digests, skipped = {}, []
    for s in tqdm(samples, desc="hashing", unit="file", disable=not progress, leave=False):
        try:
            digests[s.path] = hashlib.sha256(s.path.read_bytes()).hexdigest()
        except OSError as e:
            broken = s.path.is_symlink() and not s.path.exists()
            reason = f"broken symlink to {os.readlink(s.path)}" if broken else e.strerror or e
            skipped.append(Skipped(s.rel, f"cannot read: {reason}"))
    return digests, skipped


def _load_or_build(
    unique: list[str],
    digests: dict[Path, str],
    image_size: int,
    resize: str,
    cache_dir: Path | None,
    progress: bool,
) -> tuple[dict[str, dict], np.ndarray, np.ndarray]:
    """Return {sha256: {"row", "mode", "size", "bits"} | {"error"}}, and the pixel and hash arrays.

    A failure that another run may not repeat (out of memory, an OS read error) is reported like
    any other but keeps the whole cache from being written, so the next run decodes again.
    """
    key = hashlib.sha256(
        f"{CACHE_FORMAT}|{image_size}|{resize}|{','.join(unique)}".encode()
    ).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache_dir / f"{image_size}px-{resize}-{key[:20]}.npz"
    if cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as npz:
            return json.loads(str(npz["entries"])), npz["pixels"], npz["phash"]

    path_of = {digest: path for path, digest in digests.items()}

    def decode(digest: str) -> dict:
        try:
            decoded = decode_image(path_of[digest].read_bytes(), image_size, resize)
        except Exception as e:  # noqa: BLE001 - any failure to decode one file skips that file
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if transient_failure(e):
                return {"error": f"{reason} (not cached; tried again next run)", "transient": True}
            return {"error": reason}
        return {"pixels": decoded.pixels, "phash": perceptual_hash(decoded.pixels),
                "mode": decoded.mode, "size": [decoded.width, decoded.height],
                "bits": decoded.bits}

    # Pillow releases the GIL while inflating and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(tqdm(pool.map(decode, unique), total=len(unique), desc="decoding",
                            unit="img", disable=not progress))
    entries, planes, hashes = {}, [], []
    for digest, result in zip(unique, results, strict=True):
        if "error" in result:
            entries[digest] = {"error": result["error"]}
        else:
            entries[digest] = {"row": len(planes), "mode": result["mode"], "size": result["size"],
                               "bits": result["bits"]}
            planes.append(result["pixels"])
            hashes.append(result["phash"])
    pixels = np.stack(planes) if planes else np.zeros((0, image_size, image_size), np.uint8)
    phash = np.stack(hashes) if hashes else np.zeros((0, 32), np.uint8)
    if not any("transient" in result for result in results):
        with atomic_write(cache_file) as f:
            np.savez(f, pixels=pixels, phash=phash, entries=np.array(json.dumps(entries)))
    return entries, pixels, phash


def transient_failure(error: BaseException) -> bool:
    """Whether a failed decode may succeed next time, so must not be cached as unreadable.

    Pillow reports bad content as OSError without an errno; one with an errno came from the
    operating system (a flaky disk or network share, a file replaced while we read it).
    """
    if isinstance(error, OSError):
        return error.errno is not None
    return isinstance(error, MemoryError)


def perceptual_hash(pixels: np.ndarray) -> np.ndarray:
    """256-bit DCT hash of a decoded slice packed in 32 bytes; near-identical slices are close."""
    return np.packbits(imagehash.phash(Image.fromarray(pixels), hash_size=PHASH_SIZE).hash)
