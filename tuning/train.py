"""One training trial: the loop that `ctscan train` and every Ray Tune trial run.

Plain functions in the manner of torchvision's references/classification/train.py:
`train_one_epoch`, `evaluate`, and `train_trial` around them with early stopping and checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ctmodels.model import ModelDescription, autocast, predict_proba, resolve_precision
from data_utils import runfolder
from data_utils.augment import batch_sizes, train_batches
from data_utils.errors import first_line
from data_utils.files import atomic_write
from tuning.config import ConfigError, TrainConfig

if TYPE_CHECKING:  # not imported at run time: a GPU box may lack imagehash, this loop does not
    from data_utils.cache import CachedPixels, CTDataset
    from data_utils.split import Split

# report(metrics of the epoch, history so far, names of the files saved that epoch)
Reporter = Callable[[dict, list[dict], list[str]], None]

# The dataset may take at most this fraction of the trial's share of GPU memory; the rest is for
# the model, optimizer state, activations and cudnn workspaces. Above it the dataset stays on the
# host and batches are copied over one at a time.
DEVICE_DATA_FRACTION = 0.25


@dataclass
class TrialData:
    """Which pixel rows a trial trains and validates on, and their labels.

    `pixels` are the cache's rows (CachedPixels: a few hundred bytes, which every trial opens as
    a memory map of its node's copy), or an array in memory; with the rows and labels, 16 bytes
    a slice go to each trial. Nothing here names a test row: the cache file holds the test
    slices too, but no trial is given their rows or labels."""

    pixels: CachedPixels | np.ndarray  # uint8 [M, S, S] rows, or where to open them
    train_rows: np.ndarray  # int64 [N]: rows of `pixels`
    train_labels: np.ndarray  # int64 [N]
    val_rows: np.ndarray
    val_labels: np.ndarray

    @classmethod
    def from_arrays(cls, train_images: np.ndarray, train_labels: np.ndarray,
                    val_images: np.ndarray, val_labels: np.ndarray) -> TrialData:
        n = len(train_images)
        return cls(np.concatenate([train_images, val_images]), np.arange(n), train_labels,
                   np.arange(n, n + len(val_images)), val_labels)

    def images(self) -> np.ndarray:
        """The pixel rows: this node's memory map of the cache, or the array given."""
        return self.pixels if isinstance(self.pixels, np.ndarray) else self.pixels.open()

    def first_train_images(self, n: int) -> np.ndarray:
        return self.images()[self.train_rows[:n]]


def trial_data(ds: CTDataset, split: Split) -> TrialData:
    train, val = split.indices("train"), split.indices("val")
    return TrialData(ds.pixels, ds.rows[train], ds.labels[train], ds.rows[val], ds.labels[val])


def rows_to_device(pixels: torch.Tensor, rows: torch.Tensor, device: torch.device,
                   chunk: int = 4096) -> torch.Tensor:
    """pixels[rows] on `device`, gathered a chunk at a time: the host never holds them all."""
    out = torch.empty((len(rows), *pixels.shape[1:]), dtype=pixels.dtype, device=device)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = pixels.index_select(0, rows[start : start + chunk]).to(device)
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str) -> None:
    """A CUDA device must be usable before anything is written; torch says why it is not."""
    if not name.startswith("cuda"):
        return
    try:
        torch.cuda.init()
        count = torch.cuda.device_count()
    except Exception as e:  # noqa: BLE001 - no driver, a driver too old, a CPU build of torch
        raise ConfigError(f"device {name}: CUDA is not usable here ({first_line(e)}); set "
                          "device to auto or cpu") from e
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(f"device {name}: torch sees {count} CUDA device(s), numbered from 0")


