"""TensorBoard logging for a single `ctscan train` run (Ray Tune logs its own trials)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from data_utils.augment import NORM_MEAN, NORM_STD, train_batches
from tuning.config import TrainConfig
from tuning.train import Reporter


def tensorboard_reporter(log_dir: Path, config: TrainConfig, train_images: torch.Tensor,
                         train_labels: torch.Tensor) -> Reporter:
    """A report callback writing every metric per epoch; logs one grid of augmented inputs now."""
    writer = SummaryWriter(str(log_dir))
    generator = torch.Generator().manual_seed(config.seed)
    x, _ = next(train_batches(train_images[:64], train_labels[:64], 32, config.aug_strength,
                              generator))
    grid = make_grid(x * NORM_STD + NORM_MEAN, nrow=8).clamp(0, 1)
    writer.add_image("augmented_training_images", grid, 0)
    writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.to_dict().items()))
    writer.flush()

    def report(metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "epoch":
                writer.add_scalar(key, value, metrics["epoch"])
        writer.flush()

    return report
