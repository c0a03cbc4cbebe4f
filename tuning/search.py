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

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import pyarrow.fs
import ray
import torch
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_utils import runfolder
from data_utils.cache import CTDataset
from data_utils.sources import DataError
from data_utils.split import Split, split_changes, split_record
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
    storage_path: str = "runs"  # a local folder (made absolute), a shared path or a URI
    name: str = field(default_factory=lambda: time.strftime("tune-%Y%m%d-%H%M%S"))
    seed: int = 0
    search_space: str = str(DEFAULT_SPACE)
    base_config: dict = field(default_factory=dict)  # fixed training config keys (image size...)
    split: dict = field(default_factory=dict)  # ratios, seed, group_by, positive_class

    @property
    def run_dir(self) -> str:
        return runfolder.join(self.storage_path, self.name)


class SearchFailed(RuntimeError):
    """The search ended without a single trial that finished an epoch."""


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
            train_trial(config, data, Path(work), report, save_best=False,
                        gpu_share=resources.get("GPU") or 1.0)


def _trial_dirname(trial) -> str:
    """trial_NUMBER-ARCH-ID, say trial_003-resnet18-93b1ef24: TensorBoard names each trial's run
    by this folder, in this order. (Ray's default packs every parameter into the name.)"""
    params = trial.config or {}
    number = f"{params[NUMBER]:03d}" if NUMBER in params else None
    parts = [number, decode_params(params).get("arch"), trial.trial_id]
    return "trial_" + "-".join(p for p in parts if p is not None)


def _trial_id(trial_dirname: str) -> str:
    return trial_dirname.rsplit("-", 1)[-1].removeprefix("trial_")


class TrialTensorBoard(tune.Callback):
    """Logs each trial on the driver into the trial's folder (Ray syncs it to storage with the
    trial's other files, also to a bucket): the same scalars and input grid as `ctscan train`,
    and an HParams session from its start to its end, with how it ended. Ray's own TensorBoard
    logger is off: it logs every result key and marks every session a success.

    Pickled with the tuner (so a resumed search logs the same way): only a sample of the training
    images for the grid is kept, not the dataset. tuning.monitor is imported where it is used:
    every trial worker imports this module, and on a busy machine TensorBoard's imports delay
    each trial's start by a second.
    """

    def __init__(self, space: SearchSpace, base_config: dict, data: TrialData):
        self.space, self.base_config = space, base_config
        self.grid_images = torch.from_numpy(data.train_images[:64].copy())
        self.grid_labels = torch.from_numpy(data.train_labels[:64].copy())
        self.writers = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "writers": {}}  # open files do not pickle

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        from tuning import monitor

        if trial.trial_id in self.writers:  # restarted after a failure: same run, same session
            return
        if not self.writers:  # the search's first trial, or the first one after a resume
            monitor.declare_search(Path(trial.local_path).parent, self.space.spec)
        params = decode_params(trial.config)
        writer = monitor.open_run(Path(trial.local_path),
                                  make_config({**self.base_config, **params}),
                                  self.grid_images, self.grid_labels)
        monitor.start_session(writer, params, self.space.searched_keys())
        self.writers[trial.trial_id] = writer

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info) -> None:
        from tuning import monitor

        if trial.trial_id in self.writers:  # not a result replayed from before a resume
            monitor.log_epoch(self.writers[trial.trial_id], result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        from tuning import monitor

        # A trial the scheduler stopped is "complete" to Ray, but it did not end by itself.
        ended = trial.last_result.get("final_epoch", False)
        self._end(trial, monitor.COMPLETED if ended else monitor.STOPPED_EARLY)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        from tuning import monitor

        self._end(trial, monitor.FAILED)

    def _end(self, trial, status: int) -> None:
        from tuning import monitor

        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            monitor.end_session(writer, status)


def make_sampler(options: SearchOptions) -> optuna.samplers.TPESampler:
    """TPE for a budget of a few dozen trials at most, several at a time (Optuna's advice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=options.seed, n_startup_trials=startup_trials(options.num_samples),
            multivariate=True, group=True,  # models interactions; keeps the branches apart
            constant_liar=options.max_concurrent > 1)  # parallel proposals spread out


def load_search_space(options: SearchOptions) -> SearchSpace:
    """The run's own copy of its space once the run exists (so a resume needs no other file),
    the user's file before."""
    copy = runfolder.join(options.run_dir, runfolder.SPACE)
    return load_space(copy if runfolder.exists(copy) else options.search_space,
                      options.base_config)


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
        storage_path=runfolder.join(options.storage_path),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_METRIC,
            checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        progress_reporter=reporter,
        # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS (set in run_search) drops Ray's TensorBoard logger
        # with the others; result.json and progress.csv are still wanted.
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(),
                   TrialTensorBoard(space, options.base_config, data)],
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
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # TrialTensorBoard logs instead
    trainable_with_data, tune_config, run_config = _tuner_parts(options, data, trainable_fn)
    if resume:
        if not tune.Tuner.can_restore(options.run_dir):
            raise ConfigError(f"{options.run_dir}: no search to resume there")
        tuner = tune.Tuner.restore(options.run_dir, trainable=trainable_with_data,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable_with_data, tune_config=tune_config, run_config=run_config)
    started = time.monotonic()
    with _ctrl_c_ends_the_search():
        results = tuner.fit()
    # Ray's budget clock starts with the search and does not stop it before the budget is spent,
    # so a search that took the whole budget is one the budget ended.
    budget_reached = (options.time_budget_s is not None
                      and time.monotonic() - started >= options.time_budget_s)
    prune_checkpoints(results)
    return summarize(options, results, budget_reached)


