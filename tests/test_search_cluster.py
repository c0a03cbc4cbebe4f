"""Two Ray nodes that declare logical GPUs (no CUDA here): placement, limits, CPU fallback."""

import json
from pathlib import Path

import pytest
import ray
from conftest import tiny_trial_data
from ray.cluster_utils import Cluster

from tuning.search import SearchOptions, run_search


@pytest.fixture
def two_gpu_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, include_dashboard=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_fractional_gpu_trials_spread_over_nodes_and_fall_back_to_cpu(tmp_path, two_gpu_nodes,
                                                                      capfd):
    root, data = tiny_trial_data(tmp_path)
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    options = SearchOptions(
        data=str(root), num_samples=6, max_epochs=2, grace_period=2, cpus_per_trial=0.5,
        gpus_per_trial=0.5, max_concurrent=6, storage_path=str(tmp_path / "runs"),
        name="cluster", search_space=str(tmp_path / "space.yaml"),
        base_config={"image_size": 32, "epochs": 2, "num_workers": 1})
    best = run_search(options, data)
    assert best["trials"] == 6 and best["errored_trials"] == 0

    rows = [_rows(trial) for trial in Path(options.run_dir).glob("trial_*")]
    assert len({r[0]["node_id"] for r in rows}) == 2  # trials ran on both nodes
    assert {r["device"] for trial in rows for r in trial} == {"cpu"}  # no CUDA: CPU fallback
    # 2 GPUs / 0.5 per trial: never more than 4 trials at once.
    spans = [(t[0]["timestamp"] - t[0]["time_this_iter_s"], t[-1]["timestamp"]) for t in rows]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 4
    assert "CUDA is not available; training on the CPU" in capfd.readouterr().err


def _rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
