"""The Ray cluster a search runs on: starting or joining it, what it has, and whether its nodes
all see the run folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_utils import runfolder
from data_utils.errors import UsageError
from tuning.space import CPU_SPACE, DEFAULT_SPACE


def start_ray(address: str | None) -> None:
    """Join `address`, or start Ray here ("local": Ray would otherwise join the last cluster
    started on this machine, even a dead one)."""
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)


def default_space() -> Path:
    """The GPU space where the cluster has GPUs, else the CPU space (small ResNets)."""
    return DEFAULT_SPACE if ray.cluster_resources().get("GPU", 0) > 0 else CPU_SPACE


def _sees(path: str) -> bool:
    return os.path.exists(path)


def unshared_nodes(folder: str) -> list[str]:
    """The live Ray nodes that do not see the local `folder` as this process does, each as
    "IP (node id)"; none on a single-node cluster."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return []
    probe = Path(folder).expanduser().resolve() / f".ctscan-probe-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.touch()
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe)) for n in nodes])
    finally:
        probe.unlink()
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})"
            for n, ok in zip(nodes, seen, strict=True) if not ok]


def check_shared_storage(address: str | None, storage_path: str) -> None:
    """On a cluster of several machines every trial writes to storage_path: a folder only this
    machine sees would scatter the run over the nodes. Joins the cluster to ask."""
    if not address or runfolder.is_uri(storage_path):
        return
    start_ray(address)
    blind = unshared_nodes(storage_path)
    if blind:
        raise UsageError(f"--storage-path {storage_path} is a folder that Ray nodes "
                         f"{', '.join(blind)} do not see; on a cluster use s3://BUCKET/PATH, "
                         "gs://BUCKET/PATH, or a folder mounted on every node (NFS)")
