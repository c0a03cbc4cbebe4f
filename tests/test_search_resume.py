"""kill -9 the whole `ctscan tune` process group mid-search, then `--resume`: nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_utils.demo import make_demo_data


def _tune(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuning.cli", "tune", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]


def test_killed_search_resumes_and_finishes_exactly_num_samples(tmp_path):
    root = make_demo_data(tmp_path / "data", n_per_class=24, size=64)
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                                         "head: {choice: [[], [8]]}\n")
    runs = tmp_path / "runs"
    first = _tune(str(root), "--name", "s", "--storage-path", str(runs), "--num-samples", "4",
                  "--max-epochs", "4", "--grace-period", "4", "--max-concurrent", "2",
                  "--image-size", "32", "--search-space", str(tmp_path / "space.yaml"),
                  "--group-by", "none", "--ratios", "0.6", "0.2", "0.2",
                  start_new_session=True)
    deadline = time.time() + 240
    while not list(runs.glob("s/trial_*/checkpoint_000001")):  # a trial is 2 epochs in
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "search made no progress"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started: a power cut
    first.wait()
    assert not (runs / "s" / "best.json").exists()

    resumed = _tune("--resume", "--name", "s", "--storage-path", str(runs))
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    assert "resuming search s" in out

    trials = sorted((runs / "s").glob("trial_*"))
    assert len(trials) == 4  # exactly num_samples, none duplicated
    best = json.loads((runs / "s" / "best.json").read_text())
    assert best["trials"] == 4 and best["errored_trials"] == 0
    all_rows = {trial.name: _rows(trial) for trial in trials}
    for rows in all_rows.values():
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # resumed trials did not start over
    top = max(r["val_auc"] for rows in all_rows.values() for r in rows)
    assert best["val_metrics"]["val_auc"] == top
    assert max(r["val_auc"] for r in all_rows[f"trial_{best['trial_id']}"]) == top
    assert Path(best["checkpoint"]).is_file()
