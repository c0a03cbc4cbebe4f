"""How the data path grows on 512-px slices: inspect -> split -> cache load, and what a file costs.

    python bench/scale.py [--sizes 2500 5000 10000 20000] [--variants 8 16] [--data DIR]
                          [--wait-quiet 0.6] [--generate-only]

The sources look like the data users grow into: COVIDx CT's slices are 512 x 512 PNGs, so this
bench draws the demo generator's CT-like patients (data_utils.demo) at 512 px, pads each slice
with air (0) to exactly 512 x 512, and writes two variants of the same pixels:
- "8": 8-bit grayscale PNGs, as COVIDx CT ships them;
- "16": 16-bit grayscale PNGs holding 12 significant bits, as CT scanners store them, with an
  sBIT chunk of 12 and the samples scaled to 16 bits the way the PNG spec says (left bit
  replication), so ctscan's decoder takes its sBIT path (shift right by 4, 0..4095 -> 0..255).
  The lowest 4 of the 12 bits are random, as CT noise is, so the files compress like real ones.
Both are saved at zlib level 1 (OpenCV's imwrite default), which draws 10k slices in minutes
rather than most of an hour; Pillow inflates these files about 25% slower than the same pixels
at level 6, so the decoder's share errs high, never low. Slices are generated once, untimed,
into DIR (default ~/.cache/ctscan-bench/ct512, outside the repository), patient by patient from
one fixed plan, so a larger size only draws the patients it adds and every size reads the same
files: size N is the first N/2 slices of each class.

Each size starts with a fresh, empty cache at the default training size (224 px, TrainConfig's
image_size), and each stage runs in its own process, as a user's commands and a search's trials
do. Every file is read once, untimed, before the stages, so all of them read through the page
cache: the bench measures CPU work, not the disk.
- inspect: load_dataset (sha256 every file, decode, perceptual hash, write the cache) + doctor;
- split: load_dataset (the cache and remembered digests exist now) + split_dataset + split.json;
- cache load: load_dataset + reading every pixel once, as a trial on the node would.
The near-duplicate search inside inspect is N^2 work (on a small constant), so it is timed on
its own and extrapolated with its own exponent; the 431k figure adds the top-level parts up.
Indented a second level are parts of a part, shown to see where time goes, not added again.

Per file, the question is how much of inspect is the decoder and how much is ctscan's own work.
ctscan hashes in one thread, then decodes in a pool of os.cpu_count() threads, so its cost is
given as core time: each phase's wall time x the threads it keeps busy, per file. Beside it,
right after each size's inspect and on its files (up to 1000, spread over them), the decoder
alone in a tight loop: Pillow's open + load + resize to 224 and libpng's decode (imagecodecs,
which ctscan uses for gray PNGs) + the same resize (both bare), and ctscan's own
decode_frames (read the bytes, decode, bit-depth rules, pad to 224) in one thread and in a pool
of as many threads as inspect uses (wall x threads / files, so both cores' contention is priced
in as in inspect's decode pass).
"Everything else" is inspect's core time minus the pooled decode_frames.

Peak RSS is each stage process's high-water mark (VmHWM) above what its imports already held,
compared with the size of the cached array. The load average is printed at start and end; with
--wait-quiet L the run first waits (up to 40 minutes) for the 1-minute load average to fall
below L, since a shared machine's other work inflates every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

import numpy as np

TARGET_SLICES = 431_000  # COVIDx CT-3
SOURCE_SIZE = 512  # COVIDx CT's slices
IMAGE_SIZE = 224  # tuning.config.TrainConfig.image_size: what ctscan caches for training
SIGNIFICANT_BITS = 12  # a CT scanner's samples, in the 16-bit variant
SEED = 0
COMPRESS_LEVEL = 1  # zlib level of the PNGs, as OpenCV's imwrite writes them by default
PLAN_SLICES_PER_CLASS = TARGET_SLICES // 2  # the patient plan every size takes a prefix of
VARIANTS = {"8": "8-bit PNG", "16": f"16-bit PNG, sBIT {SIGNIFICANT_BITS}"}
DECODER_FILES = 1000  # files the decoder alone is timed on
STAGES = ("inspect", "split", "cache load")
GOAL_EXPONENT, GOAL_MINUTES, GOAL_RSS_RATIO = 1.15, 10.0, 1.3
QUIET_POLL_S, QUIET_MAX_S = 30, 40 * 60


# --- the slices -----------------------------------------------------------------------------


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ctscan-bench" / f"ct{SOURCE_SIZE}"


def patient_plan() -> list[tuple[str, int, str, int]]:
    """(label, patient index, group, slices) of every patient, class by class, as the demo
    generator plans them: each size's slices are the first N/2 of each class in this order."""
    from data_utils import demo

    plan = []
    for class_idx, label in enumerate(demo.CLASSES):
        runs = demo._plan_runs(np.random.default_rng([SEED, class_idx]), PLAN_SLICES_PER_CLASS)
        digits = len(str(len(runs) - 1))
        plan += [(label, p, f"{demo._PREFIX[label]}-p{p:0{digits}d}", n)
                 for p, n in enumerate(runs)]
    return plan


