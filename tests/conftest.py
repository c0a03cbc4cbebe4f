"""Shared fixtures: small generated datasets, the real sample when present, an isolated cache."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("CTSCAN_SAMPLE_DIR", REPO.parent / "shared/data/sarscov2-ct-sample"))


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


def smooth_image(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A distinct uint8 picture with enough structure at every scale for a stable pHash."""
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def make_class_folders(root: Path, n_per_class: int = 20, seed: int = 0,
                       classes: tuple[str, ...] = ("COVID", "non-COVID")) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(smooth_image(rng)).save(root / name / f"{name} ({i}).png")
    return root


def tiny_trial_data(tmp_path: Path):
    """(data folder, TrialData) of 48 small demo slices: enough for a trial to run, fast."""
    from data_utils.cache import load_dataset
    from data_utils.demo import make_demo_data
    from data_utils.split import split_dataset
    from tuning.train import trial_data

    root = make_demo_data(tmp_path / "data", n_per_class=24, size=64)
    ds = load_dataset(root, 32, cache_dir=tmp_path / "cache", progress=False)
    return root, trial_data(ds, split_dataset(ds, (0.6, 0.2, 0.2), seed=0, group_by="none"))


def tree_snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under root with its mtime and content digest: compare before/after to prove
    no writes (a folder's mtime changes when an entry is added or removed, even a temp file)."""
    return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, hashlib.sha256(
                p.read_bytes() if p.is_file() else b"").hexdigest())
            for p in [root, *sorted(root.rglob("*"))]}


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


def bucket_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every object key in an s3://BUCKET under prefix, read with boto3 (not our own code)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://"), Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
