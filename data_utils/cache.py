"""Decode a dataset once into a uint8 array on disk; every later run and trial just loads it.

The cache is keyed by the sha256 of every file's bytes, the image size and the resize mode, so
renaming files reuses it and changing one pixel rebuilds it. It lives outside the data folder
(default ~/.cache/ctscan, or $CTSCAN_CACHE_DIR), which is never written to; on a cluster it may be
a folder every node mounts or a bucket (s3://..., the run's storage).

An entry is built in shards of about SHARD_SLICES slices, each decoded by whoever runs it: this
process's threads, or one Ray task per shard on any core of a cluster (`ctscan tune`). A shard is
written to the cache location as a file of its pixel rows and a small .npz manifest (hashes and
per-file metadata) that commits it, so an interrupted build keeps the shards it finished. A small
.npz of the whole entry then commits the entry. In a folder the shards are joined into the
entry's one .npy and removed; in a bucket they stay, and each node joins them into its own copy
the first time a process there reads the pixels (CachedPixels). Either way the pixels are
memory-mapped: trials on a node share them through the page cache, no process holds more of
them than it reads, and only the small CachedPixels travels between processes.

File digests are remembered per data folder by (path, size, mtime_ns), so an unchanged dataset
is not read again just to be hashed.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_utils import runfolder
from data_utils.decode import RESIZE_MODES, Decoded, decode_failure
from data_utils.files import atomic_write
from data_utils.identity import fingerprint, load_key, pseudonym
from data_utils.sources import DataError, Sample, Skipped, discover
from data_utils.volumes import DEFAULT_WINDOW, decode_frames, slice_at

CACHE_FORMAT = 6  # bump when decoding changes what pixels a file yields, or the cache's layout
# Slices a shard holds: at most SHARD_SLICES (one Ray task's work, about 3 core-seconds of 512-px
# PNGs, and 50 MB of pixels at 224 px; 421 shards for COVIDx CT's 431k slices), and fewer on a
# smaller set, down to MIN_SHARD_SLICES, so that it still has SHARDS_WANTED shards for a
# cluster's cores to share. It depends on the data alone: whoever decodes, the shards are alike.
SHARD_SLICES = 1024
MIN_SHARD_SLICES = 64
SHARDS_WANTED = 64
SHARDS = "shards"  # the cache location's folder of shards
PIXELS = ".u8"  # a shard's pixels: its rows' bytes, nothing else (its manifest says how many)
COPY_BUFFER = 8 << 20
CLUSTER_CACHE = "ctscan-cache"  # a cluster's cache, in the storage path its nodes all reach
# How long after its last write a file's (size, mtime_ns) is trusted to stand for its content:
# within the filesystem's timestamp granularity (2 s on FAT) a write may leave mtime unchanged.
UNSETTLED_MTIME_NS = 2_000_000_000
PHASH_SIZE = 16  # 256-bit pHash: the 64-bit default cannot tell two patients' CT slices apart


class CacheError(DataError):
    """The cache location lost part of an entry (a shard deleted while it was read)."""


@dataclass(frozen=True)
class ShardJob:
    """One shard to decode: names only, so it travels cheaply to whichever process builds it."""

    location: str  # the cache location: a folder or a bucket URI
    name: str  # the shard's files are SHARDS/{name}.u8 and .npz; the name is its content's hash
    files: tuple[tuple[str, str, int], ...]  # (sha256, path, slices its header promises), in order
    image_size: int
    resize: str
    window: tuple[float, float]


# Runs shards (build_shard), calling advance(slices) as each file or shard is done, and returns
# their manifests in the order given: decode_in_threads here, or a cluster's (tuning.cluster).
ShardRunner = Callable[[list[ShardJob], Callable[[int], None]], list[dict]]


@dataclass(frozen=True)
class CachedPixels:
    """Where a cache entry's pixel rows are: small, so it goes to every trial in place of them.

    `open()` memory-maps this node's copy: the entry's file in a cache folder, or, for a bucket,
    a file in this node's cache folder joined from the shards the first time a process on the
    node asks (one process fetches, the others wait for it)."""

    location: str
    stem: str
    shards: tuple[tuple[str, int], ...]  # (name, rows) in row order
    image_size: int

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.shards)

    @property
    def nbytes(self) -> int:
        return self.rows * self.image_size**2

    def local_path(self) -> Path:
        # Named by the shards too: a build that a transient failure left uncommitted has other
        # rows under the same entry name, and a node must not keep reading its copy.
        content = _digest(json.dumps(self.shards))[:8]
        return _node_dir(self.location) / f"{self.stem}-{content}.npy"

    def available(self) -> bool:
        """Whether open() can succeed without decoding: a folder's entry keeps only its file."""
        return runfolder.is_uri(self.location) or self.local_path().exists()

    def fetch(self) -> Path:
        """This node's copy of the pixels, joined from the shards if it is not there yet."""
        path = self.local_path()
        if path.exists():
            return path
        with _locked(path.parent / f".{path.stem}.lock"):
            if not path.exists():
                self._join(path)
        return path

    def open(self) -> np.ndarray:
        """uint8 [rows, S, S], memory-mapped copy-on-write: writes stay in this process."""
        return np.load(self.fetch(), mmap_mode="c")

    def _join(self, path: Path) -> None:
        size = self.image_size
        with atomic_write(path) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (self.rows, size, size)})
            for name, rows in self.shards:
                where = runfolder.join(self.location, SHARDS, f"{name}{PIXELS}")
                start = f.tell()
                try:
                    if runfolder.is_uri(where):
                        with runfolder.input_stream(where) as shard:
                            shutil.copyfileobj(shard, f, COPY_BUFFER)
                    else:
                        _copy_file(Path(where), f)
                except FileNotFoundError as e:
                    raise CacheError(f"{where}: a shard of the cache is not there (deleted "
                                     "while it was read, or a cache folder this node does not "
                                     "see: on a cluster give a bucket or a folder every node "
                                     "mounts); run again to rebuild it") from e
                if f.tell() - start != rows * size * size:
                    raise CacheError(f"{where}: holds {f.tell() - start} bytes, not the {rows} "
                                     f"rows of {size} x {size} its entry lists; run again to "
                                     "rebuild it")


