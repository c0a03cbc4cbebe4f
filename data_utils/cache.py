"""Decode a dataset once into a uint8 array on disk; every later run and trial just loads it.

The cache is keyed by the sha256 of every file's bytes, the image size and the resize mode, so
renaming files reuses it and changing one pixel rebuilds it. It lives outside the data folder
(default ~/.cache/ctscan, or $CTSCAN_CACHE_DIR), which is never written to.

Each entry is a .npy of pixels, memory-mapped when loaded so that trials on one node share it
through the page cache and no process holds more of it than it reads, plus a small .npz of
hashes and per-file metadata that commits the entry. File digests are remembered per data folder
by (path, size, mtime_ns), so an unchanged dataset is not read again just to be hashed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_utils.decode import RESIZE_MODES, Decoded, decode_failure
from data_utils.files import atomic_write
from data_utils.identity import fingerprint, load_key, pseudonym
from data_utils.sources import DataError, Sample, Skipped, discover
from data_utils.volumes import DEFAULT_WINDOW, decode_frames, slice_at

CACHE_FORMAT = 5  # bump when decoding changes what pixels a file yields, or the cache's layout
DECODE_CHUNK = 1024  # slices decoded before their rows are written to the cache file
# How long after its last write a file's (size, mtime_ns) is trusted to stand for its content:
# within the filesystem's timestamp granularity (2 s on FAT) a write may leave mtime unchanged.
UNSETTLED_MTIME_NS = 2_000_000_000
PHASH_SIZE = 16  # 256-bit pHash: the 64-bit default cannot tell two patients' CT slices apart


@dataclass
class CTDataset:
    """Every readable file of a dataset, decoded. Row i of each array/list is one file."""

    root: Path
    class_names: tuple[str, str]  # (negative, positive); label 1 = class_names[1]
    images: np.ndarray  # uint8 [N, S, S]
    phash: np.ndarray  # uint8 [N, 32]: packed perceptual hash, for near-duplicate grouping
    labels: np.ndarray  # int64 [N]
    paths: list[str]  # Sample.rel: a 2-D image's path below root, a DICOM/NIfTI slice's stand-in
    sha256: list[str]  # of the file holding the slice
    frames: list[int]  # which slice of that file: (sha256, frame) names a slice's content
    groups: list[str | None]  # the patient's pseudonym; None where the data do not say
    id_kinds: list[str | None]  # Sample.id_kind: the strongest ID of each row
    series: list[str | None]  # pseudonyms of the DICOM series / NIfTI file; None for 2-D files
    studies: list[str | None]
    modes: list[str]  # image mode as stored, e.g. "RGB"; the pixels never depend on it
    bits: list[int | str]  # the scale each file was read with: Decoded.bits (8, 12, 16, "HU"...)
    peaks: list[int | None]  # Decoded.peak: None where not read as 16 bits, or cached before it
    sizes: list[tuple[int, int]]  # (width, height) as stored
    skipped: list[Skipped]
    image_size: int
    resize: str
    cache_dir: Path | None = None  # where results derived from the data may be kept
    window: tuple[float, float] = DEFAULT_WINDOW  # HU window of DICOM and NIfTI slices
    slices: str = "all"  # which slices of each series were kept (volumes.select_slices)
    series_slices: dict[str, int] = field(default_factory=dict)  # each series' slices, all
    # Of the key that made the pseudonyms, where the data have any (identity.fingerprint).
    key_fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def positive_class(self) -> str:
        return self.class_names[1]


def default_cache_dir() -> Path:
    """$CTSCAN_CACHE_DIR, else ctscan/ in the user's cache folder; an empty variable counts as
    unset (it would otherwise put the cache in the working folder)."""
    if os.environ.get("CTSCAN_CACHE_DIR"):
        return Path(os.environ["CTSCAN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctscan"


def load_dataset(
    data: Path,
    image_size: int = 224,
    resize: str = "pad",
    cache_dir: Path | None = None,
    positive_class: str | None = None,
    progress: bool = True,
    window: tuple[float, float] = DEFAULT_WINDOW,
    slices: str = "all",
    identity_key: bytes | None = None,
) -> CTDataset:
    """Discover, hash and (once per content/size/mode/window) decode a dataset; see the module
    doc. `identity_key` makes the pseudonyms (default: this machine's, data_utils.identity)."""
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if image_size < 8:
        raise DataError(f"image size must be at least 8 pixels, got {image_size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = identity_key or load_key()
    source = discover(data, positive_class, slices, key=key)
    digests, skipped = _hash_files(source.samples, source.root, cache_dir, key, progress)
    frames = {digests[s.path]: s.frames for s in source.samples if s.path in digests}
    entries, pixels, phashes = _load_or_build(
        frames, digests, image_size, resize, window, cache_dir, progress
    )

    rows, kept, first_label = [], [], {}
    skipped += source.skipped
    for sample in source.samples:
        digest = digests.get(sample.path)
        if digest is None:
            continue
        entry = entries[digest]
        row = entry["error"] if "error" in entry else slice_at(entry["rows"], sample.frame)
        if isinstance(row, str):
            skipped.append(Skipped(sample.rel, row))
            continue
        other = first_label.setdefault(digest, sample)
        if other.class_name != sample.class_name:
            raise DataError(
                f"{source.root}: {other.rel} and {sample.rel} are byte-identical but labelled "
                f"{other.class_name!r} and {sample.class_name!r}; fix the labels"
            )
        rows.append(row)
        kept.append(sample)
    skipped.sort(key=lambda s: s.path)
    for name in source.class_names:
        if not any(s.class_name == name for s in kept):
            raise DataError(f"{source.root}: class {name!r} has no readable images")

    return CTDataset(
        root=source.root,
        class_names=source.class_names,
        # The cache's rows, not a copy in memory, when they are the dataset's rows in order: so
        # on the build and after, unless files were renamed or two of them are byte-identical.
        images=pixels if rows == list(range(len(pixels))) else pixels[rows],
        phash=phashes[rows],
        labels=np.array([source.label(s) for s in kept], np.int64),
        paths=[s.rel for s in kept],
        sha256=[digests[s.path] for s in kept],
        frames=[s.frame for s in kept],
        groups=[s.group for s in kept],
        id_kinds=[s.id_kind for s in kept],
        series=[s.series for s in kept],
        studies=[s.study for s in kept],
        modes=[entries[digests[s.path]]["mode"] for s in kept],
        bits=[entries[digests[s.path]]["bits"] for s in kept],
        peaks=[entries[digests[s.path]].get("peak") for s in kept],
        sizes=[tuple(entries[digests[s.path]]["size"]) for s in kept],
        skipped=skipped,
        image_size=image_size,
        resize=resize,
        cache_dir=cache_dir,
        window=tuple(window),
        slices=slices,
        series_slices=source.series_slices,
        key_fingerprint=fingerprint(key) if any(s.id_kind for s in kept) else None,
    )


def _hash_files(
    samples: list[Sample], root: Path, cache_dir: Path, key: bytes, progress: bool
) -> tuple[dict[Path, str], list[Skipped]]:
    """sha256 of every readable file, reusing the digest of a file whose (path, size, mtime_ns)
    has not changed since an earlier run hashed it. The index names files by pseudonym: a PACS
    export's paths hold patient IDs."""
    index_file = cache_dir / "file-hashes" / f"{hashlib.sha256(bytes(root)).hexdigest()[:20]}.json"
    try:
        known = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    digests, skipped, index = {}, [], {}
    files = list({s.path: s for s in samples}.values())  # a volume's slices share its file
    for s in tqdm(files, desc="hashing", unit="file", disable=not progress, leave=False):
        name = pseudonym(str(s.path), key)
        try:
            stat = s.path.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
            entry = known.get(name)
            if entry is not None and entry[:2] == stamp:
                digests[s.path] = entry[2]
            else:
                digests[s.path] = hashlib.sha256(s.path.read_bytes()).hexdigest()
        except OSError as e:
            broken = s.path.is_symlink() and not s.path.exists()
            # Where a link points is a path too: said for 2-D images only (data_utils.identity).
            target = f" to {os.readlink(s.path)}" if s.series is None else ""
            reason = f"broken symlink{target}" if broken else e.strerror or e
            skipped.append(Skipped(s.rel, f"cannot read: {reason}"))
            continue
        # A file written within the filesystem's timestamp granularity of now could change again
        # without its mtime moving, so it is hashed again next run rather than trusted.
        if time.time_ns() - stat.st_mtime_ns > UNSETTLED_MTIME_NS:
            index[name] = [*stamp, digests[s.path]]
    if index != known:
        with atomic_write(index_file, "w") as f:
            json.dump(index, f)
    return digests, skipped


def _load_or_build(
    frames: dict[str, int],
    digests: dict[Path, str],
    image_size: int,
    resize: str,
    window: tuple[float, float],
    cache_dir: Path,
    progress: bool,
) -> tuple[dict[str, dict], np.ndarray, np.ndarray]:
    """Return {sha256: {"rows", "mode", "size", "bits", "peak"} | {"error"}}, and the pixel and
    hash arrays. "rows" holds, per slice of the file, its row or why it is not usable.

    `frames` names each digest once, with how many slices its file holds; readable slices get
    rows in that order, so when it is the dataset's order the pixel array needs no reordering.
    The pixels are a copy-on-write memory map of the cache file: pages are read on first use and
    shared with every process on the node through the page cache, and writes stay private.

    A failure that another run may not repeat (out of memory, an OS read error) is reported like
    any other but keeps the cache entry from being committed, so the next run decodes again.
    """
    order = list(frames)
    key = hashlib.sha256(
        f"{CACHE_FORMAT}|{image_size}|{resize}|{window[0]:g},{window[1]:g}|"
        f"{','.join(sorted(order))}".encode()
    ).hexdigest()
    meta_file = cache_dir / f"{image_size}px-{resize}-{key[:20]}.npz"
    try:
        with np.load(meta_file, allow_pickle=False) as npz:
            entries, phash = json.loads(str(npz["entries"])), npz["phash"]
            pixels_file = cache_dir / str(npz["pixels"])
        return entries, _open_pixels(pixels_file, len(phash)), phash
    except FileNotFoundError:
        pass

    path_of = {digest: path for path, digest in digests.items()}
    decode = functools.partial(_decode_file, image_size=image_size, resize=resize, window=window)

    # Each build gets its own pixel file, named in the metadata that commits it, so two runs
    # building one entry at once never pair one's metadata with the other's rows.
    pixels_file = cache_dir / f"{meta_file.stem}-{secrets.token_hex(4)}.npy"
    total = sum(frames.values())  # what the headers promise; a file may hold fewer
    shape = (total, image_size, image_size)
    entries, hashes, rows, transient = {}, np.zeros((total, 32), np.uint8), 0, False
    with atomic_write(pixels_file) as f, tqdm(total=total, desc="decoding", unit="img",
                                              disable=not progress) as bar:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        data_start = f.tell()
        # libpng and Pillow release the GIL while inflating and resizing, so threads use every
        # core. Worker processes measured ~10% faster on 2 cores, but a process pool re-runs the
        # caller's main module, which breaks any script that calls this without a __main__
        # guard. Rows are written as each chunk decodes, with plain writes rather than through a
        # memory map, so this process holds one chunk of pixels, never the array.
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            for chunk in _chunks(order, frames):
                paths = [path_of[digest] for digest in chunk]
                for digest, result in zip(chunk, pool.map(decode, paths), strict=True):
                    bar.update(frames[digest])
                    if "error" in result:
                        entries[digest] = {"error": result["error"]}
                        transient |= "transient" in result
                        continue
                    slice_rows = []
                    for decoded in result.pop("slices")[:frames[digest]]:
                        if isinstance(decoded, str):
                            slice_rows.append(decoded)
                            continue
                        f.write(decoded[0].tobytes())
                        hashes[rows] = decoded[1]
                        slice_rows.append(rows)
                        rows += 1
                    entries[digest] = {"rows": slice_rows, **result}
        # Unreadable slices get no row: the array's last total - rows rows are never read.
        f.truncate(data_start + int(np.prod(shape)))
    pixels = _open_pixels(pixels_file, rows)
    if transient:
        # The map stays readable after the unlink; the disk space is freed when it is closed.
        pixels_file.unlink()
        return entries, pixels, hashes[:rows]
    with atomic_write(meta_file) as f:
        np.savez(f, phash=hashes[:rows], entries=np.array(json.dumps(entries)),
                 pixels=np.array(pixels_file.name))
    for other in cache_dir.glob(f"{meta_file.stem}-*.npy"):
        # Pixels of a concurrent build of this entry. Should its metadata land after ours, the
        # next load finds its pixels gone and builds again: a wasted decode, never wrong rows.
        if other != pixels_file:
            other.unlink(missing_ok=True)
    return entries, pixels, hashes[:rows]


def _decode_file(path: Path, image_size: int, resize: str, window: tuple[float, float]) -> dict:
    """{"slices": [(pixels, perceptual hash) | why the slice is unusable], "mode", "size", "bits",
    "peak"} of one file, or {"error"[, "transient"]}: what _load_or_build records of it."""
    try:
        slices = decode_frames(path.name, path.read_bytes(), image_size, resize, window)
    except Exception as e:  # noqa: BLE001 - any failure to decode one file skips that file
        reason = decode_failure(e)
        if transient_failure(e):
            return {"error": f"{reason} (not cached; tried again next run)", "transient": True}
        return {"error": reason}
    first = next((d for d in slices if isinstance(d, Decoded)), None)
    if first is None and len(slices) == 1:
        return {"error": slices[0]}
    # Hashed here, in the pool's threads, rather than in the loop that writes the rows.
    slices = [d if isinstance(d, str) else (d.pixels, perceptual_hash(d.pixels)) for d in slices]
    return {"slices": slices, "mode": first and first.mode,
            "size": first and [first.width, first.height], "bits": first and first.bits,
            "peak": first and first.peak}


def _chunks(order: list[str], frames: dict[str, int]) -> list[list[str]]:
    """Files in runs of about DECODE_CHUNK slices (a volume counts its slices), so the decoded
    pixels held at once stay bounded whatever the files hold."""
    chunks, size = [[]], 0
    for digest in order:
        if size >= DECODE_CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(digest)
        size += frames[digest]
    return chunks


def _open_pixels(path: Path, rows: int) -> np.ndarray:
    return np.load(path, mmap_mode="c")[:rows]


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
