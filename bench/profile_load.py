"""Where ctscan's per-file time goes when it builds the cache: a profile and a tight loop per cost.

    python bench/profile_load.py [--files 2000] [--variant 8]

Runs on bench/scale.py's 512-px slices (generated there first). Two views of the same files:
1. cProfile of load_dataset with a fresh cache, single-threaded (the decode pool replaced by an
   inline map, so the profiler sees every call): the top functions by own time, in ms per file;
   then, on that cache, of the split stage and of the doctor, which run in one thread anyway.
   The profiler inflates calls to small Python functions, so:
2. each per-file cost on its own in a tight loop, without the profiler, in ms per file: what
   the cache build does for every file, step by step (the decoder's steps included, to compare).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scale  # noqa: E402  (bench/scale.py: the slices and their manifests)


class InlineExecutor:
    """ThreadPoolExecutor's map on the calling thread, so cProfile sees the decode work."""

    def __init__(self, max_workers: int | None = None) -> None:
        pass

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map(self, fn: Callable, items: list) -> list:
        return [fn(item) for item in items]


# Functions whose cumulative time is worth seeing on its own (the profile's own-time list
# splits them into the builtins they call).
WATCHED = ("load_dataset", "discover", "_read_manifest", "_expand", "_hash_files",
           "_load_or_build", "decode", "decode_frames", "decode_image", "_refuse_constant",
           "_to_gray", "exif_transpose", "fit_square", "perceptual_hash", "phash", "pseudonym",
           "read_bytes", "stat", "resolve", "savez", "dumps", "dump", "write", "tobytes")


def print_profile(profiler: cProfile.Profile, n: int, top: int) -> None:
    """The top functions by own time, then the WATCHED ones by cumulative time, per file."""
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(f"{'own ms/file':>11} {'cum ms/file':>11} {'calls/file':>10}  function")
    for (file, line, name), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"{own / n * 1e3:11.3f} {cumulative / n * 1e3:11.3f} {calls / n:10.1f}  "
              f"{name} ({where})")
    print("selected functions, cumulative (ms per file):")
    watched = [(key, value) for key, value in stats.stats.items()
               if key[2] in WATCHED and value[3] / n * 1e3 > 0.005]
    for (file, line, name), (_, calls, _, cumulative, _) in sorted(
            watched, key=lambda kv: kv[1][3], reverse=True):
        print(f"  {cumulative / n * 1e3:8.3f}  {calls / n:5.1f} calls/file  "
              f"{name} ({Path(file).name}:{line})")


def profiled(work: Callable[[], object]) -> tuple[cProfile.Profile, float]:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    work()
    profiler.disable()
    return profiler, time.perf_counter() - start