def fits_on_device(nbytes: int, total_memory: int, gpu_share: float) -> bool:
    """Whether a dataset of `nbytes` may live on a GPU of `total_memory` bytes of which the trial
    holds `gpu_share` (Ray's fractional GPU, e.g. 0.25 with four trials a GPU)."""
    return nbytes <= DEVICE_DATA_FRACTION * gpu_share * total_memory


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    progress: str | None = None,
    ema: AveragedModel | None = None,
    device: torch.device | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Returns (mean train loss, images seen). `device` and `rows` as in `train_batches`: device
    None when the images live on the training device, else the training device for images kept
    on the host; the training images are images[rows] (all of them without rows)."""
    model.train()
    for module in model.modules():  # a frozen BatchNorm keeps its running statistics too
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.weight.requires_grad:
            module.eval()
    description = config.description()
    batches = train_batches(images, labels, config.batch_size, config.aug_strength,
                            description.mean, description.std, generator, device=device,
                            rows=rows)
    device = images.device if device is None else device  # where the batches are
    precision = resolve_precision(config.precision, device)
    total, seen = torch.zeros((), device=device), 0
    steps = len(batch_sizes(len(labels), config.batch_size))
    # Closed on Ctrl-C too: the bar's line is cleared before the CLI says it was interrupted.
    with tqdm(batches, total=steps, desc=progress, leave=False,
              disable=progress is None) as bar:
        for x, y in bar:
            x = x.contiguous(memory_format=torch.channels_last)  # as the model (train_trial)
            target = y.float()
            if config.label_smoothing:
                target = target * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
            with autocast(device, precision):
                loss = criterion(model(x).squeeze(1).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            total += loss.detach() * len(y)  # stays on device: no sync per step
            seen += len(y)
    return total.item() / max(seen, 1), seen


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             description: ModelDescription, precision: str = "fp32",
             rows: torch.Tensor | None = None) -> dict[str, float]:
    """Val loss, accuracy at 0.5, ROC AUC and F1 of `model` on images[rows] (all of them
    without rows), fed as `description` says, its forward pass at `precision` (as in
    resolve_precision; the logits are fp32 either way)."""
    prob = predict_proba(model, images, description, precision, rows=rows)
    y = labels.float()
    loss = nn.functional.binary_cross_entropy(prob.clamp(1e-7, 1 - 1e-7), y).item()
    prob, y = prob.cpu().numpy(), labels.cpu().numpy()
    pred = (prob >= 0.5).astype(int)
    return {
        "val_loss": loss,
        "val_accuracy": float((pred == y).mean()),
        "val_auc": float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan"),
        "val_f1": float(f1_score(y, pred, zero_division=0)),
    }


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        # momentum 0 (in its documented range) is plain SGD: torch refuses Nesterov without it.
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear warmup, then cosine to 0 over the remaining epochs. While the
    backbone is frozen the head trains at the full rate; warmup and cosine start at the thaw."""
    frozen = config.freeze_backbone_epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch - frozen

    def factor(step: int) -> float:
        step -= frozen
        if config.lr_schedule == "constant" or step < 0:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(model: nn.Module, steps_per_epoch: int) -> AveragedModel:
    """An exponential moving average of the weights and BatchNorm statistics, in which the
    weights of one epoch ago count half. Early on it would mostly hold the random start, so its
    decay warms up as TensorFlow's ExponentialMovingAverage(num_updates=...) does."""
    decay = 0.5 ** (1 / steps_per_epoch)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               updates: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's batch counters
            torch._foreach_copy_(averaged, current)
            return
        n = float(updates)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = trainable or name.startswith("fc.")


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    with atomic_write(path) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_trial(
    config: TrainConfig,
    data: TrialData,
    out_dir: Path,
    report: Reporter | None = None,
    progress: bool = False,
    gpu_share: float = 1.0,
    data_on_device: bool | None = None,
    checkpoint_every: int = 1,
) -> dict:
    """Train one config; resume from out_dir/last.pt if it exists. Returns the best epoch's metrics.

    Writes two files into out_dir, each whole: best.pt, the weights of the best epoch so far (by
    strictly higher val AUC) with the description, config, precision, that epoch's metrics and
    the history up to it: what evaluation and export read; and last.pt, the resume state (the
    current weights, optimizer, scheduler, RNG, early-stopping state and history), every
    `checkpoint_every` epochs. A resume repeats the epochs after the last resume state, and
    gives the same results as an uninterrupted run on a CPU.

    After every epoch, report(metrics, history, saved) with `saved` the names of the files
    written that epoch, so a caller (Ray Tune) can snapshot them as a checkpoint.

    The uint8 train and val rows go to a GPU only when they fit in DEVICE_DATA_FRACTION of the
    trial's `gpu_share` of its memory; otherwise they stay on the host (`data.images()`, the
    node's memory map of the cache: never a copy) and each batch is gathered there by row and
    copied over. Both give the same results for a seed. `data_on_device` forces the choice (None:
    by that budget; on a CPU it is always true, and batches are gathered from the memory map).
    """
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    if config.num_workers and device.type == "cpu":
        torch.set_num_threads(config.num_workers)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: pick fastest
    torch.manual_seed(config.seed)  # initial weights and dropout
    generator = torch.Generator(device).manual_seed(config.seed)  # batch order, augmentation

    description = config.description()
    # channels_last: faster convolutions on CPU too, in fp32 and bf16 (bench/cpu_precision.py)
    model = description.build(config.weights).to(device, memory_format=torch.channels_last)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=None if config.pos_weight is None else torch.tensor(config.pos_weight,
                                                                         device=device))
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(batch_sizes(len(data.train_labels), config.batch_size))
    pixels = torch.from_numpy(data.images())
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    ema = make_ema(model, steps_per_epoch) if config.ema else None
    validated = model if ema is None else ema.module  # the weights scored, kept and exported

    if data_on_device is None:
        nbytes = (len(data.train_rows) + len(data.val_rows)) * pixels[0].nbytes
        data_on_device = device.type != "cuda" or fits_on_device(
            nbytes, torch.cuda.get_device_properties(device).total_memory, gpu_share)
    # A dataset that fits on a GPU moves there once and batches are gathered there; otherwise
    # they are gathered by row from the host's pixels. The labels are small and always move.
    train_rows, val_rows = torch.from_numpy(data.train_rows), torch.from_numpy(data.val_rows)
    train_x = val_x = pixels
    batch_device = None if data_on_device else device
    if data_on_device and device.type != "cpu":
        train_x, train_rows = rows_to_device(pixels, train_rows, device), None
        val_x, val_rows = rows_to_device(pixels, val_rows, device), None
    train_y = torch.from_numpy(data.train_labels).to(device)
    val_y = torch.from_numpy(data.val_labels).to(device)

    start_epoch, best, stale, history = 0, {"val_auc": -math.inf}, 0, []
    last = out_dir / runfolder.LAST_CHECKPOINT
    if last.exists():
        state = load_checkpoint(last)
        model.load_state_dict(state["trained_model"] if ema else state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["model"])
            ema.n_averaged.fill_(state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best = state["epoch"] + 1, state["best_metrics"]
        stale, history = state["stale_epochs"], state["history"]

    precision = resolve_precision(config.precision, device)
    weights = {"description": description.to_dict(), "config": config.to_dict(),
               "precision": precision}
    for epoch in range(start_epoch, config.epochs):
        if stale >= config.patience:
            break
        set_backbone_trainable(model, epoch >= config.freeze_backbone_epochs)
        started = time.perf_counter()
        desc = f"epoch {epoch + 1}/{config.epochs}" if progress else None
        train_loss, seen = train_one_epoch(model, criterion, optimizer, scheduler, train_x,
                                           train_y, config, generator, desc, ema, batch_device,
                                           train_rows)
        train_time = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **evaluate(validated, val_x, val_y, description, precision, val_rows),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time": time.perf_counter() - started,
            "images_per_sec": seen / train_time,
        }
        # What a search ranks trials by: not punished for the epochs after the peak.
        metrics["best_val_auc"] = max(m["val_auc"] for m in [*history, metrics])
        history.append(metrics)
        # Early stopping waits for a gain of min_delta; the kept weights are those of the
        # highest val AUC, the first epoch to reach it.
        stale = 0 if metrics["val_auc"] > best["val_auc"] + config.min_delta else stale + 1
        improved = (metrics["val_auc"] > best["val_auc"] or "epoch" not in best
                    or math.isnan(best["val_auc"]))  # a one-class val split gives NaN
        if improved:
            best = metrics
        # Tells a search that the trial ended by itself (not stopped by a scheduler).
        metrics["final_epoch"] = epoch + 1 == config.epochs or stale >= config.patience
        saved = []
        if improved:
            save_checkpoint(out_dir / runfolder.BEST_CHECKPOINT,
                            {"model": validated.state_dict(), **weights, "epoch": epoch,
                             "metrics": metrics, "history": history})
            saved.append(runfolder.BEST_CHECKPOINT)
        # At the end too: `ctscan train` rerun on its folder then has nothing left to do.
        if (epoch + 1) % checkpoint_every == 0 or metrics["final_epoch"]:
            save_checkpoint(last, {
                "model": validated.state_dict(),
                **({"trained_model": model.state_dict(), "ema_updates": int(ema.n_averaged)}
                   if ema is not None else {}),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_metrics": best,
                "stale_epochs": stale,
                "history": history,
                "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
            })
            saved.append(runfolder.LAST_CHECKPOINT)
        if report is not None:
            report(metrics, history, saved)
    return best
