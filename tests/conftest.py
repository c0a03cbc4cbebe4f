"""Shared fixtures: the real sample when present, an S3 server and bucket, one Ray for the
session, an isolated cache."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import SAMPLE, s3_environment, start_ray_cluster

from data_utils.identity import KEY_FILE_ENV

if TYPE_CHECKING:  # Ray takes a second to import: only the tests that use it pay for it
    from ray.cluster_utils import Cluster


RAY_FIXTURES = {"local_ray", "two_gpu_nodes"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that joins a Ray cluster is marked `ray` by the fixture it asks for (`make check`
    leaves those out); one that starts Ray in a child process carries the mark itself."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True, scope="session")
def session_key(tmp_path_factory) -> Iterator[Path]:
    """No test reads or makes the user's pseudonym key: one key for the session (a run made in
    one test is evaluated in another), made on first use; a test wanting another sets its own
    CTSCAN_KEY_FILE."""
    key = tmp_path_factory.mktemp("config") / "identity.key"
    saved = os.environ.get(KEY_FILE_ENV)
    os.environ[KEY_FILE_ENV] = str(key)
    yield key
    if saved is None:
        os.environ.pop(KEY_FILE_ENV, None)
    else:
        os.environ[KEY_FILE_ENV] = saved


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory) -> Iterator[Path]:
    """Module fixtures are set up before a test's isolated cache: they get the session's, never
    the user's ~/.cache/ctscan (whose test-split ledgers would carry counts between sessions)."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("session-cache")
        patch.setenv("CTSCAN_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """No test reads or writes the user's ~/.cache/ctscan."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CTSCAN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def sample_dir() -> Path:
    if not (SAMPLE / "COVID").is_dir():
        pytest.skip(f"real CT sample not found at {SAMPLE} (set CTSCAN_SAMPLE_DIR)")
    return SAMPLE


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto's) on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint) -> Iterator[Cluster]:
    """One 2-CPU, no-GPU Ray for the whole session (as on CI, whatever this machine has): every
    in-process search joins it instead of starting its own."""
    import ray

    cluster = start_ray_cluster(s3_endpoint, {"num_cpus": 2, "num_gpus": 0})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray(ray_cluster) -> Cluster:
    """This process joined to the session's Ray. It stays joined after the module, for the next
    one; a module that joins another cluster (test_search_cluster) leaves it first, and the next
    module to ask joins again."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, include_dashboard=False, log_to_driver=False)
    return ray_cluster


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """s3://BUCKET of a fresh bucket; the endpoint and test credentials are in the environment,
    where pyarrow, Ray (started after this fixture) and subprocesses find them."""
    import boto3

    for key, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
