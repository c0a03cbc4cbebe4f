"""What does train_trial's machinery cost? Its training images/s against a bare PyTorch loop.

Same model, batch size, image size and in-memory uint8 data, no augmentation in either; resnet18
at 64 and 128 px on the CPU. The first epoch of each is a warm-up and is not counted. Runs
alternate (ours, bare, ours, bare...) so drift in the machine's speed hits both alike.

    python bench/trainer_overhead.py [--images 256] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctmodels import NORM_MEAN, NORM_STD, build_model, normalize
from tuning.config import make_config
from tuning.train import TrialData, make_optimizer, make_scheduler, train_trial


def bare_loop(config, images: np.ndarray, labels: np.ndarray) -> float:
    """The loop a PyTorch user writes by hand; returns training images/s after epoch 1."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.head)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, math.ceil(len(labels) / config.batch_size))
    criterion = nn.BCEWithLogitsLoss()
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels).float()
    seen, elapsed = 0, 0.0
    for epoch in range(config.epochs):
        model.train()
        started = time.perf_counter()
        for idx in torch.randperm(len(y_all)).split(config.batch_size):
            loss = criterion(model(normalize(x_all[idx], NORM_MEAN, NORM_STD)).squeeze(1),
                             y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if epoch > 0:
            seen += len(y_all)
            elapsed += time.perf_counter() - started
    return seen / elapsed


def ours(config, images: np.ndarray, labels: np.ndarray) -> float:
    """train_trial's own images/s per epoch (training only, as it reports), after epoch 1."""
    rates = []
    with tempfile.TemporaryDirectory() as out:
        data = TrialData.from_arrays(images, labels, images[:32], labels[:32])
        train_trial(config, data, Path(out), lambda m, *_: rates.append(m["images_per_sec"]))
    return len(labels) * (len(rates) - 1) / sum(len(labels) / r for r in rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    print(f"resnet18, batch 32, {args.images} images x {args.epochs} epochs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    ratios = []
    for size in args.sizes:
        images = rng.integers(0, 256, (args.images, size, size), dtype=np.uint8)
        labels = (np.arange(args.images) % 2).astype(np.int64)
        config = make_config({"arch": "resnet18", "image_size": size, "batch_size": 32,
                              "epochs": args.epochs, "aug_strength": 0.0, "patience": 99,
                              "device": "cpu"})
        rates = {"ours": [], "bare": []}
        for _ in range(args.repeats):
            rates["ours"].append(ours(config, images, labels))
            rates["bare"].append(bare_loop(config, images, labels))
        a, b = np.median(rates["ours"]), np.median(rates["bare"])
        ratios.append(a / b)
        print(f"{size:>4} px  train_trial {a:7.1f} img/s   bare loop {b:7.1f} img/s   "
              f"ratio {a / b:.3f}")
    print(f"ratio train_trial/bare (geometric mean over sizes): "
          f"{math.exp(np.mean(np.log(ratios))):.3f}")


if __name__ == "__main__":
    main()
