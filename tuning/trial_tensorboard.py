"""TensorBoard for a search: each trial's run and HParams session, logged on the driver."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from ray import tune
from ray.tune.experiment import Trial
from torch.utils.tensorboard import SummaryWriter

from data_utils import runfolder
from tuning import monitor
from tuning.records import SearchOptions
from tuning.space import SearchSpace, decode_params, params_in_force
from tuning.train import TrialData


def declare_search_once(run_dir: str, spec: dict) -> None:
    """Declare the search's HParams experiment in the run's root, with the run's fixed config
    keys, unless an earlier session of the same search did (`monitor.declare_experiment`).
    `ctscan tune` writes them (search.json) before the search starts; a search started without
    (a test driving run_search) declares the space with TrainConfig's defaults."""
    options = runfolder.read_json(runfolder.join(run_dir, runfolder.SEARCH)) or {}
    monitor.declare_experiment(run_dir, spec, options.get("base_config", {}))


class TrialTensorBoard(tune.Callback):
    """Logs each trial on the driver into the trial's folder (Ray syncs it to storage with the
    trial's other files, also to a bucket): the same scalars and input grid as `ctscan train`,
    and an HParams session from its start to its end, with a value for every searched key
    (`params_in_force`), the epochs it trained and how it ended (the status of trials.json:
    monitor.SESSION_STATUS). Ray's own TensorBoard logger is off: it logs every result key and
    marks every session a success.

    Pickled with the tuner (so a resumed search logs the same way): only a sample of the training
    images for the grid is kept, not the dataset.
    """

    def __init__(self, space: SearchSpace, options: SearchOptions, data: TrialData):
        self.space, self.options = space, options
        self.grid_images = torch.from_numpy(data.first_train_images(64))
        self.grid_labels = torch.from_numpy(data.train_labels[:64].copy())
        self.writers = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "writers": {}}  # open files do not pickle

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.trial_id in self.writers:  # restarted after a failure: same run, same session
            return
        params = decode_params(trial.config)
        config = self.options.trial_config(params)
        writer = monitor.open_run(Path(trial.local_path), config, self.grid_images,
                                  self.grid_labels)
        searched = self.space.searched_keys()
        monitor.start_session(writer, params_in_force(params, config, searched), searched)
        self.writers[trial.trial_id] = writer

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info) -> None:
        if trial.trial_id in self.writers:  # not a result replayed from before a resume
            writer = self.writers[trial.trial_id]
            monitor.log_epoch(writer, result)
            monitor.log_marks(writer, result["epoch"], {monitor.EPOCHS_TRAINED: result["epoch"]})

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        # A trial the scheduler stopped is "complete" to Ray, but it did not end by itself.
        ended = trial.last_result.get("final_epoch", False)
        self._end(trial, "completed" if ended else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "error")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        # When the time budget is spent, Ray marks every unfinished trial TERMINATED without
        # calling on_trial_complete (which ASHA's stops and a trial's own end go through, and
        # which closes the session first). Closed here, in the step that stopped them, the
        # events reach storage with Ray's last sync of the search.
        for trial in trials:
            if trial.status == Trial.TERMINATED and trial.trial_id in self.writers:
                self._end(trial, "budget")

    def on_experiment_end(self, trials: list, **info) -> None:
        # Sessions still open here belong to an interrupted search (Ctrl-C): `--resume`
        # continues them, so their files are closed and the sessions left open.
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()

    def _end(self, trial, status: str) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            monitor.end_session(writer, status, trial.last_result.get("epoch", 0))


def log_recovered_epochs(run_dir: str, records: list[dict]) -> None:
    """A driver killed before it uploaded a trial's result.json had not uploaded the TensorBoard
    events it logged beside it either: the epochs trials.json took from a checkpoint's history
    (`recovered_epochs`) are logged again, into an events file of their own in the trial's run."""
    for record in records:
        epochs = set(record.get("recovered_epochs", ()))
        if not epochs:
            continue
        checkpoint = runfolder.in_run(run_dir, record["checkpoint"])
        trial_dir = runfolder.parent_of(runfolder.parent_of(checkpoint))
        with tempfile.TemporaryDirectory() as folder:
            with SummaryWriter(folder) as writer:
                for row in record["history"]:
                    if row["epoch"] in epochs:
                        monitor.log_epoch(writer, row)
            for events in Path(folder).iterdir():
                runfolder.write_bytes(runfolder.join(trial_dir, events.name), events.read_bytes())
