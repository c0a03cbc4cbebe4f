"""`ctscan tune`: Ray Tune runs many `train_trial`s; Optuna's TPE proposes, ASHA prunes.

The search starts with the space's known-good configs (Optuna's enqueued trials, via
`points_to_evaluate`), then TPE proposes from the space's conditional, define-by-run form. Every
trial is judged by its best val AUC so far: ASHA's rungs and Optuna's values use it, so a trial
is not punished for the epochs after its peak; the checkpoint Ray keeps is still the best
epoch's. `time_budget_s` stops the whole search on time (Ray's own budget).

Trials get the dataset as row numbers, labels and where the cache is (`TrialData`, 16 bytes a
slice in Ray's object store, `tune.with_parameters`), never the pixels: each trial memory-maps
its node's copy of the cache and gathers its batches by row, so the node's page cache holds them
once for all its trials and the head's memory does not grow with the data.

Each trial reports every epoch, with a checkpoint when its weights improved or its resume state
was due (`SearchOptions.resume_every`); Ray keeps two per trial: the latest (with the best
weights) and the newest resume state. A killed driver resumes with `Tuner.restore`, which
restores finished trials, unfinished ones from their resume states, and the Optuna searcher's
state.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

from ctmodels.model import resolve_precision
from data_utils import runfolder
from data_utils.errors import RunFolderError
from tuning.records import (
    CHECKPOINT_METRIC,
    METRIC,
    MODE,
    SearchOptions,
    load_search_space,
    summarize,
    trial_dirname,
    trial_records,
)
from tuning.space import decode_params, startup_trials
from tuning.train import TrialData, train_trial


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records trials stopped by the scheduler as PRUNED, not COMPLETE.

    Ray marks every last result done=True, stopped or not; train_trial's `final_epoch` says
    whether the trial ended by itself. Given no result and no error, OptunaSearch tells Optuna
    the trial was pruned, and TPE weighs it by its last intermediate value, as Optuna does.
    Ray hands a trial's last result only to on_trial_complete, so it is recorded as an
    intermediate value first: a trial stopped at its first epoch would otherwise have none,
    and TPE would rank it below every other. A trial that errored after reporting is pruned too.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if error and trial_id not in self._completed_trials and self._reported(trial_id):
            # A trial that failed after some epochs (out of memory at a later rung, say) tells
            # TPE as much as one ASHA stopped there: pruned, weighed by its last value, where
            # FAIL would drop it.
            error = False
        if result is not None and not error and trial_id not in self._completed_trials:
            with warnings.catch_warnings():  # a step reported already is ignored: fine
                warnings.filterwarnings("ignore", message="The reported value is ignored")
                self.on_trial_result(trial_id, result)
            if not result.get("final_epoch", False):
                result = None
        super().on_trial_complete(trial_id, result, error)

    def _reported(self, trial_id: str) -> bool:
        number = self._ot_trials[trial_id].number
        trial = next(t for t in self._ot_study.get_trials(deepcopy=False) if t.number == number)
        return bool(trial.intermediate_values)


def trainable(params: dict, data: TrialData, options: SearchOptions) -> None:
    """One Ray Tune trial: a thin wrapper that runs train_trial and reports every epoch."""
    config = options.trial_config(decode_params(params))
    if ray.get_gpu_ids() and not torch.cuda.is_available():
        warnings.warn(f"trial was given GPU {ray.get_gpu_ids()} but CUDA is not available; "
                      "training on the CPU", stacklevel=1)
    config.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    resources = tune.get_context().get_trial_resources().required_resources
    config.num_workers = max(1, int(resources.get("CPU", 1)))
    node = ray.get_runtime_context().get_node_id()
    # Recorded per trial: a cluster's nodes may differ (bf16 on one CPU, fp32 on another).
    extra = {"node_id": node, "device": config.device,
             "precision": resolve_precision(config.precision, torch.device(config.device))}
    # train_trial works in a private folder. An epoch that saved a file there becomes a Ray
    # checkpoint: best.pt (the best weights so far) always, last.pt (the resume state) when it
    # was saved, and history.json. Ray keeps the latest checkpoint, which holds the trial's best
    # weights, and the newest one with last.pt (CHECKPOINT_METRIC), to resume from.
    with tempfile.TemporaryDirectory(prefix="ctscan-trial-") as work:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            fetch_resume_state(checkpoint, Path(work))

        def report(metrics: dict, history: list[dict], saved: list[str]) -> None:
            # A trial that ended by itself is never resumed: its last.pt stays here.
            resumable = runfolder.LAST_CHECKPOINT in saved and not metrics["final_epoch"]
            if not (resumable or runfolder.BEST_CHECKPOINT in saved):
                tune.report({**metrics, **extra})
                return
            with tempfile.TemporaryDirectory(dir=work) as snapshot:
                names = [runfolder.BEST_CHECKPOINT] + [runfolder.LAST_CHECKPOINT] * resumable
                for name in names:
                    os.link(Path(work) / name, Path(snapshot) / name)
                (Path(snapshot) / runfolder.HISTORY).write_text(json.dumps(history))
                tune.report({**metrics, **extra,
                             CHECKPOINT_METRIC: metrics["epoch"] if resumable else 0},
                            checkpoint=tune.Checkpoint.from_directory(snapshot))

        train_trial(config, data, Path(work), report, gpu_share=resources.get("GPU") or 1.0,
                    checkpoint_every=options.resume_every)


def fetch_resume_state(checkpoint: tune.Checkpoint, work: Path) -> None:
    """Copy a trial's newest resume state into `work`. Ray restores a trial from its latest
    checkpoint, which may hold weights only; the newest one holding last.pt is also kept, beside
    it. Without one, the trial starts over: the epochs before the first resume state repeat."""
    fs = checkpoint.filesystem
    trial_dir = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    folders = sorted((entry.path for entry in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir))
                      if entry.base_name.startswith("checkpoint_")), reverse=True)
    for folder in folders:  # checkpoint_000012: newest first
        if fs.get_file_info(f"{folder}/{runfolder.LAST_CHECKPOINT}").is_file:
            tune.Checkpoint(folder, fs).to_directory(work)
            return


def make_sampler(options: SearchOptions) -> optuna.samplers.TPESampler:
    """TPE for a budget of a few dozen trials at most, several at a time (Optuna's advice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=options.seed, n_startup_trials=startup_trials(options.num_samples),
            multivariate=True, group=True,  # models interactions; keeps the branches apart
            constant_liar=options.max_concurrent > 1)  # parallel proposals spread out


