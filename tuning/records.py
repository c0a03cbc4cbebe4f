"""What a search writes into its run folder and reads back: search.json (`SearchOptions`), the
copy of its space, split.json, trials.json and best.json.

Nothing here imports Ray or torch: the CLI reads the options' defaults from `SearchOptions` for
every command's --help, and `ctscan evaluate` reads a finished search's records.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from data_utils import runfolder
from data_utils.errors import RunFolderError
from data_utils.split import Split, split_changes, split_record
from tuning.config import TrainConfig, make_config
from tuning.space import (
    DEFAULT_SPACE,
    NUMBER,
    SearchSpace,
    decode_params,
    load_space,
    params_in_force,
)

if TYPE_CHECKING:  # Ray's result types, only read here
    from ray.tune import ResultGrid

    from data_utils.cache import CTDataset

METRIC, MODE = "best_val_auc", "max"  # what trials are ranked, stopped and modelled by
# A checkpoint's epoch if it holds a resume state (last.pt), else 0: Ray keeps the checkpoint with
# the highest, beside the latest one, whose best.pt holds the trial's best weights.
CHECKPOINT_METRIC = "resume_epoch"
RESUME_EVERY_LOCAL, RESUME_EVERY_REMOTE = 1, 5  # default epochs between resume states
HISTORY_KEYS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_auc", "best_val_auc",
                "val_f1", "lr"]


@dataclass
class SearchOptions:
    """Everything that defines a search; saved as search.json so a resume needs only the name.
    The CLI's defaults are these."""

    data: str
    num_samples: int = 12  # with a time budget: at most this many
    max_epochs: int = 10
    time_budget_s: float | None = None  # stop the search after this long (per session)
    scheduler: str = "asha"  # asha | fifo (no early stopping; for comparisons)
    grace_period: int = 1
    reduction_factor: int = 3
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 4
    max_failures: int = 2
    # Epochs between a trial's resume states (optimizer state, 3x the weights with AdamW); None:
    # every epoch on this machine's disk, every RESUME_EVERY_REMOTE in a bucket.
    checkpoint_every: int | None = None
    storage_path: str = "runs"  # a local folder (made absolute), a shared path or a URI
    name: str = field(default_factory=lambda: time.strftime("tune-%Y%m%d-%H%M%S"))
    seed: int = 0
    search_space: str = str(DEFAULT_SPACE)
    base_config: dict = field(default_factory=dict)  # fixed training config keys (image size...)
    # How the data are read and split: ratios, seed, group_by, positive_class, window, slices,
    # and the run's pseudonym key (identity_key); see data_utils.split.load_data_options.
    split: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        return runfolder.join(self.storage_path, self.name)

    @property
    def resume_every(self) -> int:
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return RESUME_EVERY_REMOTE if runfolder.is_uri(self.storage_path) else RESUME_EVERY_LOCAL

    def trial_config(self, values: dict) -> TrainConfig:
        """The training config of a trial: the fixed keys, then its searched values (config keys,
        as `decode_params` gives them)."""
        return make_config({**self.base_config, **values})


class SearchFailed(RuntimeError):
    """The search ended without a single trial that finished an epoch."""


def load_options(run_dir: str) -> SearchOptions:
    """A search's options, placed at run_dir wherever it was started from."""
    search_json = runfolder.join(run_dir, runfolder.SEARCH)
    saved = runfolder.read_json(search_json)
    if saved is None:
        raise RunFolderError(f"{run_dir}: not a ctscan search (no {runfolder.SEARCH})")
    try:
        return SearchOptions(**{**saved, "storage_path": runfolder.parent_of(run_dir),
                                "name": runfolder.name_of(run_dir)})
    except TypeError as e:  # not a mapping, or keys missing or unknown
        raise RunFolderError(f"{search_json}: not a ctscan search file ({e})") from e


def load_search_space(options: SearchOptions) -> SearchSpace:
    """The run's own copy of its space once the run exists (so a resume needs no other file),
    the user's file before."""
    copy = runfolder.join(options.run_dir, runfolder.SPACE)
    return load_space(copy if runfolder.exists(copy) else options.search_space,
                      options.base_config)


