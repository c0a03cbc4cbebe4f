"""Does `precision: auto` (bf16 autocast with channels_last on a CPU with bf16 instructions) train
faster than fp32 on the CPU, and do its models score the same?

1. The recipe (TrainConfig's defaults but image size and epochs) on the real sample
   (../shared/data/sarscov2-ct-sample; ctscan's default split), for several seeds, fp32 and
   auto: mean +- sd of the best val AUC and of the test AUC of that checkpoint (scored in fp32,
   as `ctscan evaluate` does), and whether the two agree within the seed spread. Skipped with
   --throughput-only or when the sample is absent.
2. Training throughput of train_trial (its reported images/s, training only) for ResNet-18 and
   ResNet-34 at 128 px on random images, fp32 and auto; runs alternate (and swap order each
   repeat) so drift in the machine's speed hits both alike, and the first epoch of each run is a
   warm-up, not counted. Then validation's forward pass (predict_proba) at fp32 and at bf16
   with the fp32 head, which decided how validation is scored. The last line is the training
   ratio, the geometric mean over the two archs.

    python bench/cpu_precision.py [--throughput-only] [--seeds 3] [--image-size 128]
        [--epochs 20] [--images 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from search_vs_baseline import SAMPLE, score_checkpoint
from trainer_overhead import ours as trial_rate  # train_trial's images/s after epoch 1

from ctmodels import ModelDescription, build_model, predict_proba, resolve_precision
from ctmodels.model import cpu_has_native_bf16
from data_utils.cache import load_dataset
from data_utils.split import split_dataset
from tuning.config import make_config
from tuning.train import train_trial, trial_data

PRECISIONS = ("fp32", "auto")
ARCHS = ("resnet18", "resnet34")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def recipe(args: argparse.Namespace, tmp: Path) -> None:
    ds = load_dataset(SAMPLE, args.image_size, cache_dir=tmp / "cache", progress=False)
    split = split_dataset(ds)  # ctscan's defaults: 70/20/10, seed 0, near-duplicates together
    print(f"recipe on the real sample: {len(ds)} slices at {args.image_size} px, train/val/test "
          f"{'/'.join(str(len(split.indices(s))) for s in ('train', 'val', 'test'))}, "
          f"{args.epochs} epochs (patience 5), seeds {args.seeds}", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
    for seed in range(args.seeds):
        for precision in PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]:
            config = make_config({"image_size": args.image_size, "epochs": args.epochs,
                                  "seed": seed, "precision": precision, "device": "cpu",
                                  "num_workers": args.threads})
            out = tmp / f"{precision}-{seed}"
            started = time.perf_counter()
            best = train_trial(config, trial_data(ds, split), out)
            took = time.perf_counter() - started
            test = score_checkpoint(out / "best.pt", ds, split)["roc_auc"]
            rows[precision].append((best["val_auc"], test))
            print(f"  seed {seed} {precision:<4}: best val AUC {best['val_auc']:.4f} at epoch "
                  f"{best['epoch']}, test AUC {test:.4f}, {took:.0f} s", flush=True)
    print(f"{'':6}{'best val AUC':>18}  {'test AUC':>16}")
    stats = {}
    for precision, runs in rows.items():
        val, test = np.array(runs).T
        stats[precision] = (val.mean(), val.std(ddof=1), test.mean(), test.std(ddof=1))
        print(f"{precision:<6}{val.mean():10.4f} ± {val.std(ddof=1):.4f}  "
              f"{test.mean():8.4f} ± {test.std(ddof=1):.4f}")
    verdicts = []
    for name, i in (("best val AUC", 0), ("test AUC", 2)):
        gap = stats["auto"][i] - stats["fp32"][i]
        spread = max(stats["auto"][i + 1], stats["fp32"][i + 1])
        verdicts.append(abs(gap) <= spread)
        print(f"{name}: auto - fp32 = {gap:+.4f}, {'within' if verdicts[-1] else 'OUTSIDE'} "
              f"the seed spread (the larger sd, {spread:.4f})")
    print("auto and fp32 " + ("agree within the seed spread on both." if all(verdicts) else
                              "do NOT agree within the seed spread."), flush=True)


def validation_rate(arch: str, precision: str, images: np.ndarray) -> float:
    """predict_proba's images/s (what validation runs every epoch), the best of three."""
    model, description = build_model(arch), ModelDescription(arch, image_size=images.shape[-1])
    x = torch.from_numpy(images)
    predict_proba(model, x[:32], description, precision)  # warm-up
    times = []
    for _ in range(3):
        started = time.perf_counter()
        predict_proba(model, x, description, precision)
        times.append(time.perf_counter() - started)
    return len(x) / min(times)


