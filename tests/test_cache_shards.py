"""The cache's shards: the same bytes whoever decodes them (this process's threads, Ray tasks), a
build that keeps the shards it finished, and a cache in a bucket that each node fetches once."""

import io
import json

import boto3
import nibabel as nib
import numpy as np
import pytest
from helpers import bucket_keys, make_class_folders
from test_cache import _add_bad_files
from test_volumes import level_slice, write_ct

import data_utils.cache as cache_module
from data_utils.cache import load_dataset
from data_utils.split import cached_near_duplicate_pairs


@pytest.fixture
def small_shards(monkeypatch):
    """A shard of a few slices: even a test's data set is many of them."""
    monkeypatch.setattr(cache_module, "MIN_SHARD_SLICES", 4)


def mixed_data(root):
    """PNGs, unreadable files, a 3-frame DICOM and a 4-slice NIfTI volume of which two slices
    are constant in the window, so they have reasons instead of rows."""
    make_class_folders(root, 12)
    _add_bad_files(root)
    frames = np.stack([level_slice(hu) for hu in (-1250, -950, -650)])
    write_ct(root / "COVID" / "multi.dcm", frames)
    volume = np.stack([level_slice(hu) for hu in (-1200, -900, -2000, -600)], axis=-1)
    volume[..., 2] = -2000  # constant below the window: no usable slice
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), root / "COVID" / "vol.nii.gz")
    return root


def same_dataset(one, other) -> None:
    np.testing.assert_array_equal(one.images, other.images)
    np.testing.assert_array_equal(one.phash, other.phash)
    assert (one.paths, one.sha256, one.frames, one.skipped, one.bits, one.modes, one.sizes) == (
        other.paths, other.sha256, other.frames, other.skipped, other.bits, other.modes,
        other.sizes)
    pairs = cached_near_duplicate_pairs(one)
    assert np.array_equal(pairs, cached_near_duplicate_pairs(other))


def test_ray_tasks_and_threads_build_the_same_cache(tmp_path, local_ray, small_shards):
    from tuning.cluster import decode_on_cluster

    root = mixed_data(tmp_path / "data")
    threads = load_dataset(root, 32, cache_dir=tmp_path / "threads", progress=False)
    ray = load_dataset(root, 32, cache_dir=tmp_path / "ray", progress=False,
                       decode=decode_on_cluster)
    assert len(threads) == 24 + 3 + 2 and len(threads.skipped) == 3 + 2
    same_dataset(threads, ray)
    [one], [other] = (list((tmp_path / name).glob("*.npy")) for name in ("threads", "ray"))
    assert one.read_bytes() == other.read_bytes()
    # Joined into the entry's one file: no shard is left in a cache folder.
    assert not any((tmp_path / "ray" / "shards").iterdir())


def counting(runs: list):
    """decode_in_threads, noting each shard it is given."""
    def run(jobs, advance):
        runs.extend(job.name for job in jobs)
        return cache_module.decode_in_threads(jobs, advance)
    return run


def test_an_interrupted_build_keeps_the_shards_it_finished(tmp_path, small_shards):
    root = mixed_data(tmp_path / "data")
    finished = []

    def interrupted_after_three(jobs, advance):
        for job in jobs[:3]:
            cache_module.build_shard(job)
            finished.append(job.name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_dataset(root, 32, progress=False, decode=interrupted_after_three)
    resumed, fresh = [], []
    ds = load_dataset(root, 32, progress=False, decode=counting(resumed))
    same_dataset(ds, load_dataset(root, 32, cache_dir=tmp_path / "fresh", progress=False,
                                  decode=counting(fresh)))
    assert len(fresh) > 3 and sorted(resumed + finished) == sorted(fresh)


def test_a_cache_in_a_bucket_is_fetched_once_per_node(tmp_path, s3_bucket, isolated_cache,
                                                      small_shards):
    """The shards stay in the bucket; this machine joins them into its own copy in its cache
    folder once, and fetches it again, without decoding, when that copy is gone."""
    root = mixed_data(tmp_path / "data")
    built = []
    first = load_dataset(root, 32, cache_dir=f"{s3_bucket}/cache", progress=False,
                         decode=counting(built))
    [copy] = isolated_cache.glob("*.npy")
    assert isinstance(first.images, np.memmap) and first.images.filename == copy
    shards = [k for k in bucket_keys(s3_bucket, "cache/shards/") if k.endswith(".u8")]
    assert len(shards) == len(built) > 1
    copy.unlink()
    again = []
    second = load_dataset(root, 32, cache_dir=f"{s3_bucket}/cache", progress=False,
                          decode=counting(again))
    assert again == [] and not copy.exists()  # fetched when a process reads the pixels
    same_dataset(first, second)
    assert copy.exists()
    same_dataset(first, load_dataset(root, 32, cache_dir=tmp_path / "folder", progress=False))


def test_an_entry_naming_a_shard_outside_its_folder_is_rebuilt(tmp_path, s3_bucket):
    """A bucket may be shared: an entry whose shard names a path is not followed."""
    root = mixed_data(tmp_path / "data")
    cache = f"{s3_bucket}/cache"
    first = load_dataset(root, 32, cache_dir=cache, progress=False)
    bucket, s3 = s3_bucket.removeprefix("s3://"), boto3.client("s3")
    [key] = [k for k in bucket_keys(s3_bucket, "cache/")
             if k.count("/") == 1 and k.endswith(".npz")]  # the entry
    with np.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as npz:
        saved = dict(npz)
    saved["shards"] = np.array(json.dumps([["../../outside", len(first.phash)]]))
    buffer = io.BytesIO()
    np.savez(buffer, **saved)
    s3.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    again = load_dataset(root, 32, cache_dir=cache, progress=False)
    assert ".." not in json.dumps(again.pixels.shards)  # made again from its shards
    same_dataset(first, again)


def test_shards_hold_whole_files_and_none_is_empty():
    frames = {"a": 3, "b": 70, "c": 1, "d": 64}
    assert cache_module._chunks(list(frames), frames) == [["a", "b"], ["c", "d"]]
    assert cache_module._chunks([], {}) == []  # nothing readable: nothing to decode