def prepare_run(options: SearchOptions, ds: CTDataset, split: Split, resume: bool = False
                ) -> None:
    """Write split.json, search.json and the space into the run; a resumed search must find the
    split it started with, and keeps its split.json as it was (also one an older ctscan wrote)."""
    record = split_record(split, ds)
    split_uri = runfolder.join(options.run_dir, runfolder.SPLIT)
    recorded = resume and runfolder.read_json(split_uri)
    changed = recorded and split_changes(recorded, record)
    if changed:
        raise RunFolderError(f"{options.data} no longer gives the split this search started "
                             f"with ({split_uri}): {changed}")
    if not recorded:
        runfolder.write_json(split_uri, record)
    space_uri = runfolder.join(options.run_dir, runfolder.SPACE)
    if not resume:
        runfolder.write_text(space_uri, runfolder.read_text(options.search_space))
    runfolder.write_json(runfolder.join(options.run_dir, runfolder.SEARCH), asdict(options))


def trial_dirname(trial) -> str:
    """trial_NUMBER-ARCH-ID, say trial_003-resnet18-93b1ef24: TensorBoard names each trial's run
    by this folder, in this order. (Ray's default packs every parameter into the name.)"""
    params = trial.config or {}
    number = f"{params[NUMBER]:03d}" if NUMBER in params else None
    parts = [number, decode_params(params).get("arch"), trial.trial_id]
    return "trial_" + "-".join(p for p in parts if p is not None)


def _trial_id(trial_dirname: str) -> str:
    return trial_dirname.rsplit("-", 1)[-1].removeprefix("trial_")