@dataclass
class CTDataset:
    """Every readable file of a dataset, decoded. Row i of each array/list is one file."""

    root: Path
    class_names: tuple[str, str]  # (negative, positive); label 1 = class_names[1]
    pixels: CachedPixels  # where the cache's rows are, on any node
    rows: np.ndarray  # int64 [N]: each row's row in the cache (byte-identical files share one)
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

    @functools.cached_property
    def images(self) -> np.ndarray:
        """uint8 [N, S, S]: the cache's memory map itself when its rows are the dataset's in
        order (on the build and after, unless files were renamed or two are byte-identical),
        else a copy in memory."""
        cached = self.pixels.open()
        if np.array_equal(self.rows, np.arange(len(cached))):
            return cached
        return cached[self.rows]

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
    decode: ShardRunner | None = None,
) -> CTDataset:
    """Discover, hash and (once per content/size/mode/window) decode a dataset; see the module
    doc. `cache_dir` is a folder or a bucket URI; `identity_key` makes the pseudonyms (default:
    this machine's, data_utils.identity); `decode` runs the shards to build (decode_in_threads
    by default)."""
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if image_size < 8:
        raise DataError(f"image size must be at least 8 pixels, got {image_size}")
    location = str(cache_dir) if cache_dir is not None else str(default_cache_dir())
    local = _node_dir(location)
    key = identity_key or load_key()
    source = discover(data, positive_class, slices, key=key)
    digests, skipped = _hash_files(source.samples, source.root, local, key, progress)
    frames = {digests[s.path]: s.frames for s in source.samples if s.path in digests}
    entries, pixels, phashes = _load_or_build(
        frames, digests, image_size, resize, window, location, progress, decode
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
        pixels=pixels,
        rows=np.array(rows, np.int64),
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
        cache_dir=local,
        window=tuple(window),
        slices=slices,
        series_slices=source.series_slices,
        key_fingerprint=fingerprint(key) if any(s.id_kind for s in kept) else None,
    )


