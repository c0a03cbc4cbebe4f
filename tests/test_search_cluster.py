"""Two Ray nodes that declare logical GPUs (no CUDA here), the run folder or the cache in a
bucket: placement, limits, CPU fallback, shared storage, decoding on every node and each node's
own copy of the cache."""

import json
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
from helpers import bucket_keys, recording_trainable, start_ray_cluster, tiny_trial_data

import data_utils.cache as cache_module
from ctscan.cli import main
from data_utils.cache import load_dataset
from data_utils.demo import make_demo_data
from data_utils.split import cached_near_duplicate_pairs, split_dataset
from tuning.cluster import decode_on_cluster, unshared_nodes
from tuning.records import SearchOptions
from tuning.search import run_search
from tuning.space import NUMBER, decode_params
from tuning.train import train_trial, trial_data


@pytest.fixture(scope="module")
def two_gpu_nodes(s3_endpoint, tmp_path_factory):
    """Each node with a cache folder of its own, as two machines have: a cache in a bucket is
    fetched into it."""
    ray.shutdown()  # this process leaves the session's Ray, if it joined it, for this cluster
    folders = [tmp_path_factory.mktemp(f"node-{k}-cache") for k in range(2)]
    nodes = [{"num_cpus": 1, "num_gpus": 1, "env_vars": {"CTSCAN_CACHE_DIR": str(folder)}}
             for folder in folders]
    cluster = start_ray_cluster(s3_endpoint, *nodes)
    cluster.cache_folders = folders
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


def test_every_node_decodes_and_each_trial_reads_its_own_nodes_copy(tmp_path, s3_bucket,
                                                                   two_gpu_nodes, monkeypatch):
    """The cache in a bucket: Ray tasks on both nodes decode it (the same pixels, hashes and
    near-duplicate pairs as this process's threads), each trial memory-maps its own node's copy
    and is handed row numbers only, and every trial's results equal one run here, without Ray,
    on the threads' cache."""
    monkeypatch.setattr(cache_module, "MIN_SHARD_SLICES", 8)  # 96 slices: 12 shards
    root = make_demo_data(tmp_path / "data", n_per_class=48, size=64)
    built = []

    def record_nodes(jobs, advance):
        built.extend(decode_on_cluster(jobs, advance))
        return built[-len(jobs):]

    ours = load_dataset(root, 32, cache_dir=f"{s3_bucket}/cache", progress=False,
                        decode=record_nodes)
    threads = load_dataset(root, 32, cache_dir=tmp_path / "local", progress=False)
    assert len(built) == 12 and len({m["node"] for m in built}) == 2
    shards = [k for k in bucket_keys(s3_bucket, "cache/shards/") if k.endswith(".u8")]
    assert len(shards) == 12  # kept in the bucket: each node fetches from them
    np.testing.assert_array_equal(ours.images, threads.images)
    np.testing.assert_array_equal(ours.phash, threads.phash)
    assert (ours.sha256, ours.paths, ours.frames) == (threads.sha256, threads.paths,
                                                      threads.frames)
    pairs = cached_near_duplicate_pairs(ours)
    assert len(pairs) and np.array_equal(pairs, cached_near_duplicate_pairs(threads))

    split = split_dataset(ours, (0.6, 0.2, 0.2), seed=0, group_by="none")
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    (tmp_path / "seen").mkdir()
    options = SearchOptions(
        data=str(root), num_samples=4, max_epochs=1, grace_period=1, cpus_per_trial=1,
        gpus_per_trial=0, max_concurrent=2, storage_path=str(tmp_path / "runs"), name="nodes",
        search_space=str(tmp_path / "space.yaml"),
        base_config={"image_size": 32, "epochs": 1, "num_workers": 1})
    best = run_search(options, trial_data(ours, split),
                      trainable_fn=recording_trainable(tmp_path / "seen"))
    assert best["trials"] == 4 and best["errored_trials"] == 0

    seen = [json.loads(p.read_text()) for p in (tmp_path / "seen").iterdir()]
    copy_of = {s["node"]: s["node_copy"] for s in seen}
    assert len(copy_of) == 2  # trials ran on both nodes
    assert all(s["mapped"] == copy_of[s["node"]] and s["handed_bytes"] < 8192 for s in seen)
    assert {Path(c).parent for c in copy_of.values()} == set(two_gpu_nodes.cache_folders)

    local = trial_data(threads, split)
    results = [json.loads(p.read_text().splitlines()[-1])
               for p in (tmp_path / "runs" / "nodes").glob("*/result.json")]
    assert len(results) == 4
    for k, result in enumerate(results):
        config = options.trial_config(decode_params(result["config"]))
        config.device = "cpu"
        alone = train_trial(config, local, tmp_path / f"alone-{k}")
        assert (result["val_auc"], result["train_loss"]) == pytest.approx(
            (alone["val_auc"], alone["train_loss"]), abs=1e-6)