def profile_stages(manifest: Path, n: int, top: int) -> None:
    """The cache build (inspect's load), then on that cache the split stage and the doctor."""
    import data_utils.cache as cache_module
    from data_utils.doctor import inspect_dataset
    from data_utils.split import split_dataset, write_split
    from data_utils.volumes import decode_frames

    cache_module.ThreadPoolExecutor = InlineExecutor
    # One-time costs (scipy's lazy imports on the first perceptual hash) are not per file.
    first = scale.read_manifest(manifest)[0]
    pixels = decode_frames(first.name, first.read_bytes(), scale.IMAGE_SIZE, "pad")[0].pixels
    cache_module.perceptual_hash(pixels)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)

        def load() -> cache_module.CTDataset:
            return cache_module.load_dataset(manifest, scale.IMAGE_SIZE, cache_dir=cache,
                                             progress=False)

        profiler, wall = profiled(load)
        print(f"\n1. cProfile of load_dataset on {n} files, fresh cache, one thread: "
              f"{wall:.1f} s ({wall / n * 1e3:.2f} ms per file, profiler overhead included)")
        print_profile(profiler, n, top)

        def split() -> None:
            ds = load()
            write_split(split_dataset(ds), ds, cache / "split.json")

        profiler, wall = profiled(split)
        print(f"\n2. cProfile of the split stage (cached load_dataset + split_dataset + "
              f"write_split): {wall:.2f} s ({wall / n * 1e3:.3f} ms per file)")
        print_profile(profiler, n, top // 2)
        ds = load()
        profiler, wall = profiled(lambda: inspect_dataset(ds))
        print(f"\n3. cProfile of the doctor (inspect_dataset on the loaded dataset): "
              f"{wall:.2f} s ({wall / n * 1e3:.3f} ms per file)")
        print_profile(profiler, n, top // 2)


def tight_loops(files: list[Path], repeat: int) -> None:
    """Each per-file step of the cache build on its own, in ms per file (one thread)."""
    from PIL import Image, ImageOps
    from tqdm import tqdm

    from data_utils.cache import perceptual_hash
    from data_utils.decode import _depth_of, _refuse_constant, _to_gray, decode_image, fit_square
    from data_utils.volumes import decode_frames, pseudonym, volume_kind

    key = os.urandom(32)
    blobs = [path.read_bytes() for path in files]
    decoded = [decode_image(data, scale.IMAGE_SIZE).pixels for data in blobs]

    def each(work: Callable[[int], object]) -> float:
        for i in range(min(20, len(files))):
            work(i)
        start = time.perf_counter()
        for _ in range(repeat):
            for i in range(len(files)):
                work(i)
        return (time.perf_counter() - start) / (repeat * len(files)) * 1e3

    def opened(i: int) -> Image.Image:
        img = Image.open(io.BytesIO(blobs[i]))
        img.load()
        return img

    images = [opened(i) for i in range(len(files))]
    grays = [_to_gray(img, *_depth_of(img, blobs[i])) for i, img in enumerate(images)]
    sink = io.BytesIO()
    bar = tqdm(total=len(files) * (repeat + 1), file=io.StringIO(), mininterval=0.1)
    steps = {
        "stat (the digest index's stamp)": lambda i: files[i].stat(),
        "pseudonym: HMAC-SHA256 of the path": lambda i: pseudonym(str(files[i]), key),
        "Path.resolve (manifest row)": lambda i: files[i].resolve(),
        "volume_kind (name check)": lambda i: volume_kind(files[i]),
        "read_bytes (page cache)": lambda i: files[i].read_bytes(),
        "sha256 of the bytes + hexdigest": lambda i: hashlib.sha256(blobs[i]).hexdigest(),
        "decode_frames (the whole decode)": lambda i: decode_frames(
            files[i].name, blobs[i], scale.IMAGE_SIZE, "pad"),
        "  Image.open + load (inflate)": opened,
        "  getextrema (refuse constant)": lambda i: _refuse_constant(images[i]),
        "  bit depth + to 8-bit gray": lambda i: _to_gray(images[i], *_depth_of(images[i],
                                                                                 blobs[i])),
        "  exif_transpose": lambda i: ImageOps.exif_transpose(images[i]),
        "  fit_square: resize to 224 + pad": lambda i: fit_square(grays[i], scale.IMAGE_SIZE,
                                                                  "pad"),
        "perceptual_hash (imagehash, 224 px)": lambda i: perceptual_hash(decoded[i]),
        "write the row (tobytes + write)": lambda i: sink.write(decoded[i].tobytes()),
        "tqdm update (progress on)": lambda i: bar.update(1),
    }
    print(f"\n4. each step alone, tight loop over {len(files)} files x {repeat}, one thread "
          "(ms per file):")
    for name, work in steps.items():
        if name == "write the row (tobytes + write)":
            sink.seek(0)
        print(f"  {name:40} {each(work):7.3f}")
    sizes = np.array([len(b) for b in blobs])
    print(f"  (files: {sizes.mean() / 1024:.0f} KiB on average)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--variant", choices=list(scale.VARIANTS), default="8")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--loop-files", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", type=Path, help="where bench/scale.py keeps its slices")
    args = parser.parse_args()
    data = args.data or scale.default_data_dir()
    scale.ensure_data(data, args.files, [args.variant])
    rows = scale.manifest_rows(scale.patient_plan(), args.files)
    manifest = scale.write_manifest(data / args.variant, rows)
    files = scale.read_manifest(manifest)
    scale.warm_page_cache(files)
    print(f"{scale.VARIANTS[args.variant]}, {scale.SOURCE_SIZE} px sources, cached at "
          f"{scale.IMAGE_SIZE} px; load average {scale.load_average()}")
    profile_stages(manifest, len(files), args.top)
    loop_files = files[:: max(1, len(files) // args.loop_files)][: args.loop_files]
    tight_loops(loop_files, args.repeat)


if __name__ == "__main__":
    main()