def manifest_rows(plan: list[tuple[str, int, str, int]], n: int) -> list[tuple[str, str, str]]:
    """(path, label, group) of the first n/2 slices of each class."""
    rows: list[tuple[str, str, str]] = []
    taken: dict[str, int] = {}
    for label, _, group, n_slices in plan:
        for s in range(n_slices):
            if taken.get(label, 0) < n // 2:
                rows.append((f"{label}/{group}-s{s:02d}.png", label, group))
                taken[label] = taken.get(label, 0) + 1
    return rows


def to_16_bit(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8-bit pixels as 12-bit samples (random lowest 4 bits), scaled to 16 bits as the PNG spec
    says for sBIT 12: left bit replication, so shifting right by 4 gives the 12-bit value back."""
    spare = SIGNIFICANT_BITS - 8
    samples = (pixels.astype(np.uint16) << spare) | rng.integers(
        0, 1 << spare, pixels.shape, dtype=np.uint16)
    shift = 16 - SIGNIFICANT_BITS
    return (samples << shift) | (samples >> (SIGNIFICANT_BITS - shift))


def render_patient(job: tuple[Path, tuple[str, ...], int, tuple[str, int, str, int]]) -> int:
    """Draws one patient at 512 px and writes its slices in each variant; returns how many."""
    from PIL import Image, PngImagePlugin

    from data_utils import demo

    data, variants, class_idx, (label, p, group, n_slices) = job
    rng = np.random.default_rng([SEED, class_idx, p + 1])
    slices = demo._render_patient(rng, label == "COVID", n_slices, SOURCE_SIZE)
    noise = np.random.default_rng([SEED, class_idx, p + 1, SIGNIFICANT_BITS])
    sbit = PngImagePlugin.PngInfo()
    sbit.add(b"sBIT", bytes([SIGNIFICANT_BITS]))
    for s, sl in enumerate(slices):
        h, w = sl.image.shape  # each side in [0.8, 1] x 512: pad with air to 512 x 512
        pixels = np.zeros((SOURCE_SIZE, SOURCE_SIZE), np.uint8)
        top, left = (SOURCE_SIZE - h) // 2, (SOURCE_SIZE - w) // 2
        pixels[top : top + h, left : left + w] = sl.image
        wide = to_16_bit(pixels, noise)
        for variant in variants:
            path = data / variant / label / f"{group}-s{s:02d}.png"
            tmp = path.with_suffix(".tmp")
            if variant == "8":
                Image.fromarray(pixels).save(tmp, format="PNG", compress_level=COMPRESS_LEVEL)
            else:
                Image.fromarray(wide).save(tmp, format="PNG", compress_level=COMPRESS_LEVEL,
                                           pnginfo=sbit)
            os.replace(tmp, path)  # a file that exists is whole: an interrupted run resumes
    return n_slices


def ensure_data(data: Path, largest: int, variants: list[str]) -> tuple[float, int]:
    """Draws the patients the largest size needs that an earlier run has not; returns the
    seconds it took and how many slices it drew."""
    from data_utils import demo

    plan = patient_plan()
    wanted = {rel for rel, _, _ in manifest_rows(plan, largest)}
    jobs = []
    for patient in plan:
        label, _, group, n_slices = patient
        names = [f"{label}/{group}-s{s:02d}.png" for s in range(n_slices)]
        if not wanted.intersection(names):
            continue
        missing = tuple(v for v in variants if not all((data / v / n).exists() for n in names))
        if missing:
            jobs.append((data, missing, demo.CLASSES.index(label), patient))
    for variant in variants:
        for label in demo.CLASSES:
            (data / variant / label).mkdir(parents=True, exist_ok=True)
    if not jobs:
        return 0.0, 0
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        drawn = sum(pool.imap_unordered(render_patient, jobs))
    return time.perf_counter() - start, drawn


def write_manifest(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = root / f"subset-{len(rows)}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "group"))
        writer.writerows(rows)
    return path


def read_manifest(manifest: Path) -> list[Path]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return [manifest.parent / row["path"] for row in csv.DictReader(f)]


def warm_page_cache(files: list[Path]) -> None:
    for path in files:
        path.read_bytes()


# --- one stage, in its own process --------------------------------------------------------


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def timed(module: object, name: str, seconds: list[float]) -> None:
    """Replaces module.name by a wrapper that appends each call's wall time to `seconds`."""
    inner: Callable = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)