@contextmanager
def _ctrl_c_ends_the_search() -> Iterator[None]:
    """Ray Tune's Ctrl-C handler stops the trials and saves the experiment state, so the search
    resumes with nothing lost, and then returns as if the search had finished. It puts back the
    handler it found only when it caught a Ctrl-C, so finding ours back means the search was
    interrupted: it must then end as an interruption, never be scored as a finished search."""
    if threading.current_thread() is not threading.main_thread():  # no signals there
        yield
        return

    def interrupt(signum: int, frame) -> None:  # a second Ctrl-C: stop at once
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
        if signal.getsignal(signal.SIGINT) is interrupt:
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def _sees(path: str) -> bool:
    return os.path.exists(path)


def unshared_nodes(folder: str) -> list[str]:
    """The live Ray nodes that do not see the local `folder` as this process does, each as
    "IP (node id)"; none on a single-node cluster."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return []
    probe = Path(folder).expanduser().resolve() / f".ctscan-probe-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.touch()
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe)) for n in nodes])
    finally:
        probe.unlink()
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})"
            for n, ok in zip(nodes, seen, strict=True) if not ok]


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


def _error_line(error: BaseException) -> str:
    """The last line of a trial's error: the exception itself, below Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_records(results: tune.ResultGrid, run_dir: str) -> list[dict]:
    """trials.json: every trial's searched values, status, error and per-epoch history, best
    first; trials that failed before reporting come last."""
    records = []
    for result in results:
        frame = result.metrics_dataframe
        # A trial the budget ended before it started, or one that failed before its first
        # report, has no frame or an empty one.
        history = ([] if frame is None or frame.empty or CHECKPOINT_METRIC not in frame
                   else frame[HISTORY_KEYS].to_dict("records"))
        status = ("error" if result.error else "completed" if history and
                  result.metrics.get("final_epoch") else "stopped early")
        config = result.config or {}
        if not (config or history or result.error):
            continue  # proposed, then the budget ended the search before the trial started
        trial_dir = runfolder.name_of(result.path)
        kept = (result.get_best_checkpoint(CHECKPOINT_METRIC, MODE)
                if result.best_checkpoints else None)
        records.append({
            # A trial that failed before reporting has no metrics; its folder still names it.
            "trial_id": _trial_id(trial_dir),
            "number": config.get(NUMBER),  # 0: the first proposed
            "params": decode_params(config),
            "status": status,
            "epochs": len(history),
            "val_auc": max((h["val_auc"] for h in history), default=float("nan")),
            # Its best epoch's weights: the ensemble of the top trials is built from these.
            "checkpoint": runfolder.join(run_dir, trial_dir, runfolder.name_of(kept.path),
                                         CHECKPOINT_FILE) if kept else None,
            **({"error": _error_line(result.error),
                "error_file": runfolder.join(run_dir, trial_dir, "error.txt")}
               if result.error else {}),
            "history": history,
        })
    return sorted(records, key=lambda r: -r["val_auc"] if r["history"] else 1)


