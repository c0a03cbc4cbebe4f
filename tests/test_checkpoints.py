"""A trial's checkpoints in storage: where the resume state is found, how long it waits, and the
history a killed driver had not uploaded, taken back from a checkpoint."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers import read_events
from ray import tune

from tuning.monitor import SCALARS
from tuning.records import HISTORY_KEYS, SearchOptions, trial_records
from tuning.search import fetch_resume_state
from tuning.trial_tensorboard import log_recovered_epochs


def _row(epoch: int, auc: float) -> dict:
    return {**dict.fromkeys(HISTORY_KEYS, 0.5), "epoch": epoch, "val_auc": auc,
            "best_val_auc": auc}


def _checkpoint(trial: Path, index: int, files: dict[str, str]) -> Path:
    folder = trial / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_the_resume_state_is_the_newest_checkpoint_holding_one(tmp_path):
    trial = tmp_path / "trial_000-resnet18-abc"
    _checkpoint(trial, 0, {"best.pt": "w1", "last.pt": "r1"})
    _checkpoint(trial, 1, {"best.pt": "w2", "last.pt": "r2"})
    latest = _checkpoint(trial, 2, {"best.pt": "w3"})  # weights improved, no resume state due
    work = tmp_path / "work"
    work.mkdir()
    fetch_resume_state(tune.Checkpoint(str(latest)), work)
    # The resume state with the best weights as they were then; epoch 3 is trained again.
    assert (work / "last.pt").read_text() == "r2" and (work / "best.pt").read_text() == "w2"


def test_without_a_resume_state_a_trial_starts_over(tmp_path):
    latest = _checkpoint(tmp_path / "trial_x", 0, {"best.pt": "w1"})
    fetch_resume_state(tune.Checkpoint(str(latest)), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_resume_state_every_epoch_on_disk_and_every_five_in_a_bucket():
    assert SearchOptions("d", storage_path="/runs").resume_every == 1
    assert SearchOptions("d", storage_path="s3://b/runs").resume_every == 5
    assert SearchOptions("d", storage_path="s3://b/runs", checkpoint_every=2).resume_every == 2


def test_epochs_missing_from_result_json_come_back_from_the_checkpoint(tmp_path):
    """A driver killed before it uploaded epoch 1's row: trials.json and TensorBoard still show
    epochs 1 and 2."""
    run = tmp_path / "run"
    trial = run / "trial_000-resnet18-abc"
    history = [_row(1, 0.7), _row(2, 0.8)]
    checkpoint = _checkpoint(trial, 1, {"history.json": json.dumps(history)})
    result = SimpleNamespace(path=str(trial), checkpoint=SimpleNamespace(path=str(checkpoint)),
                             metrics_dataframe=pd.DataFrame([history[1]]), error=None,
                             metrics={"final_epoch": True}, config={"lr": 0.01})
    [record] = trial_records([result], str(run))
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["recovered_epochs"] == [1] and record["val_auc"] == 0.8
    assert record["checkpoint"] == "trial_000-resnet18-abc/checkpoint_000001/best.pt"

    log_recovered_epochs(str(run), [record])
    events = read_events(trial)
    [logged] = events.Scalars(SCALARS["val_auc"])
    assert logged.step == 1 and logged.value == pytest.approx(0.7)


def test_a_resumed_trials_repeated_epochs_count_once_the_last_report_wins(tmp_path):
    trial = tmp_path / "run" / "trial_000-resnet18-abc"
    checkpoint = _checkpoint(trial, 0, {"history.json": json.dumps([_row(1, 0.6)])})
    rows = [_row(1, 0.6), _row(2, 0.7), _row(2, 0.7), _row(3, 0.9)]
    result = SimpleNamespace(path=str(trial), checkpoint=SimpleNamespace(path=str(checkpoint)),
                             metrics_dataframe=pd.DataFrame(rows), error=None,
                             metrics={"final_epoch": True}, config={"lr": 0.01})
    [record] = trial_records([result], str(tmp_path / "run"))
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3] and record["epochs"] == 3
    assert "recovered_epochs" not in record