def measure_stage(stage: str, manifest: Path, cache: Path) -> dict:
    """Runs one stage in this process; returns its seconds (and its parts') and memory."""
    import data_utils.cache as cache_module
    import data_utils.split as split_module
    from data_utils.cache import load_dataset
    from data_utils.doctor import inspect_dataset
    from data_utils.split import split_dataset, write_split

    search, hashing, build = [], [], []
    timed(split_module, "cached_near_duplicate_pairs", search)
    timed(cache_module, "_hash_files", hashing)
    timed(cache_module, "_load_or_build", build)
    baseline_rss = rss_bytes("VmRSS")
    start = time.perf_counter()
    ds = load_dataset(manifest, IMAGE_SIZE, cache_dir=cache, progress=False)
    load = time.perf_counter() - start
    if stage == "inspect":
        inspect_dataset(ds)
    elif stage == "split":
        write_split(split_dataset(ds), ds, cache / "split.json")
    else:
        int(ds.images.max())  # every page of the cache, read through the page cache
    total = time.perf_counter() - start
    load_parts = {"    sha256 + stat every file": hashing[0],
                  "    decode + phash + write cache" if stage == "inspect"
                  else "    open the cache": build[0],
                  "    discover, rows, the rest": load - hashing[0] - build[0]}
    # Split groups by patient where the manifest names them, and searches no near-duplicates.
    searched = {"  near-duplicate search" if stage == "inspect"
                else "  near-duplicate pairs (cached)": sum(search)} if search else {}
    if stage == "inspect":
        parts = {"  hash + decode + write cache": load, **load_parts, **searched,
                 "  doctor, the rest": total - load - sum(search)}
    elif stage == "split":
        parts = {"  load (cached)": load, **load_parts, **searched,
                 "  deal, write split.json": total - load - sum(search)}
    else:
        parts = {}
    return {"n": len(ds), "seconds": {stage: total, **parts}, "array_bytes": ds.images.nbytes,
            "hash_seconds": hashing[0], "build_seconds": build[0], "load_seconds": load,
            "threads": os.cpu_count(),
            "rss_growth": rss_bytes("VmHWM") - baseline_rss, "baseline_rss": baseline_rss}


def measure_decoder(manifest: Path) -> dict:
    """The decoder alone on up to DECODER_FILES files spread over the manifest, in tight loops:
    ms per file of bare Pillow, of bare libpng (imagecodecs) with Pillow's resize, of ctscan's
    decode_frames in one thread, and of decode_frames in a pool of os.cpu_count() threads
    (wall x threads / files, as inspect's decode pass)."""
    import imagecodecs
    from PIL import Image

    from data_utils.volumes import decode_frames

    files = read_manifest(manifest)
    files = files[:: max(1, len(files) // DECODER_FILES)][:DECODER_FILES]
    warm_page_cache(files)

    def resize(img: Image.Image) -> None:
        scale = IMAGE_SIZE / max(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)),
                   Image.Resampling.BILINEAR)

    def pillow(path: Path) -> None:
        with Image.open(path) as img:
            img.load()
            resize(img)

    def libpng(path: Path) -> None:
        resize(Image.fromarray(imagecodecs.png_decode(path.read_bytes())))

    def ctscan(path: Path) -> None:
        decode_frames(path.name, path.read_bytes(), IMAGE_SIZE, "pad")

    def per_file_ms(work: Callable[[Path], None], threads: int) -> float:
        for path in files[:20]:  # warm up: imports, first-call setup
            work(path)
        start = time.perf_counter()
        if threads == 1:
            for path in files:
                work(path)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(work, files))
        return (time.perf_counter() - start) * threads / len(files) * 1e3

    threads = os.cpu_count() or 1
    return {"files": len(files), "threads": threads,
            "pillow": per_file_ms(pillow, 1), "libpng": per_file_ms(libpng, 1),
            "ctscan": per_file_ms(ctscan, 1),
            "ctscan_pooled": per_file_ms(ctscan, threads)}


