"""TensorBoard logging, the same in `ctscan train` and in every trial of `ctscan tune`.

A run logs only what a person compares runs by (SCALARS) plus one grid of augmented inputs. A
search also declares its hyperparameters and metrics for the HParams dashboard, and each trial's
run opens and closes an HParams session; the winner's report goes into a run of its own.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import torch
from tensorboard import manager
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torchvision.io import read_image
from torchvision.utils import make_grid

from data_utils.augment import train_batches
from tuning.config import TrainConfig, coerce
from tuning.train import Reporter

if TYPE_CHECKING:  # only a type here, and matplotlib is slow to import
    from matplotlib.figure import Figure

# Every scalar a run logs, by the key train_trial reports it under; at most a dozen, so they fit
# on TensorBoard's first page.
SCALARS = ("train_loss", "val_loss", "val_auc", "best_val_auc", "val_accuracy", "val_f1", "lr",
           "images_per_sec", "epoch_time")
# HParams reads a metric's value as its scalar's last value: best_val_auc's is the trial's best
# epoch (what best.json reports and trials are ranked by); the others are the last epoch's.
HPARAMS_METRICS = {"best_val_auc": "best val AUC", "val_auc": "val AUC (last epoch)",
                   "val_loss": "val loss (last epoch)", "val_f1": "val F1 (last epoch)",
                   "val_accuracy": "val accuracy (last epoch)", "epoch_time": "epoch time (s)"}
# How a trial's HParams session ends, by trials.json's status. TensorBoard has four statuses
# and none for a session someone stopped, so the two kinds of stopping take the two left.
COMPLETED = api_pb2.STATUS_SUCCESS
FAILED = api_pb2.STATUS_FAILURE
# ASHA judged it worse and stopped it: not "Success", since it did not run its epochs.
STOPPED_EARLY = api_pb2.STATUS_UNKNOWN
# Still running when the time budget ended the search: "Running" is what it was doing then; it
# was never judged worse, and may be the winner. The session is closed, with its end time.
ENDED_BY_BUDGET = api_pb2.STATUS_RUNNING
# A figure's link in report.md, ![alt](relative path), and a link to one of its own headings.
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
ANCHOR_LINK = re.compile(r"\[([^\]]+)\]\(#[^)\s]*\)")


def open_run(log_dir: Path, config: TrainConfig, train_images: torch.Tensor,
             train_labels: torch.Tensor) -> SummaryWriter:
    """A writer for one training run, which has logged its config and one grid of augmented
    inputs (the first 64 training images, as the run's first batch would augment them)."""
    writer = SummaryWriter(str(log_dir))
    generator = torch.Generator().manual_seed(config.seed)
    description = config.description()
    x, _ = next(train_batches(train_images[:64], train_labels[:64], 32, config.aug_strength,
                              description.mean, description.std, generator))
    grid = make_grid(x * description.std + description.mean, nrow=8).clamp(0, 1)
    # Named to sort between the scalars: TensorBoard lists tags by name, and a grid first would
    # push every curve below the fold.
    writer.add_image("training_inputs_augmented", grid, 0)
    writer.add_text("config", config_text(config))
    writer.flush()
    return writer


def _short(value):
    """A float with 4 significant digits (a sampled lr has 16); anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def config_text(config: TrainConfig) -> str:
    """The config as a markdown code block, without the keys that do not act on this run."""
    return "\n".join(f"    {k}: {_short(v)}" for k, v in config.acting().items())


def log_epoch(writer: SummaryWriter, metrics: dict) -> None:
    """The SCALARS among an epoch's metrics (a Ray result carries many more keys)."""
    for key in SCALARS:
        if key in metrics:
            writer.add_scalar(key, metrics[key], metrics["epoch"])
    writer.flush()


def tensorboard_reporter(log_dir: Path, config: TrainConfig, train_images: torch.Tensor,
                         train_labels: torch.Tensor) -> Reporter:
    """A train_trial report callback writing each epoch's SCALARS; logs one grid of augmented
    inputs now."""
    writer = open_run(log_dir, config, train_images, train_labels)
    return lambda metrics, history, saved: log_epoch(writer, metrics)


def _hparam_value(key: str, value):
    """`value` typed as config key `key`. TensorBoard shows every number with 5 significant digits
    (batch size 64 as "64.000"), so integers, like head sizes, are shown as text."""
    value = coerce(key, value)
    if isinstance(value, bool | float | str):
        return value
    return json.dumps(value)


# The hyperparameters a reader compares trials by first, most telling first.
SHOWN_FIRST = ("lr", "arch", "optimizer", "batch_size", "weight_decay", "head", "dropout",
               "aug_strength")


def _domains(spec: dict, domains: dict) -> dict:
    """Config key -> every value a choice or randint gives it, or the (low, high) its uniform or
    loguniform ranges cover, over every branch of a search space's spec."""
    for key, value in spec.items():
        if not isinstance(value, dict):
            continue
        kind, args = next(iter(value.items()))
        if kind == "choice":
            domains.setdefault(key, []).extend(args)
            if isinstance(args, dict):
                for sub in args.values():
                    _domains(sub or {}, domains)
        elif kind == "randint":
            domains.setdefault(key, []).extend(range(args[0], args[1] + 1))
        else:
            low, high = domains.get(key, args)
            domains[key] = (min(low, args[0]), max(high, args[1]))
    return domains


def _numbers_first(value) -> tuple:
    """Numbers in numeric order (also those shown as text), then the rest as the space lists
    them (a stable sort)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return 0, value
    return 1, 0


def hparam_infos(spec: dict) -> list[api_pb2.HParamInfo]:
    """Every hyperparameter a search space searches, with its domain.

    TensorBoard's HParams pane ticks only five hyperparameters when it opens (a fixed
    `Math.min(5, ...)` in its frontend), those that `differs` first and then by name; the rest
    are one click away. So `differs` marks the five that most change a ResNet's result
    (SHOWN_FIRST order, then the space's), instead of the first five of the alphabet.
    """
    domains = _domains(spec, {})
    ranked = sorted(domains, key=lambda k: SHOWN_FIRST.index(k) if k in SHOWN_FIRST
                    else len(SHOWN_FIRST))
    infos = []
    for key, domain in domains.items():
        info = api_pb2.HParamInfo(name=key, differs=key in ranked[:5])
        if isinstance(domain, tuple):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value, info.domain_interval.max_value = domain
        else:
            values = list(dict.fromkeys(_hparam_value(key, v)
                                        for v in sorted(domain, key=_numbers_first)))
            kinds = {type(v) for v in values}
            info.type = (api_pb2.DATA_TYPE_BOOL if kinds == {bool} else
                         api_pb2.DATA_TYPE_FLOAT64 if kinds == {float} else
                         api_pb2.DATA_TYPE_STRING)
            info.domain_discrete.extend(values)
        infos.append(info)
    return infos


def _hparams_summary(tag: str, **data) -> Summary:
    """An HParams plugin summary, built as tensorboard.plugins.hparams.summary builds it (that
    module needs TensorFlow)."""
    return Summary(value=[Summary.Value(
        tag=tag, tensor=metadata.NULL_TENSOR,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data)))])


def declare_search(log_dir: Path, spec: dict) -> None:
    """The HParams experiment of a search: its hyperparameters, and its metrics with the best val
    AUC first (TensorBoard colours and sorts by the first)."""
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name)
               for tag, name in HPARAMS_METRICS.items()]
    experiment = api_pb2.Experiment(hparam_infos=hparam_infos(spec), metric_infos=metrics,
                                    time_created_secs=time.time())
    with SummaryWriter(str(log_dir)) as writer:
        writer.file_writer.add_summary(_hparams_summary(metadata.EXPERIMENT_TAG,
                                                        experiment=experiment))


def start_session(writer: SummaryWriter, params: dict, searched: list[str]) -> None:
    """Open a trial's HParams session with its values of the searched config keys."""
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key in searched:
        if key not in params:  # not on this trial's branch of the space
            continue
        value = _hparam_value(key, params[key])
        kind = ("bool_value" if isinstance(value, bool) else
                "number_value" if isinstance(value, float) else "string_value")
        setattr(start.hparams[key], kind, value)
    writer.file_writer.add_summary(_hparams_summary(metadata.SESSION_START_INFO_TAG,
                                                    session_start_info=start))
    writer.flush()


def end_session(writer: SummaryWriter, status: int) -> None:
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    writer.file_writer.add_summary(_hparams_summary(metadata.SESSION_END_INFO_TAG,
                                                    session_end_info=end))
    writer.close()


def report_text(report_md: str, figures: dict[str, Figure], gradcams: list[Path]) -> str:
    """report.md as TensorBoard's Text tab can show it. Its figure links are relative to
    report.md, which TensorBoard does not serve (404s), and its text sanitizer drops data: URIs:
    each link becomes a line naming the figure's tag in the Images tab. Headings get no anchors
    there, so a link to one is left as its text."""
    tags = {name: f"results/{name}" for name in figures}
    tags.update({path.stem: f"gradcam/{path.stem}" for path in gradcams})

    def where(link: re.Match) -> str:
        alt, target = link[1], unquote(link[2])
        tag = tags.get(Path(target).stem)
        place = f"Images tab, tag `{tag}`" if tag else f"`{target}`, beside report.md"
        return f"*{alt}: {place}.*"

    return ANCHOR_LINK.sub(r"\1", IMAGE_LINK.sub(where, report_md))


def log_report(log_dir: Path, figures: dict[str, Figure], gradcams: list[Path],
               report_md: str) -> None:
    """The winner's report as a run of its own: the figures, the Grad-CAM overlays and
    report.md (the text dashboard renders its markdown; `report_text`). An earlier evaluation's
    events are removed: TensorBoard would show both reports in one run."""
    for stale in Path(log_dir).glob("events.out.tfevents.*"):
        stale.unlink()
    with SummaryWriter(str(log_dir)) as writer:
        for name, fig in figures.items():
            # close=False: the figures are the caller's, who may still use them.
            writer.add_figure(f"results/{name}", fig, close=False)
        for path in gradcams:
            writer.add_image(f"gradcam/{path.stem}", read_image(str(path))[:3])
        writer.add_text("report", report_text(report_md, figures, gradcams))


def start_tensorboard(logdir: str) -> str:
    """Start TensorBoard on `logdir` in the background, on a port the OS picks, or find one
    already serving it; returns a line saying where it is, or why it did not start. It keeps
    running after the search ends, so the finished search can be looked at."""
    # The `tensorboard` next to this Python: a virtual environment's bin/ may not be on PATH.
    binary = Path(sys.executable).with_name("tensorboard")
    if binary.is_file():
        os.environ.setdefault("TENSORBOARD_BINARY", str(binary))
    started = manager.start(["--logdir", logdir, "--port", "0"],
                            timeout=datetime.timedelta(seconds=30))
    if isinstance(started, manager.StartLaunched | manager.StartReused):
        return (f"TensorBoard at http://localhost:{started.info.port}/ (process "
                f"{started.info.pid}; stop it with: kill {started.info.pid})")
    if isinstance(started, manager.StartFailed):
        last = (started.stderr or "").strip().splitlines()[-1:]
        return f"TensorBoard did not start: {last[0] if last else started.exit_code}"
    if isinstance(started, manager.StartExecFailed):
        return f"TensorBoard did not start: {started.os_error}"
    return f"TensorBoard did not answer within 30 s (process {started.pid})"
