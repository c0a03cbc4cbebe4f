"""TensorBoard logging, the same in `ctscan train` and in every trial of `ctscan tune`.

A run logs only what a person compares runs by (SCALARS) plus one grid of augmented inputs. A
search also declares its hyperparameters and metrics for the HParams dashboard, and each trial's
run opens and closes an HParams session; after evaluation every trial's run is marked with its
weight in the exported model, its status and its epochs, and the exported model's report goes
into a run of its own.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

import torch
from tensorboard import manager
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torchvision.io import read_image
from torchvision.utils import make_grid

from data_utils import runfolder
from data_utils.augment import train_batches
from tuning.config import TrainConfig, coerce
from tuning.records import load_options, load_search_space
from tuning.space import values_off_draw
from tuning.train import Reporter

if TYPE_CHECKING:  # only a type here, and matplotlib is slow to import
    from matplotlib.figure import Figure

# Every scalar a run logs: the key train_trial reports it under -> its tag. At most a dozen, so
# they fit on TensorBoard's first page; TensorBoard groups cards by the tag's first part, so the
# train and val loss sit together, as do the val AUCs.
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_auc": "auc/val",
           "best_val_auc": "auc/val_best", "val_accuracy": "val/accuracy", "val_f1": "val/f1",
           "lr": "train/lr", "images_per_sec": "speed/images_per_sec",
           "epoch_time": "speed/epoch_time_s"}
# A trial's marks, for the HParams table to sort and filter by: its weight in the exported model
# (0: not a member, or not evaluated yet), its trials.json status as a number (STATUS_CODES)
# and the epochs it trained. Logged as the search goes and again, final, after evaluation.
WEIGHT, STATUS_CODE, EPOCHS_TRAINED = "ensemble/weight", "trial/status_code", "trial/epochs_trained"
# Higher is further: a trial that ran its epochs, one the clock ended, one ASHA stopped, one that
# failed; a trial still running has not ended at all.
STATUS_CODES = {"completed": 3, "budget": 2, "stopped early": 1, "error": 0, "running": -1}
# HParams reads a metric's value as its scalar's last value: best val AUC's is the trial's best
# epoch (what best.json reports and trials are ranked by); the others are the last epoch's. Its
# pane shows the first five metrics at first (a fixed limit of its frontend): the best val AUC
# and the marks, which tell the exported model's members and how each trial ended.
HPARAMS_METRICS = {
    # Short names: parallel coordinates print them side by side above their axes (the status
    # codes are in README's TensorBoard section).
    SCALARS["best_val_auc"]: "best val AUC", WEIGHT: "ensemble weight",
    STATUS_CODE: "status code", EPOCHS_TRAINED: "epochs trained",
    SCALARS["val_auc"]: "val AUC (last epoch)",
    SCALARS["val_loss"]: "val loss (last epoch)", SCALARS["val_f1"]: "val F1 (last epoch)",
    SCALARS["val_accuracy"]: "val accuracy (last epoch)",
    SCALARS["epoch_time"]: "epoch time (s)"}
# How a trial's HParams session ends, by trials.json's status. TensorBoard has four statuses
# and none for a session someone stopped, so the two kinds of stopping take the two left:
# ASHA judged it worse and stopped it, "Unknown": not "Success", since it did not run its epochs;
# still running when the time budget ended the search, "Running": what it was doing then. It was
# never judged worse, and may be the winner; the session is closed, with its end time.
SESSION_STATUS = {"completed": api_pb2.STATUS_SUCCESS, "error": api_pb2.STATUS_FAILURE,
                  "stopped early": api_pb2.STATUS_UNKNOWN, "budget": api_pb2.STATUS_RUNNING}
# The search's HParams experiment, in the run's root under a name of its own, so that a resumed
# search and the evaluation find it there (also in a bucket); TensorBoard reads any file with
# "tfevents" in its name.
EXPERIMENT_EVENTS = "events.out.tfevents.hparams-experiment"
# The marks an evaluation writes into each trial's run, under a name that sorts after the
# trial's own events (TensorBoard reads a run's files in name order, and HParams the last value).
MARKS_EVENTS = "events.out.tfevents.marks-after-evaluation"
# What the printed URL opens: Time Series without smoothing (curves of a few epochs, smoothed at
# TensorBoard's default 0.6, show a best AUC of 0.986 as 0.92) and only the trials' runs (the
# run `.` holds the HParams declaration, results/... the report: neither has curves).
URL_QUERY = {"smoothing": "0", "runFilter": "^trial_"}
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
    for key, tag in SCALARS.items():
        if key in metrics:
            writer.add_scalar(tag, metrics[key], metrics["epoch"])
    writer.flush()


def log_marks(writer: SummaryWriter, step: int, marks: dict[str, float]) -> None:
    """A trial's marks (WEIGHT, STATUS_CODE, EPOCHS_TRAINED: value) at `step`, its epoch: HParams
    shows the last."""
    for tag, value in marks.items():
        writer.add_scalar(tag, value, step)
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


def hparam_infos(spec: dict, base_config: dict) -> list[api_pb2.HParamInfo]:
    """Every hyperparameter a search space searches, with its domain: what its distributions
    draw, and the values a trial that does not draw it shows (`space.values_off_draw`; the
    run's fixed keys, base_config, are part of them).

    TensorBoard's HParams pane ticks only five hyperparameters when it opens (a fixed
    `Math.min(5, ...)` in its frontend), those that `differs` first and then by name; the rest
    are one click away. So `differs` marks the five that most change a ResNet's result
    (SHOWN_FIRST order, then the space's), instead of the first five of the alphabet.
    """
    domains = _domains(spec, {})
    for key, values in values_off_draw(spec, base_config).items():
        domain = domains[key]
        domains[key] = ((min(*domain, *values), max(*domain, *values))
                        if isinstance(domain, tuple) else [*domain, *values])
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


def declare_search(log_dir: Path, spec: dict, base_config: dict) -> None:
    """The HParams experiment of a search: its hyperparameters, and its metrics with the best val
    AUC first (TensorBoard colours and sorts by the first)."""
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name)
               for tag, name in HPARAMS_METRICS.items()]
    experiment = api_pb2.Experiment(hparam_infos=hparam_infos(spec, base_config),
                                    metric_infos=metrics, time_created_secs=time.time())
    with SummaryWriter(str(log_dir)) as writer:
        writer.file_writer.add_summary(_hparams_summary(metadata.EXPERIMENT_TAG,
                                                        experiment=experiment))


def _declared_metrics(events: bytes) -> set[str]:
    """The metric tags an experiment file declares."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / EXPERIMENT_EVENTS
        path.write_bytes(events)
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == metadata.EXPERIMENT_TAG:
                    experiment = metadata.parse_experiment_plugin_data(
                        value.metadata.plugin_data.content)
                    return {m.name.tag for m in experiment.metric_infos}
    return set()


def declare_experiment(run_dir: str, spec: dict, base_config: dict) -> None:
    """Declare the search's HParams experiment (`declare_search`) in the run's root, unless it
    holds one with every metric of HPARAMS_METRICS: a resumed search keeps its declaration, and
    one an older ctscan declared, without the marks, is declared again (TensorBoard reads one
    declaration, the first it finds; a TensorBoard already running shows the new columns once
    restarted)."""
    target = runfolder.join(run_dir, EXPERIMENT_EVENTS)
    declared = runfolder.read_bytes(target)
    if declared is not None and set(HPARAMS_METRICS) <= _declared_metrics(declared):
        return
    with tempfile.TemporaryDirectory() as folder:
        declare_search(Path(folder), spec, base_config)
        [events] = Path(folder).iterdir()
        runfolder.write_bytes(target, events.read_bytes())


def start_session(writer: SummaryWriter, params: dict, searched: list[str]) -> None:
    """Open a trial's HParams session with its values of the searched config keys (`params`:
    every one of them, `space.params_in_force`), and its marks as of its start: parallel
    coordinates leave out a trial that lacks a value of any column shown."""
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key in searched:
        value = _hparam_value(key, params[key])
        kind = ("bool_value" if isinstance(value, bool) else
                "number_value" if isinstance(value, float) else "string_value")
        setattr(start.hparams[key], kind, value)
    writer.file_writer.add_summary(_hparams_summary(metadata.SESSION_START_INFO_TAG,
                                                    session_start_info=start))
    log_marks(writer, 0, {WEIGHT: 0.0, STATUS_CODE: STATUS_CODES["running"],
                          EPOCHS_TRAINED: 0})


def end_session(writer: SummaryWriter, status: str, epochs: int) -> None:
    """Close a trial's session with its trials.json status (SESSION_STATUS), marked at its last
    epoch."""
    log_marks(writer, epochs, {STATUS_CODE: STATUS_CODES[status]})
    end = plugin_data_pb2.SessionEndInfo(status=SESSION_STATUS[status],
                                         end_time_secs=time.time())
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


def _trial_folder(run_dir: str, trial: dict) -> str | None:
    """A trials.json record's run folder: recorded, or in an older ctscan's trials.json the one
    holding its checkpoint (None for such a trial that failed before its first checkpoint)."""
    if "folder" in trial:
        return runfolder.in_run(run_dir, trial["folder"])
    if trial.get("checkpoint"):
        return runfolder.parent_of(runfolder.parent_of(runfolder.in_run(run_dir,
                                                                        trial["checkpoint"])))
    return None


def exported_model_run(weights: dict[str, float]) -> str:
    """The name of the exported model's run: what it is, not the name of one of its members."""
    return "exported_model" if len(weights) == 1 else f"exported_ensemble_of_{len(weights)}"


def mark_trials(run_dir: str, trials: list[dict], weights: dict[str, float]) -> None:
    """Every trial's final marks after an evaluation, in its run (file MARKS_EVENTS, replaced by
    the next evaluation): its weight in the exported model (`weights`: trial id -> weight; 0 for
    the others), its trials.json status and epochs. Each is at the trial's last epoch, at or
    after the marks it logged during the search, so HParams shows these. Also declares the
    metrics in an older search's experiment (`declare_experiment`)."""
    options = load_options(run_dir)
    declare_experiment(run_dir, load_search_space(options).spec, options.base_config)
    for trial in trials:
        folder = _trial_folder(run_dir, trial)
        if folder is None:
            continue
        with tempfile.TemporaryDirectory() as local:
            with SummaryWriter(local) as writer:
                log_marks(writer, trial["epochs"], {
                    WEIGHT: weights.get(trial["trial_id"], 0.0),
                    STATUS_CODE: STATUS_CODES[trial["status"]],
                    EPOCHS_TRAINED: trial["epochs"]})
            [events] = Path(local).iterdir()
            runfolder.write_bytes(runfolder.join(folder, MARKS_EVENTS), events.read_bytes())


def log_report(run_dir: str, results_dir: Path, metrics: dict, trials: list[dict],
               figures: dict[str, Figure], gradcams: list[Path], report_md: str) -> None:
    """After an evaluation: every trial's run marked (`mark_trials`), and the exported model's
    report as a run of its own in results_dir (`exported_model_run`): which trials it holds with
    which weights, the figures, the Grad-CAM overlays and report.md (the text dashboard renders
    its markdown; `report_text`). An earlier evaluation's report runs are removed: TensorBoard
    would show two reports (also one an older ctscan named winner_trial_ID)."""
    weights = {m["trial_id"]: m["weight"] for m in metrics["ensemble"]["members"]}
    mark_trials(run_dir, trials, weights)
    for stale in [*results_dir.glob("exported_*/events.out.tfevents.*"),
                  *results_dir.glob("winner_trial_*/events.out.tfevents.*")]:
        stale.unlink()
    folders = {t["trial_id"]: runfolder.name_of(folder) for t in trials
               if (folder := _trial_folder(run_dir, t))}
    members = ", ".join(f"`{folders.get(trial_id, trial_id)}` (weight {weight:.2f})"
                        for trial_id, weight in weights.items())
    what = (f"**Exported model**: trial {members}" if len(weights) == 1 else
            f"**Exported model**: the weighted ensemble of {len(weights)} trials: {members}. "
            f"Each trial's run carries its weight as `{WEIGHT}`.")
    with SummaryWriter(str(results_dir / exported_model_run(weights))) as writer:
        for name, fig in figures.items():
            # close=False: the figures are the caller's, who may still use them.
            writer.add_figure(f"results/{name}", fig, close=False)
        for path in gradcams:
            writer.add_image(f"gradcam/{path.stem}", read_image(str(path))[:3])
        writer.add_text("report", what + "\n\n" + report_text(report_md, figures, gradcams))


def tensorboard_url(port: int = 6006) -> str:
    """TensorBoard's address on this machine (6006: its default port), opening as URL_QUERY
    says. Its "ignore outliers" setting (on by default: it can push the best curve off a chart)
    has no URL parameter; it is a tick box in the settings pane, which the browser remembers."""
    query = "&".join(f"{k}={quote(v)}" for k, v in URL_QUERY.items())
    return f"http://localhost:{port}/?{query}#timeseries"


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
        return (f"TensorBoard at {tensorboard_url(started.info.port)} (process "
                f"{started.info.pid}; stop it with: kill {started.info.pid})")
    if isinstance(started, manager.StartFailed):
        last = (started.stderr or "").strip().splitlines()[-1:]
        return f"TensorBoard did not start: {last[0] if last else started.exit_code}"
    if isinstance(started, manager.StartExecFailed):
        return f"TensorBoard did not start: {started.os_error}"
    return f"TensorBoard did not answer within 30 s (process {started.pid})"