def _no_trial_reported(records: list[dict], run_dir: str) -> SearchFailed:
    failed = [r for r in records if "error" in r]
    if not failed:
        return SearchFailed(f"{run_dir}: no trial finished an epoch; give the search more time")
    first = min(failed, key=lambda r: r["number"] if r["number"] is not None else 1 << 30)
    return SearchFailed(f"no trial finished an epoch; trial {first['trial_id']} failed with "
                        f"{first['error']} (see {first['error_file']})")


def summarize(options: SearchOptions, results: tune.ResultGrid,
              budget_reached: bool = False) -> dict:
    """best.json: the best trial, its best checkpoint and exactly that epoch's metrics."""
    records = trial_records(results, options.run_dir)
    runfolder.write_json(runfolder.join(options.run_dir, runfolder.TRIALS), records)
    if not any(r["history"] for r in records):
        raise _no_trial_reported(records, options.run_dir)
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
    checkpoint = best.get_best_checkpoint(CHECKPOINT_METRIC, MODE)
    # The metrics Ray stored with that very checkpoint: on tied val AUCs, Ray keeps the later
    # epoch's, and best.json must describe the weights it points to.
    top = next(m for c, m in best.best_checkpoints if c.path == checkpoint.path)
    params = decode_params(best.config)
    config = make_config({**options.base_config, **params})
    searched = load_search_space(options).searched_keys()
    statuses = [r["status"] for r in records]
    summary = {
        "trial_id": top["trial_id"],
        "config": asdict(config),
        "searched": {k: asdict(config)[k] for k in searched if k in params},
        "val_metrics": {k: float(top[k]) for k in
                        ("val_auc", "val_loss", "val_accuracy", "val_f1", "train_loss")},
        "best_epoch": int(top["epoch"]),
        "checkpoint": runfolder.join(options.run_dir, runfolder.name_of(best.path),
                                     runfolder.name_of(checkpoint.path), CHECKPOINT_FILE),
        "trials": len(records),
        "trials_stopped_early": statuses.count("stopped early"),
        "errored_trials": statuses.count("error"),
        "time_budget_s": options.time_budget_s,
        "budget_reached": budget_reached,
    }
    runfolder.write_json(runfolder.join(options.run_dir, runfolder.BEST), summary)
    return summary


def prepare_run(options: SearchOptions, ds: CTDataset, split: Split,
                resume: bool = False) -> TrialData:
    """Write split.json, search.json and the space into the run; return what trials get (no
    test rows)."""
    record = split_record(split, ds)
    split_uri = runfolder.join(options.run_dir, runfolder.SPLIT)
    changed = resume and split_changes(runfolder.read_json(split_uri) or {}, record)
    if changed:
        raise DataError(f"{options.data} no longer gives the split this search started with "
                        f"({split_uri}): {changed}")
    runfolder.write_json(split_uri, record)
    space_uri = runfolder.join(options.run_dir, runfolder.SPACE)
    if not resume:
        runfolder.write_text(space_uri, runfolder.read_text(options.search_space))
    runfolder.write_json(runfolder.join(options.run_dir, runfolder.SEARCH), asdict(options))
    return trial_data(ds, split)


def load_options(run_dir: str) -> SearchOptions:
    """A search's options, placed at run_dir wherever it was started from."""
    search_json = runfolder.join(run_dir, runfolder.SEARCH)
    saved = runfolder.read_json(search_json)
    if saved is None:
        raise ConfigError(f"{run_dir}: not a ctscan search (no {runfolder.SEARCH})")
    try:
        return SearchOptions(**{**saved, "storage_path": runfolder.parent_of(run_dir),
                                "name": runfolder.name_of(run_dir)})
    except TypeError as e:  # not a mapping, or keys missing or unknown
        raise ConfigError(f"{search_json}: not a ctscan search file ({e})") from e
