"""What the data plane costs per core and what the head holds, on 512-px slices, as `ctscan tune`
runs it: the cache built by Ray tasks on every core, the split, and a search whose trials read
their rows from the node's memory map.

    python bench/scale.py [--sizes 2500 20000] [--variants 8] [--data DIR] [--wait-quiet 0.6]
                          [--generate-only]

The sources look like the data users grow into: COVIDx CT's slices are 512 x 512 PNGs, so this
bench draws the demo generator's CT-like patients (data_utils.demo) at 512 px, pads each slice
with air (0) to exactly 512 x 512, and writes up to two variants of the same pixels:
- "8": 8-bit grayscale PNGs, as COVIDx CT ships them (the default);
- "16": 16-bit grayscale PNGs holding 12 significant bits, as CT scanners store them, with an
  sBIT chunk of 12 and the samples scaled to 16 bits the way the PNG spec says (left bit
  replication), so ctscan's decoder takes its sBIT path (shift right by 4, 0..4095 -> 0..255).
  The lowest 4 of the 12 bits are random, as CT noise is, so the files compress like real ones.
Both are saved at zlib level 1 (OpenCV's imwrite default), which draws 10k slices in minutes
rather than most of an hour. Slices are generated once, untimed, into DIR (default
~/.cache/ctscan-bench/ct512, outside the repository), patient by patient from one fixed plan, so a
larger size only draws the patients it adds and every size reads the same files: size N is the
first N/2 slices of each class, in a manifest that names each slice's patient.

Each size runs in a fresh process, the head, with a fresh cache at the default training size
(224 px) and a fresh local Ray of this machine's cores. Every file is read once, untimed, before,
so all of them read through the page cache: the bench measures CPU work, not the disk. The head:
- load: load_dataset(decode=decode_on_cluster), in its stages: sha256 + stat of every file (the
  head, 1 thread); decode + perceptual hash + write each shard (Ray tasks, one core each: its
  core time is its wall time x the cores Ray has, idle tails and worker start-up included); join
  the shards into the node's pixel file (the head, 1 thread); discover and the rest (the head);
- split: split_dataset by patient + split.json (the head);
- search: a Ray Tune search (tune.with_parameters, as ctscan's) of one trial per core, each of
  which opens TrialData's pixels on its node and reads every train and val row once, as an epoch
  does. It trains nothing: what it measures is the data plane, which training does not change.
A stage's cost per slice is its marginal cost: the slope of its core time between the smallest
and the largest size, so fixed costs (Ray's worker start-up) are not charged per slice; the
extrapolation to 431k slices is fixed + slope x 431k, and the wall-clock minutes that follow for
C cores run the head's stages on one core and the shards on all C.

Beside it, the decoder alone on up to 1000 of the same files, in a pool of as many processes as
Ray has cores (core time = wall x processes / files): libpng's decode (imagecodecs, which ctscan
uses for gray PNGs) + Pillow's resize to 224. "ours / decoder" divides the load's slope (every
stage of it) by that.

Memory: the head's peak RSS (VmHWM: imports, shared libraries and any page of the memory map it
touched included) and its peak private memory (RssAnon + RssShmem, sampled every 20 ms: what the
array would add if the head held a copy of it), against the cached array's size; and a trial
process's, a node's worker, after it has read its rows. The load average is printed at start and
end; with --wait-quiet L the run first waits (up to 40 minutes) for the 1-minute load average to
fall below L, since a shared machine's other work inflates every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
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
HEAD_STAGES = ("sha256 + stat (head)", "join shards (head)", "discover, rest (head)")
SHARD_STAGE = "decode + hash + write shards (Ray)"
LOAD_STAGES = (HEAD_STAGES[0], SHARD_STAGE, *HEAD_STAGES[1:])
CORES = (2, 16, 64)
GOAL_RATIO, GOAL_RSS_RATIO = 1.2, 1.15
QUIET_POLL_S, QUIET_MAX_S = 30, 40 * 60
SAMPLE_S = 0.02


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


# --- the head, in its own process --------------------------------------------------------


def memory() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon and RssShmem, in bytes, from /proc."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class PrivatePeak:
    """The highest RssAnon + RssShmem seen, sampled in a thread while it runs."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            m = memory()
            self.peak = max(self.peak, m["RssAnon"] + m["RssShmem"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(module: object, name: str, seconds: list[float]) -> None:
    """Replaces module.name by a wrapper that appends each call's wall time to `seconds`."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)


def read_rows(params: dict, data) -> None:
    """A trial of the data plane: open the node's pixels, read every train and val row once, as
    an epoch's batches do, and report this process's memory and a checksum."""
    from ray import tune

    images = data.images()
    rows = np.concatenate([data.train_rows, data.val_rows])
    total = 0
    for start in range(0, len(rows), 256):
        total += int(images[np.sort(rows[start : start + 256])].sum(dtype=np.uint64))
    m = memory()
    tune.report({"checksum": total, "rss": m["VmRSS"], "private": m["RssAnon"] + m["RssShmem"],
                 "file_backed": m["VmRSS"] - m["RssAnon"] - m["RssShmem"]})


def measure_head(manifest: Path, cache: Path) -> dict:
    """Runs `ctscan tune`'s data plane in this process; returns its stages' seconds and memory."""
    import ray
    from ray import tune

    import data_utils.cache as cache_module
    import tuning.cluster as cluster_module
    from data_utils.cache import load_dataset
    from data_utils.split import split_dataset, write_split
    from tuning.train import trial_data

    before = memory()
    private = PrivatePeak()
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    hashing, shards, joining = [], [], []
    timed(cache_module, "_hash_files", hashing)
    timed(cluster_module, "decode_on_cluster", shards)
    timed(cache_module.CachedPixels, "_join", joining)
    start = time.perf_counter()
    ds = load_dataset(manifest, IMAGE_SIZE, cache_dir=cache, progress=False,
                      decode=cluster_module.decode_on_cluster)
    ds.pixels.fetch()  # joined already for a cache folder: a no-op
    load = time.perf_counter() - start
    start = time.perf_counter()
    split = split_dataset(ds)
    write_split(split, ds, cache / "split.json")
    split_seconds = time.perf_counter() - start
    data = trial_data(ds, split)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        grid = tune.Tuner(
            tune.with_resources(tune.with_parameters(read_rows, data=data), {"cpu": 1}),
            param_space={"k": tune.grid_search(list(range(cores)))},
            run_config=tune.RunConfig(storage_path=runs, name="scale", verbose=0)).fit()
        trials = [r.metrics for r in grid]
    search = time.perf_counter() - start
    ray.shutdown()
    after = memory()
    seconds = {HEAD_STAGES[0]: sum(hashing), SHARD_STAGE: sum(shards),
               HEAD_STAGES[1]: sum(joining),
               HEAD_STAGES[2]: load - sum(hashing) - sum(shards) - sum(joining),
               "split by patient + split.json (head)": split_seconds,
               f"search, {cores} trials reading their rows (Ray)": search}
    return {"n": len(ds), "cores": cores, "seconds": seconds,
            "array_bytes": ds.pixels.nbytes, "handed_bytes": len(pickle.dumps(data)),
            "head_hwm": after["VmHWM"], "head_imports": before["VmRSS"],
            "head_private_peak": private.stop(),
            "trial_rss": max(t["rss"] for t in trials),
            "trial_private": max(t["private"] for t in trials),
            "trial_file_backed": max(t["file_backed"] for t in trials),
            "checksums": len({t["checksum"] for t in trials})}


def decode_one(path: Path) -> None:
    import imagecodecs
    from PIL import Image

    img = Image.fromarray(imagecodecs.png_decode(path.read_bytes()))
    scale = IMAGE_SIZE / max(img.size)
    img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)


def measure_decoder(manifest: Path) -> dict:
    """The bare decoder's core-ms per file: libpng + Pillow's resize, in a pool of as many
    processes as cores, on up to DECODER_FILES files spread over the manifest."""
    files = read_manifest(manifest)
    files = files[:: max(1, len(files) // DECODER_FILES)][:DECODER_FILES]
    warm_page_cache(files)
    processes = os.cpu_count() or 1
    with Pool(processes) as pool:
        pool.map(decode_one, files[: 4 * processes])  # imports and first calls, untimed
        start = time.perf_counter()
        pool.map(decode_one, files, chunksize=8)
        wall = time.perf_counter() - start
    return {"files": len(files), "processes": processes,
            "core_ms": wall * processes / len(files) * 1e3}


# --- the driver -----------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return json.loads(child.stdout.splitlines()[-1])


def measure_size(manifest: Path) -> tuple[dict, dict]:
    warm_page_cache(read_manifest(manifest))
    with tempfile.TemporaryDirectory() as cache:
        head = run_child("--head", str(manifest), cache)
    return head, run_child("--decoder", str(manifest))


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


def core_seconds(head: dict, stage: str) -> float:
    """A stage's core time: Ray's stages keep every core busy, the head's stages one."""
    busy = head["cores"] if stage.endswith("(Ray)") else 1
    return head["seconds"][stage] * busy


def report_variant(variant: str, heads: list[dict], decoders: list[dict]) -> tuple[float, float]:
    """Prints one variant's tables; returns (ours / decoder, head peak RSS larger / smaller)."""
    small, large = heads[0], heads[-1]
    sizes = [h["n"] for h in heads]
    cores = large["cores"]
    print(f"\n== {VARIANTS[variant]}, {SOURCE_SIZE} x {SOURCE_SIZE}, cached at {IMAGE_SIZE} px, "
          f"{cores} cores ==")
    print(f"{'stage':40}" + "".join(f"{f'wall s @{n}':>14}" for n in sizes)
          + f"{'core-ms/slice':>14}{'core-min@431k':>14}")
    slopes, at_target = {}, {}
    for stage in large["seconds"]:
        core = [core_seconds(h, stage) for h in heads]
        slope = (core[-1] - core[0]) / (sizes[-1] - sizes[0])
        fixed = core[0] - slope * sizes[0]
        slopes[stage], at_target[stage] = slope, fixed + slope * TARGET_SLICES
        print(f"  {stage:38}" + "".join(f"{h['seconds'][stage]:14.2f}" for h in heads)
              + f"{slope * 1e3:14.3f}{at_target[stage] / 60:14.1f}")
    ours = sum(slopes[s] for s in LOAD_STAGES)
    decoder = float(np.mean([d["core_ms"] for d in decoders])) / 1e3
    print(f"  {'load, all its stages (ours)':38}" + " " * 14 * len(heads)
          + f"{ours * 1e3:14.3f}{sum(at_target[s] for s in LOAD_STAGES) / 60:14.1f}")
    print(f"  {'the decoder alone (libpng + resize)':38}"
          + "".join(f"{d['core_ms']:14.3f}" for d in decoders) + f"{decoder * 1e3:14.3f}"
          + f"{decoder * TARGET_SLICES / 60:14.1f}")
    print(f"    (core-ms per file, {decoders[0]['processes']} processes, up to {DECODER_FILES} "
          "files of each size)")
    head_stages = [s for s in large["seconds"] if s.endswith("(head)")]
    serial = sum(at_target[s] for s in head_stages)
    parallel = at_target[SHARD_STAGE]
    print("wall-clock minutes at 431k slices, the head's stages on one core, the shards on all: "
          + ", ".join(f"{c} cores {(serial + parallel / c) / 60:.1f}" for c in CORES))
    print(f"memory (cached array: {small['array_bytes'] / 2**20:.0f} MiB at {sizes[0]}, "
          f"{large['array_bytes'] / 2**20:.0f} MiB at {sizes[-1]}; TrialData handed to each "
          f"trial: {large['handed_bytes']} bytes):")
    for h in heads:
        mib = {k: v / 2**20 for k, v in h.items() if isinstance(v, int)}
        print(f"  n={h['n']}: head peak RSS {mib['head_hwm']:.0f} MiB (its imports "
              f"{mib['head_imports']:.0f} MiB), peak private {mib['head_private_peak']:.0f} MiB "
              f"= {h['head_private_peak'] / h['array_bytes']:.2f}x the array; a trial's process: "
              f"RSS {mib['trial_rss']:.0f} MiB, private {mib['trial_private']:.0f} MiB, mapped "
              f"pages {mib['trial_file_backed']:.0f} MiB; {h['checksums']} distinct checksum(s) "
              "over the trials")
    return ours / decoder, large["head_hwm"] / small["head_hwm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_500, 20_000],
                        help="dataset sizes in slices (at least two: costs are slopes)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["8"],
                        help="which sources to measure; the last one gives the last line")
    parser.add_argument("--data", type=Path, help="where the generated slices live")
    parser.add_argument("--wait-quiet", type=float, metavar="LOAD",
                        help="first wait (up to 40 min) for the 1-min load average < LOAD")
    parser.add_argument("--generate-only", action="store_true",
                        help="draw the slices the sizes need, measure nothing")
    # A child process: --head MANIFEST CACHE_DIR, or --decoder MANIFEST
    parser.add_argument("--head", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--decoder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.head:
        print(json.dumps(measure_head(Path(args.head[0]), Path(args.head[1]))))
        return
    if args.decoder:
        print(json.dumps(measure_decoder(args.decoder)))
        return
    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two sizes")

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
    ratios = {}
    for variant in args.variants:
        manifests = [write_manifest(data / variant, manifest_rows(plan, n)) for n in sizes]
        measured = [measure_size(manifest) for manifest in manifests]
        ratios[variant] = report_variant(variant, [h for h, _ in measured],
                                         [d for _, d in measured])
        sys.stdout.flush()
    print(f"\nload average at end: {load_average()}")
    print(f"goals: ours / decoder <= {GOAL_RATIO}; head peak RSS, larger / smaller data <= "
          f"{GOAL_RSS_RATIO}")
    ratio, rss = ratios[args.variants[-1]]
    print(f"ours / decoder core time per slice: {ratio:.2f}; head peak RSS, larger / smaller "
          f"data: {rss:.2f}")


if __name__ == "__main__":
    main()
