"""Body of bench/gpu_check.sh: see there."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ctmodels import NORM_MEAN, NORM_STD
from data_utils.augment import train_batches
from data_utils.decode import decode_image
from data_utils.demo import make_demo_data
from tuning.config import make_config
from tuning.train import TrialData, train_trial


def demo_arrays(n_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_data(Path(tmp) / "demo", n_per_class=n_per_class, size=256)
        files = sorted(root.glob("*/*.png"))
        with ThreadPoolExecutor() as pool:
            images = list(pool.map(lambda f: decode_image(f.read_bytes(), size).pixels, files))
    labels = np.array([f.parent.name == "COVID" for f in files], np.int64)
    return np.stack(images), labels


def time_augmentation(images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Seconds per image that strength-1 augmentation adds over strength 0 on this device."""
    def epoch(strength: float) -> float:
        g = torch.Generator(images.device).manual_seed(0)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for x, _ in train_batches(images, labels, batch, strength, NORM_MEAN, NORM_STD, g):
            x.sum()  # consume the batch as a model would
        torch.cuda.synchronize()
        return time.perf_counter() - started

    epoch(1.0)
    return (min(epoch(1.0) for _ in range(3)) - min(epoch(0.0) for _ in range(3))) / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description="GPU throughput of train_trial")
    p.add_argument("--arch", default="resnet50", help="backbone (default: resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="image size (default: 224)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--epochs", type=int, default=6, help="epochs; the first is warm-up")
    p.add_argument("--n-per-class", type=int, default=1250, help="demo slices per class")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")

    started = time.perf_counter()
    images, labels = demo_arrays(args.n_per_class, args.image_size)
    print(f"{len(labels)} demo slices at {args.image_size} px "
          f"({images.nbytes / 2**20:.0f} MiB uint8) in {time.perf_counter() - started:.0f} s")
    config = make_config({"arch": args.arch, "image_size": args.image_size,
                          "batch_size": args.batch_size, "epochs": args.epochs,
                          "aug_strength": 0.5, "patience": 99, "device": "cuda"})
    data = TrialData.from_arrays(images, labels, images[: len(images) // 5],
                                 labels[: len(images) // 5])
    rates = []
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        train_trial(config, data, Path(out), lambda m, *_: rates.append(m["images_per_sec"]))
    peak = torch.cuda.max_memory_allocated() / 2**30
    rate = statistics.median(rates[1:])
    print(f"per-epoch training images/s: {', '.join(f'{r:.0f}' for r in rates)}")

    gpu_images = torch.from_numpy(images).cuda()
    gpu_labels = torch.from_numpy(labels).cuda()
    aug = time_augmentation(gpu_images, gpu_labels, args.batch_size)
    print(f"augmentation (strength 1 vs 0): {aug * 1e6:.1f} us/image = "
          f"{100 * aug * rate:.1f}% of a training step")
    print(f"peak GPU memory: {peak:.1f} GiB")
    print(f"{args.arch} {args.image_size}px batch {args.batch_size} bf16 channels_last: "
          f"{rate:.0f} training images/s (median of epochs 2-{args.epochs})")


if __name__ == "__main__":
    main()
