"""cluster.yaml is checked the way `ray up` checks it, and the check can fail."""

import copy

import jsonschema
import pytest
import yaml
from helpers import REPO
from ray.autoscaler._private.util import prepare_config, validate_config


def _check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_ray_up(cluster):
    prepared = _check(cluster)
    assert prepared["provider"]["type"] == "aws"
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] >= 1 and prepared["head_node_type"] == "head"
    assert any("pip install" in c and "ctscan" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("field, value", [
    ("max_workers", "four"),
    ("idle_timeout_minutes", [10]),
    ("cluster_name", 42),
])
def test_a_broken_copy_fails_the_same_check(cluster, field, value):
    cluster[field] = value
    with pytest.raises(jsonschema.ValidationError):
        _check(cluster)
