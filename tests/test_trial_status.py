"""trials.json's status of a trial, from what Ray's ResultGrid holds of it (no search here: the
ASHA search of tests/test_search.py checks "completed" and "stopped early" on real trials)."""

from types import SimpleNamespace

import pandas as pd

from tuning.records import HISTORY_KEYS, trial_records


def _result(tmp_path, trial_id: str, epochs: int, last: dict, error: Exception | None = None):
    """What trial_records reads of a Ray Result: its folder, rows, last result and error."""
    rows = [{**dict.fromkeys(HISTORY_KEYS, 0.5), "epoch": e, "val_auc": 0.5 + e / 10}
            for e in range(1, epochs + 1)]
    return SimpleNamespace(path=str(tmp_path / f"trial_000-resnet18-{trial_id}"), checkpoint=None,
                           metrics_dataframe=pd.DataFrame(rows), error=error,
                           config={"lr": 0.001}, metrics={**last, "config": {"lr": 0.001}})


def test_a_trial_is_completed_stopped_early_ended_by_the_budget_or_failed(tmp_path):
    results = [
        _result(tmp_path, "own", 3, {"final_epoch": True, "done": True}),
        # ASHA's stop: Ray marks the trial's last result done.
        _result(tmp_path, "asha", 1, {"final_epoch": False, "done": True}),
        # The time budget stops the running trials and leaves their last result as it was.
        _result(tmp_path, "clock", 2, {"final_epoch": False, "done": False}),
        _result(tmp_path, "broke", 1, {"final_epoch": False}, RuntimeError("out of memory")),
    ]
    status = {r["trial_id"]: r["status"] for r in trial_records(results, str(tmp_path))}
    assert status == {"own": "completed", "asha": "stopped early", "clock": "budget",
                      "broke": "error"}