def _hash_files(
    samples: list[Sample], root: Path, local: Path, key: bytes, progress: bool
) -> tuple[dict[Path, str], list[Skipped]]:
    """sha256 of every readable file, reusing the digest of a file whose (path, size, mtime_ns)
    has not changed since an earlier run hashed it. The index names files by pseudonym: a PACS
    export's paths hold patient IDs."""
    index_file = local / "file-hashes" / f"{hashlib.sha256(bytes(root)).hexdigest()[:20]}.json"
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
    location: str,
    progress: bool,
    decode: ShardRunner | None,
) -> tuple[dict[str, dict], CachedPixels, np.ndarray]:
    """Return {sha256: {"rows", "mode", "size", "bits", "peak"} | {"error"}}, where the pixels
    are, and the hash array. "rows" holds, per slice of the file, its row or why it is not usable.

    `frames` names each digest once, with how many slices its file holds; readable slices get
    rows in that order, so when it is the dataset's order the pixel array needs no reordering.
    Missing shards are decoded by `decode` (decode_in_threads by default; a Ray cluster's cores
    in `ctscan tune`), which must give the same rows whoever runs it.

    A failure that another run may not repeat (out of memory, an OS read error) is reported like
    any other but keeps the entry (and its shard) from being committed, so the next run decodes
    those files again.
    """
    order = list(frames)
    spec = f"{CACHE_FORMAT}|{image_size}|{resize}|{window[0]:g},{window[1]:g}|"
    stem = f"{image_size}px-{resize}-{_digest(spec + ','.join(sorted(order)))}"
    meta_file = runfolder.join(location, f"{stem}.npz")
    local = _node_dir(location)
    # One build of an entry at a time on a node: a second process waits, then loads it.
    with _locked(local / f".{stem}.lock"):
        saved = runfolder.read_bytes(meta_file)
        if saved is not None:
            with np.load(io.BytesIO(saved), allow_pickle=False) as npz:
                entries, phash = json.loads(str(npz["entries"])), npz["phash"]
                shards = tuple((str(n), int(r)) for n, r in json.loads(str(npz["shards"])))
            pixels = CachedPixels(location, stem, shards, image_size)
            # A shard is named by the entry, never by a path: a bucket may be shared.
            named = all(re.fullmatch(r"\w[\w.-]*", name) for name, _ in shards)
            if named and pixels.available():
                return entries, pixels, phash

        path_of = {digest: str(path) for path, digest in digests.items()}
        jobs = [ShardJob(location, f"{image_size}px-{resize}-{_digest(spec + ','.join(chunk))}",
                         tuple((d, path_of[d], frames[d]) for d in chunk),
                         image_size, resize, tuple(window))
                for chunk in _chunks(order, frames)]
        manifests = {job.name: _read_manifest(location, job.name) for job in jobs}
        missing = [job for job in jobs if manifests[job.name] is None]
        total = sum(frames.values())  # what the headers promise; a file may hold fewer
        done = total - sum(n for job in missing for *_, n in job.files)
        with tqdm(total=total, initial=done, desc="decoding", unit="img",
                  disable=not progress) as bar:
            built = (decode or decode_in_threads)(missing, bar.update)
        manifests.update(zip((job.name for job in missing), built, strict=True))

        entries, hashes, shards, start = {}, [], [], 0
        for job in jobs:
            manifest = manifests[job.name]
            for digest, entry in manifest["entries"].items():
                if "rows" in entry:  # shard rows -> the entry's rows
                    entry = {**entry, "rows": [r + start if isinstance(r, int) else r
                                               for r in entry["rows"]]}
                entries[digest] = entry
            hashes.append(manifest["phash"])
            shards.append((job.name, len(manifest["phash"])))
            start += len(manifest["phash"])
        phash = np.concatenate(hashes) if hashes else np.zeros((0, 32), np.uint8)
        pixels = CachedPixels(location, stem, tuple(shards), image_size)
        pixels.fetch()
        if any(m["transient"] for m in manifests.values()):
            return entries, pixels, phash
        buffer = io.BytesIO()
        np.savez(buffer, phash=phash, entries=np.array(json.dumps(entries)),
                 shards=np.array(json.dumps(shards)))
        runfolder.write_bytes(meta_file, buffer.getvalue())
        if not runfolder.is_uri(location):
            # A folder's entry is its one pixel file: the shards would only double the disk
            # used, as would the pixels of an uncommitted build. A bucket keeps its shards: each
            # node fetches its copy from them.
            for name, _ in shards:
                for suffix in (PIXELS, ".npz"):
                    (local / SHARDS / f"{name}{suffix}").unlink(missing_ok=True)
            for other in local.glob(f"{stem}-*.npy"):
                if other != pixels.local_path():
                    other.unlink(missing_ok=True)
        return entries, pixels, phash


