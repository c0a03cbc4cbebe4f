"""Two Ray nodes that declare logical GPUs (no CUDA here), the run folder in a bucket:
placement, limits, CPU fallback, shared storage."""

import json

import boto3
import pytest
import ray
from helpers import bucket_keys, recording_trainable, start_ray_cluster, tiny_trial_data

from ctscan.cli import main
from tuning.cluster import unshared_nodes
from tuning.records import SearchOptions
from tuning.search import run_search
from tuning.space import NUMBER


@pytest.fixture(scope="module")
def two_gpu_nodes(s3_endpoint):
    ray.shutdown()  # this process leaves the session's Ray, if it joined it, for this cluster
    node = {"num_cpus": 1, "num_gpus": 1}
    cluster = start_ray_cluster(s3_endpoint, node, node)
    ray.init(address=cluster.address, include_dashboard=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_fractional_gpu_trials_spread_over_nodes_and_fall_back_to_cpu(tmp_path, s3_bucket,
                                                                      two_gpu_nodes, capfd):
    # Both nodes run on this machine, so they do see its folders.
    assert unshared_nodes(str(tmp_path / "shared")) == []
    assert not list((tmp_path / "shared").iterdir())  # the probe file is gone again
    root, data = tiny_trial_data(tmp_path)
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    (tmp_path / "seen").mkdir()
    options = SearchOptions(
        data=str(root), num_samples=5, max_epochs=1, grace_period=1, cpus_per_trial=0.5,
        gpus_per_trial=0.5, max_concurrent=5, storage_path=f"{s3_bucket}/runs",
        name="cluster", search_space=str(tmp_path / "space.yaml"),
        base_config={"image_size": 32, "epochs": 1, "num_workers": 1})
    best = run_search(options, data, trainable_fn=recording_trainable(tmp_path / "seen"))
    assert best["trials"] == 5 and best["errored_trials"] == 0
    assert best["checkpoint"].startswith(f"{s3_bucket}/runs/cluster/trial_")

    s3 = boto3.client("s3")
    rows = [[json.loads(line) for line in s3.get_object(
        Bucket=s3_bucket.removeprefix("s3://"), Key=key)["Body"].read().decode().splitlines()]
        for key in bucket_keys(s3_bucket, "runs/cluster/") if key.endswith("/result.json")]
    assert len(rows) == 5
    assert len({r[0]["node_id"] for r in rows}) == 2  # trials ran on both nodes
    assert {r["device"] for trial in rows for r in trial} == {"cpu"}  # no CUDA: CPU fallback
    # 2 GPUs / 0.5 per trial: never more than 4 of the 5 trials at once.
    # Each trial from its start, noted by the trainable (Ray's timestamps are whole seconds),
    # until its last result: the scheduler stops it there, before the trainable returns.
    started = {int(p.name): json.loads(p.read_text())["start"]
               for p in (tmp_path / "seen").iterdir()}
    spans = [(started[n], started[n] + t[-1]["time_total_s"])
             for n, t in ((t[0]["config"][NUMBER], t) for t in rows)]
    assert len(spans) == 5 and max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 4
    assert "CUDA is not available; training on the CPU" in capfd.readouterr().err


def test_a_folder_some_node_does_not_see_is_refused_before_any_work(tmp_path, two_gpu_nodes,
                                                                    monkeypatch, capsys):
    # Both nodes share this machine's disk, so the blind node is simulated; the probe itself is
    # checked for real in the test above.
    import tuning.cluster

    monkeypatch.setattr(tuning.cluster, "unshared_nodes", lambda folder: ["10.0.0.7 (1a2b3c4d)"])
    root, _ = tiny_trial_data(tmp_path)
    code = main(["tune", str(root), "--address", two_gpu_nodes.address, "--storage-path",
                 str(tmp_path / "runs"), "--search-space", str(tmp_path / "missing.yaml")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"ctscan: error: --storage-path {tmp_path / 'runs'} is a folder that Ray nodes "
        "10.0.0.7 (1a2b3c4d) do not see; on a cluster use s3://BUCKET/PATH, gs://BUCKET/PATH, "
        "or a folder mounted on every node (NFS)")
    assert not (tmp_path / "runs").exists()