def _tuner_parts(options: SearchOptions, data: TrialData, trainable_fn: Callable):
    # Imported here, on the driver: every trial worker imports this module, and on a busy machine
    # TensorBoard's imports would delay each trial's start by a second.
    from tuning.trial_tensorboard import TrialTensorBoard

    space = load_search_space(options)
    resources = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    trainable_with_data = tune.with_resources(
        tune.with_parameters(trainable_fn, data=data, options=options), resources)
    searcher = ConcurrencyLimiter(
        PrunedAwareOptunaSearch(space=space, metric=METRIC, mode=MODE,
                                points_to_evaluate=space.start, sampler=make_sampler(options)),
        max_concurrent=options.max_concurrent)
    if options.scheduler == "fifo":
        scheduler = FIFOScheduler()
    else:
        # By epoch, not Ray's count of reports: a resumed trial reports its repeated epochs again.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=options.max_epochs,
                                  grace_period=options.grace_period,
                                  reduction_factor=options.reduction_factor)
    tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher,
                                  scheduler=scheduler, num_samples=options.num_samples,
                                  time_budget_s=options.time_budget_s,
                                  trial_dirname_creator=trial_dirname,
                                  # A trial's worker process runs the next trial too: importing
                                  # torch and ctscan (4-5 s on 2 cores) or starting CUDA is paid
                                  # once per worker, not once per trial. train_trial seeds and
                                  # sets all it depends on, so results do not change.
                                  reuse_actors=True)
    reporter = tune.CLIReporter(
        # Ray's table looks every column up in every trial: only the unconditional ones.
        parameter_columns=[n for n in space.param_names("arch", "optimizer", "lr", "batch_size")
                           if "[" not in n],
        metric_columns={"epoch": "epoch", METRIC: "best val AUC"},
        # Not sort_by_metric: Ray's sort fails on a trial the budget ended before its first report.
        max_report_frequency=30)
    run_config = tune.RunConfig(
        name=options.name,
        storage_path=runfolder.join(options.storage_path),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_METRIC,
            checkpoint_score_order="max"),
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        progress_reporter=reporter,
        # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS (set in run_search) drops Ray's TensorBoard logger
        # with the others; result.json and progress.csv are still wanted.
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(),
                   TrialTensorBoard(space, options, data)],
        verbose=1,
    )
    return trainable_with_data, tune_config, run_config


def search_started(run_dir: str) -> bool:
    """Whether Ray Tune saved the state of a search there. A Ctrl-C during Ray's start-up leaves
    the run's own records (search.json, split.json) but none: nothing to resume, nothing lost."""
    return tune.Tuner.can_restore(run_dir)


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
            raise RunFolderError(f"{options.run_dir}: no search to resume there")
        tuner = tune.Tuner.restore(options.run_dir, trainable=trainable_with_data,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable_with_data, tune_config=tune_config, run_config=run_config)
    # On the driver only, as in _tuner_parts.
    from tuning.trial_tensorboard import declare_search_once, log_recovered_epochs

    # Once per search, before the first trial: a resumed search finds it in the run.
    declare_search_once(options.run_dir, load_search_space(options).spec)
    started = time.monotonic()
    with _ctrl_c_ends_the_search():
        results = tuner.fit()
    # Ray's budget clock starts with the search and does not stop it before the budget is spent,
    # so a search that took the whole budget is one the budget ended.
    budget_reached = (options.time_budget_s is not None
                      and time.monotonic() - started >= options.time_budget_s)
    prune_checkpoints(results)
    records = trial_records(results, options.run_dir)
    best = summarize(options, results, records, budget_reached)
    log_recovered_epochs(options.run_dir, records)
    return best


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


def prune_checkpoints(results: tune.ResultGrid) -> None:
    """Once the search is over, a trial needs only its best weights: the best.pt in its latest
    checkpoint. Older checkpoints and the resume state (last.pt: optimizer state, twice the
    weights with AdamW) go."""
    for result in results:
        if result.checkpoint is None:
            continue
        fs, kept = result.filesystem, result.checkpoint.path
        for entry in fs.get_file_info(pyarrow.fs.FileSelector(result.path)):
            if entry.base_name.startswith("checkpoint_") and entry.path != kept:
                fs.delete_dir(entry.path)
        resume = f"{kept}/{runfolder.LAST_CHECKPOINT}"
        if fs.get_file_info(resume).is_file:
            fs.delete_file(resume)
