"""Shared fixtures: the real sample when present, an S3 server and bucket, an isolated cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import SAMPLE


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


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """s3://BUCKET of a fresh bucket; the endpoint and test credentials are in the environment,
    where pyarrow, Ray (started after this fixture) and subprocesses find them."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
