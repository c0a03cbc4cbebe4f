"""Training-input throughput: what a torchvision user writes vs cached tensors + train_batches.

    python bench/data_pipeline.py [--data DIR] [--image-size 224] [--batch-size 64] [--epochs N]

Both pipelines read the same images and apply the same augmentation (AugmentRanges at strength 1,
bilinear) and normalisation. The baseline decodes and augments each PNG per sample with PIL in
two DataLoader workers (persistent, so worker start-up is not counted against it). Ours decodes
once into a uint8 cache (built before timing) and augments whole batches in place on the device.
Each measurement covers whole epochs after a warm-up epoch; the two alternate so that background
load hits both alike, and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from ctmodels import NORM_MEAN, NORM_STD
from data_utils.augment import AugmentRanges, train_batches
from data_utils.cache import load_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sarscov2-ct-sample"


class FitSquare:
    """Longer side to `size`, then pad to a square with 0, as load_dataset(resize="pad") does."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        scale = self.size / max(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        canvas = Image.new("L", (self.size, self.size), 0)
        canvas.paste(
            img.resize((w, h), Image.Resampling.BILINEAR),
            ((self.size - w) // 2, (self.size - h) // 2),
        )
        return canvas


def baseline_loader(data: Path, size: int, batch_size: int) -> DataLoader:
    r = AugmentRanges()
    augment = transforms.Compose(
        [
            transforms.Grayscale(1),
            FitSquare(size),
            transforms.RandomAffine(
                degrees=r.rotation_range,
                translate=(r.width_shift_range, r.height_shift_range),
                scale=(1 - r.zoom_range, 1 + r.zoom_range),
                shear=r.shear_range,
                interpolation=InterpolationMode.BILINEAR,
                fill=0,
            ),
            transforms.RandomHorizontalFlip(0.5),
            transforms.ToTensor(),
            transforms.Normalize([NORM_MEAN], [NORM_STD]),
        ]
    )
    dataset = datasets.ImageFolder(str(data), transform=augment)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=2, persistent_workers=True
    )


def time_epochs(run_epoch: Callable[[], int], min_epochs: int, min_seconds: float) -> float:
    """Images per second over whole epochs: at least `min_epochs` and `min_seconds`."""
    start, images, epochs = time.perf_counter(), 0, 0
    while epochs < min_epochs or time.perf_counter() - start < min_seconds:
        images += run_epoch()
        epochs += 1
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="minimum epochs per measurement")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="minimum per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="device for ours, e.g. cuda")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"data folder not found: {args.data} (pass --data DIR with class subfolders)")

    # Ours computes in this process, so it gets one thread per core; the baseline's two
    # DataLoader workers run with one thread each, also one per core.
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    with tempfile.TemporaryDirectory() as cache_dir:
        t = time.perf_counter()
        ds = load_dataset(
            args.data,
            image_size=args.image_size,
            resize="pad",
            cache_dir=Path(cache_dir),
            progress=False,
        )
        cache_s = time.perf_counter() - t
    images = torch.from_numpy(ds.images).to(device)
    labels = torch.from_numpy(ds.labels).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    loader = baseline_loader(args.data, args.image_size, args.batch_size)

    def baseline_epoch() -> int:
        return sum(len(x) for x, _ in loader)

    def ours_epoch() -> int:
        n = sum(len(x) for x, _ in train_batches(images, labels, args.batch_size, 1.0, NORM_MEAN,
                                                 NORM_STD, generator))
        sync()
        return n

    print(
        f"data: {args.data} ({len(loader.dataset)} files, {len(ds)} cached), "
        f"{args.image_size} px, batch size {args.batch_size}"
    )
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, torch.set_num_threads"
        f"({args.threads}), baseline DataLoader num_workers=2; ours on {device}"
    )
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"cache built once before timing: {cache_s:.1f} s")

    baseline_epoch()  # warm-up: starts the workers, fills the page cache
    ours_epoch()
    base_rates, ours_rates = [], []
    for _ in range(args.repeats):
        base_rates.append(time_epochs(baseline_epoch, args.epochs, args.min_seconds))
        ours_rates.append(time_epochs(ours_epoch, args.epochs, args.min_seconds))
    base, ours = statistics.median(base_rates), statistics.median(ours_rates)

    def show(rates: list[float]) -> str:
        return " / ".join(f"{r:.0f}" for r in rates)

    print(f"baseline (ImageFolder + PIL, per sample): {base:6.0f} img/s  [{show(base_rates)}]")
    print(f"ours (uint8 cache + train_batches):       {ours:6.0f} img/s  [{show(ours_rates)}]")
    print(f"ratio ours/baseline: {ours / base:.1f}x")


if __name__ == "__main__":
    main()
