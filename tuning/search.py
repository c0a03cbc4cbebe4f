"""`ctscan tune`: Ray Tune runs many `train_trial`s; Optuna's TPE proposes, ASHA prunes.

The search starts with the space's known-good configs (Optuna's enqueued trials, via
`points_to_evaluate`), then TPE proposes from the space's conditional, define-by-run form. Every
trial is judged by its best val AUC so far: ASHA's rungs and Optuna's values use it, so a trial
is not punished for the epochs after its peak; the checkpoint Ray keeps is still the best
epoch's. `time_budget_s` stops the whole search on time (Ray's own budget).

The decoded dataset goes into Ray's object store once (`tune.with_parameters`); every trial reads
its train/val arrays from there, zero-copy on a node. Each trial reports every epoch with a
checkpoint; Ray keeps the best one by val AUC (and the latest, to resume). A killed driver
resumes with `Tuner.restore`, which restores finished trials, unfinished ones from their
checkpoints, and the Optuna searcher's state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import pyarrow.fs
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from data_utils.cache import CTDataset
from data_utils.sources import DataError
from data_utils.split import Split, split_record
from tuning.config import ConfigError, make_config
from tuning.space import (
    DEFAULT_SPACE,
    NUMBER,
    SearchSpace,
    decode_params,
    load_space,
    startup_trials,
)
from tuning.train import TrialData, train_trial, trial_data

METRIC, MODE = "best_val_auc", "max"  # what trials are ranked, stopped and modelled by
CHECKPOINT_METRIC = "val_auc"  # what the kept checkpoint of a trial is chosen by: its best epoch
HISTORY_KEYS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_auc", "best_val_auc",
                "val_f1", "lr"]
CHECKPOINT_FILE = "last.pt"  # train_trial's resume file; Ray's best checkpoint has the best one


@dataclass
class SearchOptions:
    """Everything that defines a search; saved as search.json so a resume needs only the name."""

    data: str
    num_samples: int = 12  # with a time budget: at most this many
    max_epochs: int = 10
    time_budget_s: float | None = None  # stop the search after this long (per session)
    scheduler: str = "asha"  # asha | fifo (no early stopping; for comparisons)
    grace_period: int = 1
    reduction_factor: int = 3
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 2
    max_failures: int = 2
    storage_path: str = "runs"
    name: str = field(default_factory=lambda: time.strftime("tune-%Y%m%d-%H%M%S"))
    seed: int = 0
    search_space: str = str(DEFAULT_SPACE)
    base_config: dict = field(default_factory=dict)  # fixed training config keys (image size...)
    split: dict = field(default_factory=dict)  # ratios, seed, group_by, positive_class

    @property
    def run_dir(self) -> str:
        return join_uri(self.storage_path, self.name)


def join_uri(storage: str, *parts: str) -> str:
    if "://" in storage:
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage).expanduser().resolve().joinpath(*parts))


def write_text(uri: str, text: str) -> None:
    """Write a small file to a local path or a storage URI (s3://, gs://, ...)."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path + ".tmp") as f:
        f.write(text.encode())
    fs.move(path + ".tmp", path)


def read_text(uri: str) -> str | None:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records trials stopped by the scheduler as PRUNED, not COMPLETE.

    Ray marks every last result done=True, stopped or not; train_trial's `final_epoch` says
    whether the trial ended by itself. Given no result and no error, OptunaSearch tells Optuna
    the trial was pruned, and TPE weighs it by its last intermediate value, as Optuna does.
    Ray hands a trial's last result only to on_trial_complete, so it is recorded as an
    intermediate value first: a trial stopped at its first epoch would otherwise have none,
    and TPE would rank it below every other.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result is not None and not error and trial_id not in self._completed_trials:
            with warnings.catch_warnings():  # a step reported already is ignored: fine
                warnings.filterwarnings("ignore", message="The reported value is ignored")
                self.on_trial_result(trial_id, result)
            if not result.get("final_epoch", False):
                result = None
        super().on_trial_complete(trial_id, result, error)


def trainable(params: dict, data: TrialData, base_config: dict) -> None:
    """One Ray Tune trial: a thin wrapper that runs train_trial and reports every epoch."""
    config = make_config({**base_config, **decode_params(params)})
    if ray.get_gpu_ids() and not torch.cuda.is_available():
        warnings.warn(f"trial was given GPU {ray.get_gpu_ids()} but CUDA is not available; "
                      "training on the CPU", stacklevel=1)
    config.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    resources = tune.get_context().get_trial_resources().required_resources
    config.num_workers = max(1, int(resources.get("CPU", 1)))
    node = ray.get_runtime_context().get_node_id()
    # train_trial works in a private folder; each epoch, Ray copies its last.pt (the full resume
    # state) into storage as that epoch's checkpoint, so the checkpoint Ray keeps by val AUC holds
    # the best weights, and no separate best.pt is written.
    with tempfile.TemporaryDirectory(prefix="ctscan-trial-") as work:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as saved:
                shutil.copy(Path(saved) / CHECKPOINT_FILE, work)

        def report(metrics: dict) -> None:
            with tempfile.TemporaryDirectory(dir=work) as snapshot:
                os.link(Path(work) / CHECKPOINT_FILE, Path(snapshot) / CHECKPOINT_FILE)
                tune.report({**metrics, "node_id": node, "device": config.device},
                            checkpoint=tune.Checkpoint.from_directory(snapshot))

        with warnings.catch_warnings():
            # Arrays from the object store are read-only; training never writes to them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            train_trial(config, data, Path(work), report, save_best=False)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Ray's default packs every parameter into the name


def make_sampler(options: SearchOptions) -> optuna.samplers.TPESampler:
    """TPE for a budget of a few dozen trials at most, several at a time (Optuna's advice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=options.seed, n_startup_trials=startup_trials(options.num_samples),
            multivariate=True, group=True,  # models interactions; keeps the branches apart
            constant_liar=options.max_concurrent > 1)  # parallel proposals spread out


def load_search_space(options: SearchOptions) -> SearchSpace:
    return load_space(Path(options.search_space), options.base_config)


def _tuner_parts(options: SearchOptions, data: TrialData, trainable_fn: Callable):
    space = load_search_space(options)
    resources = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    trainable_with_data = tune.with_resources(
        tune.with_parameters(trainable_fn, data=data, base_config=options.base_config), resources)
    searcher = ConcurrencyLimiter(
        PrunedAwareOptunaSearch(space=space, metric=METRIC, mode=MODE,
                                points_to_evaluate=space.start, sampler=make_sampler(options)),
        max_concurrent=options.max_concurrent)
    if options.scheduler == "fifo":
        scheduler = FIFOScheduler()
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=options.max_epochs,
                                  grace_period=options.grace_period,
                                  reduction_factor=options.reduction_factor)
    tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher,
                                  scheduler=scheduler, num_samples=options.num_samples,
                                  time_budget_s=options.time_budget_s,
                                  trial_dirname_creator=_trial_dirname)
    reporter = tune.CLIReporter(
        # Ray's table looks every column up in every trial: only the unconditional ones.
        parameter_columns=[n for n in space.param_names("arch", "optimizer", "lr", "batch_size")
                           if "[" not in n],
        metric_columns={"training_iteration": "epoch", METRIC: "best val AUC"},
        # Not sort_by_metric: Ray's sort fails on a trial the budget ended before its first report.
        max_report_frequency=30)
    run_config = tune.RunConfig(
        name=options.name,
        storage_path=join_uri(options.storage_path),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_METRIC,
            checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        progress_reporter=reporter,
        verbose=1,
    )
    return trainable_with_data, tune_config, run_config


def run_search(options: SearchOptions, data: TrialData, resume: bool = False,
               trainable_fn: Callable = trainable) -> dict:
    """Run (or resume) the search and return best.json's content (also written to the run).

    trainable_fn is `trainable` except in tests that wrap it (to inject a crash, say).
    """
    # Ray's new console output ignores progress_reporter; the classic table can be trimmed.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Checkpointing every epoch is deliberate (resume, retries); Ray would warn each time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable_with_data, tune_config, run_config = _tuner_parts(options, data, trainable_fn)
    if resume:
        if not tune.Tuner.can_restore(options.run_dir):
            raise ConfigError(f"{options.run_dir}: no search to resume there")
        tuner = tune.Tuner.restore(options.run_dir, trainable=trainable_with_data,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable_with_data, tune_config=tune_config, run_config=run_config)
    started = time.monotonic()
    results = tuner.fit()
    # Ray's budget clock starts with the search and does not stop it before the budget is spent,
    # so a search that took the whole budget is one the budget ended.
    budget_reached = (options.time_budget_s is not None
                      and time.monotonic() - started >= options.time_budget_s)
    prune_checkpoints(results)
    return summarize(options, results, budget_reached)


def prune_checkpoints(results: tune.ResultGrid) -> None:
    """Ray also keeps each trial's latest checkpoint, for resuming; once the search is over only
    the best one per trial is worth its disk (hundreds of MB each for ResNet-50 with AdamW)."""
    for result in results:
        if not result.best_checkpoints:
            continue
        best = result.get_best_checkpoint(CHECKPOINT_METRIC, MODE).path
        for entry in result.filesystem.get_file_info(pyarrow.fs.FileSelector(result.path)):
            if entry.base_name.startswith("checkpoint_") and entry.path != best:
                result.filesystem.delete_dir(entry.path)


def trial_records(results: tune.ResultGrid) -> list[dict]:
    """trials.json: every trial's searched values, status and per-epoch history, best first."""
    records = []
    for result in results:
        frame = result.metrics_dataframe
        # A trial the budget ended before it started, or one that failed before its first
        # report, has no frame or an empty one.
        history = ([] if frame is None or frame.empty
                   else frame[HISTORY_KEYS].to_dict("records"))
        status = ("error" if result.error else "completed" if history and
                  result.metrics.get("final_epoch") else "stopped early")
        config = result.config or {}
        if not (config or history or result.error):
            continue  # proposed, then the budget ended the search before the trial started
        records.append({
            # A trial that failed before reporting has no metrics; its folder still names it.
            "trial_id": result.metrics.get("trial_id") or Path(result.path).name[len("trial_"):],
            "number": config.get(NUMBER),  # 0: the first proposed
            "params": decode_params(config),
            "status": status,
            "epochs": len(history),
            "val_auc": max((h["val_auc"] for h in history), default=float("nan")),
            "history": history,
        })
    return sorted(records, key=lambda r: -r["val_auc"] if r["history"] else 1)


def summarize(options: SearchOptions, results: tune.ResultGrid,
              budget_reached: bool = False) -> dict:
    """best.json: the best trial over all its epochs, its config and its best checkpoint."""
    records = trial_records(results)
    if not any(r["history"] for r in records):
        raise DataError(f"{options.run_dir}: no trial finished an epoch; nothing to evaluate "
                        "(see the trials' error.txt, or give the search more time)")
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
    checkpoint = best.get_best_checkpoint(CHECKPOINT_METRIC, MODE)
    history = best.metrics_dataframe
    top = history.loc[history[CHECKPOINT_METRIC].idxmax()]
    params = decode_params(best.config)
    config = make_config({**options.base_config, **params})
    searched = load_search_space(options).searched_keys()
    statuses = [r["status"] for r in records]
    summary = {
        "trial_id": best.metrics["trial_id"],
        "config": asdict(config),
        "searched": {k: asdict(config)[k] for k in searched if k in params},
        "val_metrics": {k: float(top[k]) for k in
                        ("val_auc", "val_loss", "val_accuracy", "val_f1", "train_loss")},
        "best_epoch": int(top["epoch"]),
        "checkpoint": f"{checkpoint.path}/{CHECKPOINT_FILE}",
        "trials": len(records),
        "trials_stopped_early": statuses.count("stopped early"),
        "errored_trials": statuses.count("error"),
        "time_budget_s": options.time_budget_s,
        "budget_reached": budget_reached,
    }
    write_text(join_uri(options.run_dir, "best.json"), json.dumps(summary, indent=2) + "\n")
    write_text(join_uri(options.run_dir, "trials.json"), json.dumps(records, indent=1) + "\n")
    return summary


def prepare_run(options: SearchOptions, ds: CTDataset, split: Split,
                resume: bool = False) -> TrialData:
    """Write split.json and search.json into the run; return what trials get (no test rows)."""
    record = json.dumps(split_record(split, ds), indent=2) + "\n"
    split_uri = join_uri(options.run_dir, "split.json")
    if resume and read_text(split_uri) != record:
        raise DataError(f"{options.data} no longer gives the split this search started with "
                        f"({split_uri}); the data or the code changed")
    write_text(split_uri, record)
    write_text(join_uri(options.run_dir, "search.json"), json.dumps(asdict(options), indent=2))
    return trial_data(ds, split)


def load_options(run_dir: str) -> SearchOptions:
    text = read_text(join_uri(run_dir, "search.json"))
    if text is None:
        raise ConfigError(f"{run_dir}: not a ctscan search (no search.json)")
    return SearchOptions(**json.loads(text))