# --- the driver -----------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return json.loads(child.stdout.splitlines()[-1])


def measure_size(manifest: Path) -> tuple[list[dict], dict]:
    """The three stages on one dataset, each in a fresh process, on one fresh cache, and the
    decoder alone on its files right after inspect (a shared machine's load drifts)."""
    warm_page_cache(read_manifest(manifest))
    with tempfile.TemporaryDirectory() as cache:
        stages = [run_child("--stage", STAGES[0], str(manifest), cache)]
        decoder = run_child("--decoder", str(manifest))
        stages += [run_child("--stage", stage, str(manifest), cache) for stage in STAGES[1:]]
        return stages, decoder


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Exponent b of seconds = a * n^b, least squares in log-log, and its value at 431k."""
    b, log_a = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(b), float(np.exp(log_a) * TARGET_SLICES**b)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def wait_until_quiet(threshold: float) -> None:
    start = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < QUIET_MAX_S:
        time.sleep(QUIET_POLL_S)
    waited = time.monotonic() - start
    if os.getloadavg()[0] < threshold:
        print(f"waited {waited:.0f} s for the 1-min load average to fall below {threshold}")
    else:
        print(f"the 1-min load average never fell below {threshold} in {waited / 60:.0f} min; "
              "measuring anyway (figures inflated by other work)")


def report_variant(variant: str, by_size: list[list[dict]], decoders: list[dict]) -> float:
    """Prints one variant's tables; returns its extrapolated inspect + split seconds at 431k."""
    sizes = [stages[0]["n"] for stages in by_size]
    print(f"\n== {VARIANTS[variant]}, {SOURCE_SIZE} x {SOURCE_SIZE}, cached at {IMAGE_SIZE} px ==")
    print(f"{'stage (seconds)':36}" + "".join(f"{n:>9}" for n in sizes)
          + f"{'exponent':>9}{'at 431k':>9}")
    extrapolated = {}
    for k, stage in enumerate(STAGES):
        for part in by_size[0][k]["seconds"]:
            seconds = [stages[k]["seconds"][part] for stages in by_size]
            exponent, at_target = fit(sizes, seconds)
            extrapolated[stage, part] = at_target
            print(f"{part:36}" + "".join(f"{s:9.2f}" for s in seconds)
                  + f"{exponent:9.2f}{at_target:9.0f}")

    threads = decoders[0]["threads"]
    print(f"per file, ms of core time (1 thread while hashing, {threads} while decoding):")
    print(f"{'':36}" + "".join(f"{n:>9}" for n in sizes))
    inspect = [stages[0] for stages in by_size]
    rows = {
        "  inspect's load, wall": [r["load_seconds"] / r["n"] for r in inspect],
        "  inspect's load, core time": [
            (r["load_seconds"] + (threads - 1) * r["build_seconds"]) / r["n"] for r in inspect],
        "    sha256 + stat pass (1 thread)": [r["hash_seconds"] / r["n"] for r in inspect],
        f"    decode pass ({threads} threads)": [
            r["build_seconds"] * threads / r["n"] for r in inspect],
        "    the rest of load (1 thread)": [
            (r["load_seconds"] - r["hash_seconds"] - r["build_seconds"]) / r["n"]
            for r in inspect],
    }
    for name, values in rows.items():
        print(f"{name:36}" + "".join(f"{v * 1e3:9.2f}" for v in values))
    core = rows["  inspect's load, core time"]
    pooled = [d["ctscan_pooled"] / 1e3 for d in decoders]
    print(f"{'  of which the decoder (pooled)':36}" + "".join(f"{p * 1e3:9.2f}" for p in pooled))
    print(f"{'  everything else (ours)':36}"
          + "".join(f"{(c - p) * 1e3:9.2f}" for c, p in zip(core, pooled, strict=True)))
    print(f"the decoder alone, tight loop over up to {DECODER_FILES} of the same files "
          "(page cache), ms per file:")
    print(f"{'':36}" + "".join(f"{n:>9}" for n in sizes))
    for key, name in (("pillow", "  Pillow open+load+resize, 1 thread"),
                      ("libpng", "  libpng decode+Pillow resize, 1 th."),
                      ("ctscan", "  ctscan decode_frames, 1 thread"),
                      ("ctscan_pooled", f"  decode_frames, {threads} threads (x{threads}/n)")):
        print(f"{name:36}" + "".join(f"{d[key]:9.2f}" for d in decoders))

    imports = by_size[0][0]["baseline_rss"] / 2**20
    print(f"peak RSS of each stage's process above what its imports held ({imports:.0f} MiB), "
          f"as a multiple of the cached array (goal <= {GOAL_RSS_RATIO}x):")
    for n, stages in zip(sizes, by_size, strict=True):
        array = stages[0]["array_bytes"]
        growth = [f"{stage} {r['rss_growth'] / 2**20:.0f} MiB = {r['rss_growth'] / array:.2f}x"
                  for stage, r in zip(STAGES, stages, strict=True)]
        print(f"  n={n}: array {array / 2**20:.0f} MiB; " + ", ".join(growth))
    # Each top-level part with its own exponent: the N^2 search is small at 10k but not at 431k.
    return sum(seconds for (stage, part), seconds in extrapolated.items()
               if stage in ("inspect", "split") and part.startswith("  ")
               and not part.startswith("    "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_500, 5_000, 10_000, 20_000],
                        help="dataset sizes in slices (at least two, for the exponent)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["16", "8"],
                        help="which sources to measure; the last one gives the last line")
    parser.add_argument("--data", type=Path, help="where the generated slices live")
    parser.add_argument("--wait-quiet", type=float, metavar="LOAD",
                        help="first wait (up to 40 min) for the 1-min load average < LOAD")
    parser.add_argument("--generate-only", action="store_true")
    # A child process: --stage STAGE MANIFEST CACHE_DIR, or --decoder MANIFEST
    parser.add_argument("--stage", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--decoder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage, manifest, cache = args.stage
        print(json.dumps(measure_stage(stage, Path(manifest), Path(cache))))
        return
    if args.decoder:
        print(json.dumps(measure_decoder(args.decoder)))
        return
    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two sizes to fit an exponent")

    sizes = sorted(args.sizes)
    data = args.data or default_data_dir()
    seconds, drawn = ensure_data(data, sizes[-1], args.variants)
    print(f"data: {data}, CT-like slices at {SOURCE_SIZE} x {SOURCE_SIZE} px, "
          + (f"{drawn} drawn in {seconds:.0f} s (not timed below)" if drawn
             else "drawn by an earlier run"))
    if args.generate_only:
        return
    if args.wait_quiet is not None:
        wait_until_quiet(args.wait_quiet)
    print(f"{os.cpu_count()} CPU cores; load average at start: {load_average()}")
    plan = patient_plan()
    totals = {}
    for variant in args.variants:
        manifests = [write_manifest(data / variant, manifest_rows(plan, n)) for n in sizes]
        measured = [measure_size(manifest) for manifest in manifests]
        totals[variant] = report_variant(variant, [stages for stages, _ in measured],
                                         [decoder for _, decoder in measured])
        sys.stdout.flush()
    print(f"\nload average at end: {load_average()}")
    print(f"goals: exponent <= {GOAL_EXPONENT} per stage; inspect + split for 431k < "
          f"{GOAL_MINUTES:.0f} min; cache load peak RSS <= {GOAL_RSS_RATIO}x the array")
    for variant in args.variants[:-1]:
        print(f"extrapolated inspect + split for 431k slices ({VARIANTS[variant]}): "
              f"{totals[variant] / 60:.1f} min")
    last = args.variants[-1]
    print(f"({VARIANTS[last]}, as COVIDx CT ships its slices)" if last == "8"
          else f"({VARIANTS[last]})")
    print(f"extrapolated inspect + split for 431k slices: {totals[last] / 60:.1f} min")


if __name__ == "__main__":
    main()
