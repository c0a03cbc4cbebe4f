"""The Ray cluster a search runs on: starting or joining it, what it has, whether its nodes all
see the run folder, and decoding the dataset on all its cores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_utils import runfolder
from data_utils.cache import CLUSTER_CACHE, ShardJob, build_shard
from data_utils.errors import UsageError
from data_utils.sources import DataError
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


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def nodes_without(path: str) -> list[str]:
    """The live Ray nodes on which `path` does not exist, each as "IP (node id)"."""
    nodes = _alive_nodes()
    sees = ray.remote(num_cpus=0)(_sees)
    seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(path) for n in nodes])
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})"
            for n, ok in zip(nodes, seen, strict=True) if not ok]


def unshared_nodes(folder: str) -> list[str]:
    """The live Ray nodes that do not see the local `folder` as this process does, each as
    "IP (node id)"; none on a single-node cluster."""
    if len(_alive_nodes()) < 2:
        return []
    probe = Path(folder).expanduser().resolve() / f".ctscan-probe-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.touch()
    try:
        return nodes_without(str(probe))
    finally:
        probe.unlink()


def cache_location(cache_dir: str | None, storage_path: str) -> str | None:
    """Where a search's cache lives: --cache-dir, else on a cluster of several nodes a folder of
    the storage path (which every node reaches: check_shared_storage), else this machine's
    default (None)."""
    if cache_dir or len(_alive_nodes()) < 2:
        return cache_dir
    return runfolder.join(storage_path, CLUSTER_CACHE)


def decode_on_cluster(jobs: list[ShardJob], advance: Callable[[int], None]) -> list[dict]:
    """data_utils.cache's ShardRunner on Ray: one task per shard, each on one core of any node,
    so decoding uses every core of the cluster (one machine's too). Ray's worker processes run
    in parallel with no GIL between them and, unlike a process pool, never re-run the caller's
    main module. Each writes its shard to the cache location; only its manifest (hashes and
    per-file facts, about 40 bytes a slice) comes back. Returns the manifests in job order, each
    with the "node" that built it."""
    if not jobs:
        return []
    if len(_alive_nodes()) > 1:
        _check_nodes_see(jobs[0])
    build = ray.remote(num_cpus=1)(_build_shard_here)
    pending = {build.remote(job): k for k, job in enumerate(jobs)}
    manifests: list[dict] = [{}] * len(jobs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(done[0])
        try:
            manifests[k] = ray.get(done[0])
        except ray.exceptions.RayError as e:
            raise DataError(f"decoding shard {jobs[k].name} on the cluster failed: "
                            f"{str(e).strip().splitlines()[-1]}") from e
        advance(sum(n for *_, n in jobs[k].files))
    return manifests


def _build_shard_here(job: ShardJob) -> dict:
    return {**build_shard(job), "node": ray.get_runtime_context().get_node_id()}


def _check_nodes_see(job: ShardJob) -> None:
    """Every node decodes some shards, so every node must see the data at the path this machine
    does (cluster.yaml syncs it to each one), and a cache folder (a bucket needs no check)."""
    _, path, _ = job.files[0]
    blind = nodes_without(path)
    if blind:
        raise UsageError(f"Ray nodes {', '.join(blind)} do not see the data set's files where "
                         "this machine reads them; copy the data set to the same path on every "
                         "node (cluster.yaml's setup_commands do)")
    if not runfolder.is_uri(job.location):
        blind = unshared_nodes(job.location)
        if blind:
            raise UsageError(f"--cache-dir {job.location} is a folder that Ray nodes "
                             f"{', '.join(blind)} do not see; on a cluster give a bucket "
                             "(s3://BUCKET/PATH) or a folder mounted on every node")


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
