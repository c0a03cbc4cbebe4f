"""How the data path grows with the dataset: inspect -> split -> cache load at 10k, 20k, 40k slices.

    python bench/scale.py [--sizes 10000 20000 40000] [--data DIR]

The slices are the demo generator's CT-like slices at 64 px. They are generated once, for the
largest size, into DIR (default: ~/.cache/ctscan-bench/demo-64px-N, outside the repository) and
reused by later runs; generation is not timed. A smaller size N is the first N/2 slices of each
class, named by a manifest in DIR, so every size reads the same kind of files.

Each size starts with a fresh, empty cache, and each stage runs in its own process, as a
user's commands and a search's trials do:
- inspect: load_dataset (sha256 every file, decode, write the cache) + the doctor;
- split: load_dataset (the cache and remembered digests exist now) + split_dataset + split.json;
- cache load: load_dataset + reading every pixel once, as a trial on the node would.
The near-duplicate search inside inspect is N^2 work (on a small constant), so it is timed on
its own and extrapolated with its own exponent; the 431k figure adds the parts up. Split reads
the pairs inspect kept in the cache folder, as `ctscan split` after `ctscan inspect` does.
Peak RSS is each stage process's high-water mark (VmHWM) above what its imports already held,
compared with the size of the cached array.
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
from pathlib import Path

import numpy as np

TARGET_SLICES = 431_000  # COVIDx CT-3
IMAGE_SIZE = 64
STAGES = ("inspect", "split", "cache load")
GOAL_EXPONENT, GOAL_MINUTES, GOAL_RSS_RATIO = 1.15, 10.0, 1.3


def default_data_dir(largest: int) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ctscan-bench" / f"demo-{IMAGE_SIZE}px-{largest}"


def ensure_data(data: Path, largest: int) -> float:
    """Generate the slices unless an earlier run did; returns the seconds generation took."""
    if (data / "manifest.csv").exists():
        return 0.0
    from data_utils.demo import make_demo_data

    start = time.perf_counter()
    make_demo_data(data, n_per_class=largest // 2, size=IMAGE_SIZE)
    return time.perf_counter() - start


def subset_manifest(data: Path, n: int) -> Path:
    """A manifest of the first n/2 slices of each class (written next to the slices)."""
    with open(data / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    path = data / f"subset-{n}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["path", "label", "group"], lineterminator="\n")
        writer.writeheader()
        for label_rows in by_label.values():
            writer.writerows(label_rows[: n // 2])
    return path


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_stage(stage: str, manifest: Path, cache: Path) -> dict:
    """Runs one stage in this process; returns its seconds (and its parts') and memory."""
    import data_utils.split as split_module
    from data_utils.cache import load_dataset
    from data_utils.doctor import inspect_dataset
    from data_utils.split import split_dataset, write_split

    search_seconds = []
    cached_near_duplicate_pairs = split_module.cached_near_duplicate_pairs

    def timed_search(ds):
        start = time.perf_counter()
        pairs = cached_near_duplicate_pairs(ds)
        search_seconds.append(time.perf_counter() - start)
        return pairs

    split_module.cached_near_duplicate_pairs = timed_search
    baseline_rss = rss_bytes("VmRSS")
    start = time.perf_counter()
    ds = load_dataset(manifest, IMAGE_SIZE, cache_dir=cache, progress=False)
    load_seconds = time.perf_counter() - start
    if stage == "inspect":
        inspect_dataset(ds)
    elif stage == "split":
        write_split(split_dataset(ds), ds, cache / "split.json")
    else:
        int(ds.images.max())  # every page of the cache, read through the page cache
    total = time.perf_counter() - start
    if stage == "inspect":
        parts = {"  hash + decode + write cache": load_seconds,
                 "  near-duplicate search": search_seconds[0],
                 "  doctor, the rest": total - load_seconds - search_seconds[0]}
    elif stage == "split":
        parts = {"  load (cached)": load_seconds,
                 "  near-duplicate pairs (cached)": search_seconds[0],
                 "  deal, write split.json": total - load_seconds - search_seconds[0]}
    else:
        parts = {}
    return {"n": len(ds), "seconds": {stage: total, **parts}, "array_bytes": ds.images.nbytes,
            "rss_growth": rss_bytes("VmHWM") - baseline_rss, "baseline_rss": baseline_rss}


def measure_size(manifest: Path) -> list[dict]:
    """The three stages on one dataset, each in a fresh process, on one fresh cache."""
    with tempfile.TemporaryDirectory() as cache:
        results = []
        for stage in STAGES:
            child = subprocess.run(
                [sys.executable, __file__, "--stage", stage, str(manifest), cache],
                check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            results.append(json.loads(child.stdout.splitlines()[-1]))
        return results


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Exponent b of seconds = a * n^b, least squares in log-log, and its value at 431k."""
    b, log_a = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(b), float(np.exp(log_a) * TARGET_SLICES**b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=3, default=[10_000, 20_000, 40_000])
    parser.add_argument("--data", type=Path, help="where the generated slices live")
    # A child process: --stage STAGE MANIFEST CACHE_DIR
    parser.add_argument("--stage", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage, manifest, cache = args.stage
        print(json.dumps(measure_stage(stage, Path(manifest), Path(cache))))
        return

    data = args.data or default_data_dir(max(args.sizes))
    generated = ensure_data(data, max(args.sizes))
    print(f"data: {data}, demo slices at {IMAGE_SIZE} px, "
          + (f"generated in {generated:.0f} s (not timed below)" if generated
             else "generated by an earlier run"))
    print(f"{os.cpu_count()} CPU cores; load average at start: "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)")
    by_size = [measure_size(subset_manifest(data, n)) for n in args.sizes]
    sizes = [stages[0]["n"] for stages in by_size]
    print(f"{'stage (seconds)':32}" + "".join(f"{n:>10}" for n in sizes)
          + f"{'exponent':>10}{'at 431k':>10}")
    extrapolated = {}
    for k, stage in enumerate(STAGES):
        for part in by_size[0][k]["seconds"]:
            seconds = [stages[k]["seconds"][part] for stages in by_size]
            exponent, at_target = fit(sizes, seconds)
            extrapolated[stage, part] = at_target
            print(f"{part:32}" + "".join(f"{s:10.2f}" for s in seconds)
                  + f"{exponent:10.2f}{at_target:10.0f}")
    imports = by_size[0][0]["baseline_rss"] / 2**20
    print(f"peak RSS of each stage's process above what its imports held ({imports:.0f} MiB), "
          f"as a multiple of the cached array (goal <= {GOAL_RSS_RATIO}x):")
    for n, stages in zip(sizes, by_size, strict=True):
        array = stages[0]["array_bytes"]
        growth = [f"{stage} {r['rss_growth'] / 2**20:.0f} MiB = {r['rss_growth'] / array:.2f}x"
                  for stage, r in zip(STAGES, stages, strict=True)]
        print(f"  n={n}: array {array / 2**20:.0f} MiB; " + ", ".join(growth))
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"goals: exponent <= {GOAL_EXPONENT} per stage; inspect + split for 431k < "
          f"{GOAL_MINUTES:.0f} min")
    # Each part with its own exponent: the N^2 search is small at 40k but not at 431k.
    total = sum(seconds for (stage, part), seconds in extrapolated.items()
                if stage in ("inspect", "split") and part.startswith("  "))
    print(f"extrapolated inspect + split for 431k slices: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
