"""Plain test helpers shared by the test modules: paths, generated images and folders, snapshots."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

if TYPE_CHECKING:  # Ray takes a second to import: only the tests that use it pay for it
    from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("CTSCAN_SAMPLE_DIR", REPO.parent / "shared/data/sarscov2-ct-sample"))


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


def recording_trainable(folder: Path) -> Callable:
    """The real trainable, noting first in `folder`, for each trial (a file named by its number),
    its process, node and start time, the size of the data it was handed through Ray, and the
    file its pixels are a memory map of (None if they are not one) beside its node's copy of the
    cache."""
    import ray

    from tuning.search import trainable
    from tuning.space import NUMBER

    def record_then_train(params, data, options):
        images = data.images()
        (folder / str(params[NUMBER])).write_text(json.dumps({
            "pid": os.getpid(), "start": time.time(),
            "node": ray.get_runtime_context().get_node_id(),
            "handed_bytes": len(pickle.dumps(data)),
            "mapped": str(images.filename) if isinstance(images, np.memmap) else None,
            "node_copy": str(data.pixels.local_path())}))
        trainable(params, data, options)

    return record_then_train


def tree_snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under root with its mtime and content digest: compare before/after to prove
    no writes (a folder's mtime changes when an entry is added or removed, even a temp file)."""
    return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, hashlib.sha256(
                p.read_bytes() if p.is_file() else b"").hexdigest())
            for p in [root, *sorted(root.rglob("*"))]}


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point boto3, pyarrow and Ray's workers at the test server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def start_ray_cluster(s3_endpoint: str, head: dict, *workers: dict) -> Cluster:
    """A local Ray cluster of a head and worker nodes (each given as ray.init's resources) whose
    workers reach the S3 test server: they inherit the environment of their node's raylet, set
    here, not the one of the test that later joins the cluster."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_environment(s3_endpoint).items():
            patch.setenv(key, value)
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for node in workers:
            cluster.add_node(**node)
    return cluster


def bucket_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every object key in an s3://BUCKET under prefix, read with boto3 (not our own code)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://"), Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# Image files as other programs write them, byte by byte where Pillow cannot.
def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if img.mode in ("I", "F") else "PNG")  # PNG holds neither
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_with_sbit(samples: np.ndarray, significant_bits: int) -> bytes:
    """A 16-bit gray PNG with an sBIT chunk right after IHDR (8-byte signature + 25-byte IHDR)."""
    png = png_bytes(Image.fromarray(samples.astype(np.uint16)))
    return png[:33] + png_chunk(b"sBIT", bytes([significant_bits])) + png[33:]


def tiff_bytes(values: np.ndarray, bits: int, sample_format: int = 1) -> bytes:
    """A one-strip gray TIFF written by hand: Pillow writes neither 12-bit nor unsigned 32-bit."""
    height, width = values.shape
    if bits == 12:  # two samples in three bytes, most significant bits first
        samples = values.astype(np.uint16).ravel()
        first, second = samples[0::2], samples[1::2]
        raw = np.stack([first >> 4, (first & 15) << 4 | second >> 8, second & 255], 1)
        raw = raw.astype(np.uint8).tobytes()
    else:
        raw = values.astype(f"<{'u' if sample_format == 1 else 'i'}{bits // 8}").tobytes()
    tags = {256: width, 257: height, 258: bits, 259: 1, 262: 1, 273: 0, 277: 1, 278: height,
            279: len(raw), 339: sample_format}
    tags[273] = 8 + 2 + 12 * len(tags) + 4  # the strip follows the header and the one IFD
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags.items())
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + raw


def read_events(folder: Path) -> EventAccumulator:
    """A run's events, read by TensorBoard's own loading code."""
    return EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()


def hparams_data(events: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    """What the HParams plugin reads from a run: metadata.EXPERIMENT_TAG and the session tags."""
    return plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata(tag).plugin_data.content)


def stop_at_the_first_test_probability(monkeypatch: pytest.MonkeyPatch,
                                       check: Callable[[], None]) -> None:
    """Make an evaluation call `check` and stop (KeyboardInterrupt) just as it is about to
    compute its first test probability: what is on record by then was written before the test
    split was read."""
    import results.evaluate as evaluate

    test_rows: list[np.ndarray] = []
    real_rows, real_proba = evaluate.recorded_rows, evaluate._proba

    def rows(ds, split_json: dict, name: str) -> np.ndarray:
        found = real_rows(ds, split_json, name)
        if name == "test":
            test_rows.append(found)
        return found

    def proba(member, ds, rows_of: np.ndarray) -> np.ndarray:
        if any(rows_of is test for test in test_rows):
            check()
            raise KeyboardInterrupt
        return real_proba(member, ds, rows_of)

    monkeypatch.setattr(evaluate, "recorded_rows", rows)
    monkeypatch.setattr(evaluate, "_proba", proba)