def decode_in_threads(jobs: list[ShardJob], advance: Callable[[int], None]) -> list[dict]:
    """Shards one after another, each in a pool of this machine's cores: libpng and Pillow
    release the GIL while inflating and resizing, so threads use every core. Worker processes
    measured ~10% faster on 2 cores, but a process pool re-runs the caller's main module, which
    breaks any script that calls this without a __main__ guard; Ray's workers have no such
    problem (tuning.cluster.decode_on_cluster)."""
    return [build_shard(job, os.cpu_count() or 1, advance) for job in jobs]


def build_shard(job: ShardJob, threads: int = 1,
                advance: Callable[[int], None] | None = None) -> dict:
    """Decode a shard's files in `threads` threads and write its pixels and then, unless a
    failure may not repeat (transient_failure), its manifest, which commits it. Returns the
    manifest: {"entries": {sha256: as _load_or_build's, rows counted in the shard}, "phash",
    "transient"}."""
    decode = functools.partial(_decode_file, image_size=job.image_size, resize=job.resize,
                               window=job.window)
    hashes = np.empty((sum(n for *_, n in job.files), 32), np.uint8)
    entries, rows, transient = {}, 0, False
    # Each row is written as it is decoded, so a shard's pixels are never all in memory. One
    # thread decodes inline: handing each file to a pool thread would cost more than it saves.
    with (runfolder.output_stream(runfolder.join(job.location, SHARDS, f"{job.name}{PIXELS}"))
          as out, ThreadPoolExecutor(max_workers=threads) as pool):
        paths = [Path(path) for _, path, _ in job.files]
        results = pool.map(decode, paths) if threads > 1 else map(decode, paths)
        for (digest, _, frames), result in zip(job.files, results, strict=True):
            if advance is not None:
                advance(frames)
            if "error" in result:
                entries[digest] = {"error": result["error"]}
                transient |= "transient" in result
                continue
            slice_rows = []
            for decoded in result.pop("slices")[:frames]:
                if isinstance(decoded, str):  # an unreadable slice gets no row
                    slice_rows.append(decoded)
                    continue
                out.write(decoded[0].data)
                hashes[rows] = decoded[1]
                slice_rows.append(rows)
                rows += 1
            entries[digest] = {"rows": slice_rows, **result}
    manifest = {"entries": entries, "phash": hashes[:rows], "transient": transient}
    if not transient:
        buffer = io.BytesIO()
        np.savez(buffer, phash=hashes[:rows], entries=np.array(json.dumps(entries)))
        runfolder.write_bytes(runfolder.join(job.location, SHARDS, f"{job.name}.npz"),
                              buffer.getbuffer())
    return manifest


def _read_manifest(location: str, name: str) -> dict | None:
    data = runfolder.read_bytes(runfolder.join(location, SHARDS, f"{name}.npz"))
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {"entries": json.loads(str(npz["entries"])), "phash": npz["phash"],
                "transient": False}


def _copy_file(source: Path, out: IO[bytes]) -> None:
    """Append `source` to `out` inside the kernel (copy_file_range: no pass through this
    process's memory)."""
    out.flush()
    with open(source, "rb") as f:
        left = os.fstat(f.fileno()).st_size
        while left > 0:
            copied = os.copy_file_range(f.fileno(), out.fileno(), left)
            if copied == 0:
                break
            left -= copied
    out.seek(0, os.SEEK_END)


def _node_dir(location: str) -> Path:
    """Where this node keeps what it derives from the data: the cache folder itself, or this
    node's default cache folder when the cache is in a bucket."""
    return default_cache_dir() if runfolder.is_uri(location) else Path(location)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` among this node's processes (flock: released if one dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
    """Files in runs of about a shard's slices (a volume counts its slices): the shards. No
    files, no shard: a shard without files would only be written and joined for nothing."""
    total = sum(frames.values())
    limit = min(SHARD_SLICES, max(MIN_SHARD_SLICES, -(-total // SHARDS_WANTED)))
    chunks, size = [], limit
    for digest in order:
        if size >= limit:
            chunks.append([])
            size = 0
        chunks[-1].append(digest)
        size += frames[digest]
    return chunks


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