def _error_line(error: BaseException) -> str:
    """The last line of a trial's error: the exception itself, below Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def best_row(history: list[dict]) -> dict:
    """The epoch whose weights a trial keeps (train_trial's rule): the first to reach the highest
    val AUC."""
    scored = [h for h in history if h["val_auc"] == h["val_auc"]]  # not NaN
    return max(scored, key=lambda h: h["val_auc"]) if scored else history[0]


def _history(result, run_dir: str, trial_dir: str) -> tuple[list[dict], list[int]]:
    """A trial's epochs, and those of them that Ray's rows (result.json) lack: the history in
    its latest checkpoint holds every epoch up to it, even where a killed driver had not
    uploaded result.json yet. A resumed trial reports its repeated epochs again: the last report
    counts."""
    by_epoch = {}
    if result.checkpoint is not None:
        saved = runfolder.read_json(runfolder.join(
            run_dir, trial_dir, runfolder.name_of(result.checkpoint.path), runfolder.HISTORY))
        by_epoch = {row["epoch"]: {k: row[k] for k in HISTORY_KEYS} for row in saved or []}
    frame = result.metrics_dataframe
    # A trial the budget ended before it started, or one that failed before its first report,
    # has no frame or an empty one.
    recovered = set(by_epoch)
    if frame is not None and not frame.empty and "val_auc" in frame:
        for row in frame[HISTORY_KEYS].dropna(subset=["epoch"]).to_dict("records"):
            by_epoch[int(row["epoch"])] = {**row, "epoch": int(row["epoch"])}
            recovered.discard(int(row["epoch"]))
    return [by_epoch[epoch] for epoch in sorted(by_epoch)], sorted(recovered)


def _status(result, history: list[dict]) -> str:
    """completed (ended by itself: its last epoch, or no gain for `patience` epochs), stopped
    early (by the scheduler: ASHA), budget (still running when the time budget ended the
    search) or error.

    Ray marks done the last result of a trial its scheduler stopped; the time budget stops the
    unfinished trials without touching their last result (TuneController's
    _stop_experiment_if_needed), and Ray keeps that result in the search's state, so a resumed
    search still tells the two apart."""
    if result.error:
        return "error"
    if history and result.metrics.get("final_epoch"):
        return "completed"
    return "stopped early" if result.metrics.get("done") else "budget"


def trial_records(results: ResultGrid, run_dir: str) -> list[dict]:
    """trials.json: every trial's searched values, status (`_status`), error and per-epoch
    history, best first; trials that failed before reporting come last."""
    records = []
    for result in results:
        trial_dir = runfolder.name_of(result.path)
        history, recovered = _history(result, run_dir, trial_dir)
        status = _status(result, history)
        config = result.config or {}
        if not (config or history or result.error):
            continue  # proposed, then the budget ended the search before the trial started
        kept = result.checkpoint
        records.append({
            # A trial that failed before reporting has no metrics; its folder still names it.
            "trial_id": _trial_id(trial_dir),
            "number": config.get(NUMBER),  # 0: the first proposed
            "folder": runfolder.recorded(run_dir, trial_dir),  # its TensorBoard run
            "params": decode_params(config),
            "status": status,
            "epochs": len(history),
            "val_auc": max((h["val_auc"] for h in history), default=float("nan")),
            "precision": result.metrics.get("precision"),  # bf16 | fp32, as the node resolved it
            # Its best epoch's weights: the ensemble of the top trials is built from these.
            "checkpoint": runfolder.recorded(run_dir, trial_dir, runfolder.name_of(kept.path),
                                             runfolder.BEST_CHECKPOINT) if kept else None,
            **({"error": _error_line(result.error),
                "error_file": runfolder.join(run_dir, trial_dir, runfolder.TRIAL_ERROR)}
               if result.error else {}),
            "history": history,
            # Rows a killed driver had not uploaded, taken from the checkpoint's history.
            **({"recovered_epochs": recovered} if recovered else {}),
        })
    return sorted(records, key=lambda r: -r["val_auc"] if r["history"] else 1)


def _no_trial_reported(records: list[dict], run_dir: str) -> SearchFailed:
    failed = [r for r in records if "error" in r]
    if not failed:
        return SearchFailed(f"{run_dir}: no trial finished an epoch; give the search more time")
    first = min(failed, key=lambda r: r["number"] if r["number"] is not None else 1 << 30)
    return SearchFailed(f"no trial finished an epoch; trial {first['trial_id']} failed with "
                        f"{first['error']} (see {first['error_file']})")


def summarize(options: SearchOptions, results: ResultGrid, records: list[dict],
              budget_reached: bool = False) -> dict:
    """Write trials.json (`records`, from trial_records, each trial's params with a value for
    every searched key: `params_in_force`), and best.json: the best trial, its best checkpoint
    and exactly that epoch's metrics (returned)."""
    searched = load_search_space(options).searched_keys()
    for record in records:
        record["params"] = params_in_force(record["params"],
                                           options.trial_config(record["params"]), searched)
    runfolder.write_json(runfolder.join(options.run_dir, runfolder.TRIALS), records)
    if not any(r["history"] for r in records):
        raise _no_trial_reported(records, options.run_dir)
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
    record = next(r for r in records if r["trial_id"] == _trial_id(runfolder.name_of(best.path)))
    top = best_row(record["history"])  # exactly the epoch whose weights best.pt holds
    # From the params in force, as the other members' configs are (results.evaluate): every
    # table of the report then reads one value per key (momentum 0 on an AdamW trial).
    config = asdict(options.trial_config(record["params"]))
    statuses = [r["status"] for r in records]
    summary = {
        "trial_id": record["trial_id"],
        "config": config,
        "searched": {k: record["params"][k] for k in searched},
        "val_metrics": {k: float(top[k]) for k in
                        ("val_auc", "val_loss", "val_accuracy", "val_f1", "train_loss")},
        "best_epoch": int(top["epoch"]),
        "checkpoint": record["checkpoint"],
        "precision": record["precision"],
        "trials": len(records),
        "trials_stopped_early": statuses.count("stopped early"),
        "trials_ended_by_budget": statuses.count("budget"),
        "errored_trials": statuses.count("error"),
        "time_budget_s": options.time_budget_s,
        "budget_reached": budget_reached,
    }
    runfolder.write_json(runfolder.join(options.run_dir, runfolder.BEST), summary)
    return summary
