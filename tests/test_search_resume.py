"""kill -9 the whole `ctscan tune` process group mid-search, then `--resume` it from another
working directory, with the run folder in a bucket: nothing lost, nothing run twice."""

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest
from helpers import bucket_keys

from data_utils.demo import make_demo_data


def _tune(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ctscan", "tune", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _rows(bucket: str, key: str) -> list[dict]:
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


@pytest.mark.ray  # in the children
def test_killed_search_resumes_from_anywhere_and_finishes_exactly_num_samples(tmp_path,
                                                                             s3_bucket):
    root = make_demo_data(tmp_path / "data", n_per_class=24, size=64)
    space = tmp_path / "space.yaml"
    # Plain SGD keeps no optimizer state: each epoch's resume state is the weights alone, half
    # the bytes that AdamW's would send through the S3 server (the test's largest cost).
    space.write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\nhead: {choice: [[], [8]]}\n"
                     "optimizer: sgd\nmomentum: 0.0\n")
    (tmp_path / "first").mkdir()
    first = _tune(str(root), "--name", "s", "--storage-path", f"{s3_bucket}/runs",
                  "--num-samples", "2", "--max-epochs", "2", "--grace-period", "2",
                  "--max-concurrent", "2", "--checkpoint-every", "1", "--image-size", "32",
                  "--search-space", str(space),
                  "--group-by", "none", "--ratios", "0.6", "0.2", "0.2", "--bootstrap", "200",
                  start_new_session=True, cwd=tmp_path / "first")
    deadline = time.time() + 240
    while not any("/checkpoint_000000/" in k for k in bucket_keys(s3_bucket, "runs/s/")):
        assert first.poll() is None, first.stdout.read()  # a trial is 1 epoch in
        assert time.time() < deadline, "search made no progress"
        time.sleep(0.25)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started: a power cut
    first.wait()
    assert "runs/s/best.json" not in bucket_keys(s3_bucket, "runs/s/")

    space.unlink()  # the run folder holds its own copy of the space
    (tmp_path / "second").mkdir()
    resumed = _tune("--resume", f"{s3_bucket}/runs/s", "--bootstrap", "200", "--ensemble", "1",
                    cwd=tmp_path / "second")
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    assert f"resuming search s from {s3_bucket}/runs/s" in out

    keys = bucket_keys(s3_bucket, "runs/s/")
    bucket = s3_bucket.removeprefix("s3://")
    results = sorted(k for k in keys if k.endswith("/result.json"))
    assert len(results) == 2  # exactly num_samples trials, none duplicated
    best = json.loads(boto3.client("s3").get_object(
        Bucket=bucket, Key="runs/s/best.json")["Body"].read())
    assert best["trials"] == 2 and best["errored_trials"] == 0
    all_rows = {key.split("/")[2]: _rows(bucket, key) for key in results}
    for rows in all_rows.values():
        # Resumed trials did not start over: no epoch twice, and every trial reached the last.
        # (Ray uploads a trial's result.json to a bucket now and then, so a row the killed driver
        # had not uploaded yet can be missing: seen once in five runs, epoch 1's.)
        epochs = [r["epoch"] for r in rows]
        assert epochs == sorted(set(epochs)) and epochs[-1] == 2, epochs
    # trials.json misses none: what result.json lacks, the checkpoint's own history holds.
    trials = json.loads(boto3.client("s3").get_object(
        Bucket=bucket, Key="runs/s/trials.json")["Body"].read())
    assert [[h["epoch"] for h in t["history"]] for t in trials] == [[1, 2], [1, 2]]
    top = max(h["val_auc"] for t in trials for h in t["history"])
    assert best["val_metrics"]["val_auc"] == top
    assert any(name.endswith(f"-{best['trial_id']}") for name in all_rows)
    assert best["checkpoint"].removeprefix(f"{s3_bucket}/") in keys
    assert "runs/s/results/metrics.json" in keys and "runs/s/export/model.pt" in keys
    assert (tmp_path / "second/runs/s/results/report.md").is_file()  # the local copy