def throughput(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 128, 128), dtype=np.uint8)
    labels = (np.arange(args.images) % 2).astype(np.int64)
    print(f"train_trial throughput: the recipe at 128 px, batch 32, {args.images} images x "
          f"{args.epochs_throughput} epochs (first is warm-up), {args.repeats} alternating "
          "repeats, median images/s", flush=True)
    rates = {(arch, p): [] for arch in ARCHS for p in PRECISIONS}
    for repeat in range(args.repeats):
        for arch in ARCHS:
            for precision in PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]:
                config = make_config({"arch": arch, "image_size": 128, "batch_size": 32,
                                      "epochs": args.epochs_throughput, "patience": 99,
                                      "precision": precision, "device": "cpu",
                                      "num_workers": args.threads})
                rates[arch, precision].append(trial_rate(config, images, labels))
    print(f"{'arch':<10}{'fp32 img/s':>12}{'auto img/s':>12}{'auto / fp32':>13}")
    ratios = []
    for arch in ARCHS:
        fp32, auto = (float(np.median(rates[arch, p])) for p in PRECISIONS)
        ratios.append(auto / fp32)
        print(f"{arch:<10}{fp32:12.1f}{auto:12.1f}{auto / fp32:13.2f}"
              f"   (runs: {' '.join(f'{r:.0f}' for r in rates[arch, 'fp32'])} vs "
              f"{' '.join(f'{r:.0f}' for r in rates[arch, 'auto'])})")
    print(f"validation forward (predict_proba, {args.images} images, best of 3): bf16 "
          "autocast with the fp32 head vs all fp32", flush=True)
    print(f"{'arch':<10}{'fp32 img/s':>12}{'bf16 img/s':>12}{'bf16 / fp32':>13}")
    for arch in ARCHS:
        fp32, bf16 = (validation_rate(arch, p, images) for p in ("fp32", "bf16"))
        print(f"{arch:<10}{fp32:12.1f}{bf16:12.1f}{bf16 / fp32:13.2f}")
    print(f"load average {load_average()}; smallest training ratio {min(ratios):.2f}; the ratio "
          "below is the geometric mean over the two archs")
    print(f"bf16 / fp32 trial throughput: {math.exp(np.mean(np.log(ratios))):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--throughput-only", action="store_true", help="skip the recipe (part 1)")
    p.add_argument("--seeds", type=int, default=3, help="recipe seeds per precision (default: 3)")
    p.add_argument("--image-size", type=int, default=128, help="recipe image size (default: 128)")
    p.add_argument("--epochs", type=int, default=20,
                   help="recipe epochs, early stopping as configured (default: 20)")
    p.add_argument("--images", type=int, default=256,
                   help="training images per throughput epoch (default: 256)")
    p.add_argument("--epochs-throughput", type=int, default=3,
                   help="epochs per throughput run, the first a warm-up (default: 3)")
    p.add_argument("--repeats", type=int, default=2,
                   help="throughput runs of each arch and precision (default: 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: every CPU)")
    args = p.parse_args()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU bf16 instructions: "
          f"{cpu_has_native_bf16()}, auto = {resolve_precision('auto', cpu)}; load average "
          f"{load_average()}", flush=True)
    started = time.perf_counter()
    if not args.throughput_only:
        if (SAMPLE / "COVID").is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                recipe(args, Path(tmp))
        else:
            print(f"recipe skipped: no real sample at {SAMPLE}")
        print(f"load average {load_average()} after the recipe "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    throughput(args)


if __name__ == "__main__":
    main()
