import errno
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_class_folders, tree_snapshot
from PIL import Image

import data_utils.cache as cache_module
from data_utils.cache import default_cache_dir, load_dataset
from data_utils.sources import DataError


def _add_bad_files(root):
    (root / "COVID" / "empty.png").write_bytes(b"")
    (root / "COVID" / "notes.png").write_text("not an image")
    good = (root / "COVID" / "COVID (0).png").read_bytes()
    (root / "non-COVID" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_files_are_skipped_with_reasons_and_the_rest_loads(tmp_path):
    root = make_class_folders(tmp_path / "data", 5)
    _add_bad_files(root)
    ds = load_dataset(root, image_size=32, progress=False)
    assert len(ds) == 10
    assert ds.images.shape == (10, 32, 32) and ds.images.dtype == np.uint8
    reasons = {s.path: s.reason for s in ds.skipped}
    assert set(reasons) == {"COVID/empty.png", "COVID/notes.png", "non-COVID/truncated.png"}
    assert "empty file" in reasons["COVID/empty.png"]
    assert "cannot identify image" in reasons["COVID/notes.png"]
    assert "truncated" in reasons["non-COVID/truncated.png"]


@pytest.fixture
def decode_calls(monkeypatch) -> list:
    """Records every file the cache decodes."""
    calls = []
    real = cache_module.decode_frames
    monkeypatch.setattr(cache_module, "decode_frames", lambda *a: calls.append(a) or real(*a))
    return calls


def test_second_load_decodes_nothing_and_matches(tmp_path, decode_calls):
    root = make_class_folders(tmp_path / "data", 5)
    _add_bad_files(root)
    first = load_dataset(root, image_size=32, progress=False)
    assert len(decode_calls) == 13
    second = load_dataset(root, image_size=32, progress=False)
    assert len(decode_calls) == 13  # not even the unreadable files are tried again
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.phash, second.phash)
    assert first.paths == second.paths and first.skipped == second.skipped
    assert first.modes == second.modes and first.sizes == second.sizes
    assert first.bits == second.bits == [8] * 10
    # A new size or resize mode is another cache entry, so it must decode again.
    load_dataset(root, image_size=24, progress=False)
    assert len(decode_calls) == 26
    load_dataset(root, image_size=32, resize="stretch", progress=False)
    assert len(decode_calls) == 39


def test_cache_follows_contents_not_names(tmp_path, decode_calls, isolated_cache):
    root = make_class_folders(tmp_path / "data", 4)
    load_dataset(root, image_size=32, progress=False)
    decode_calls.clear()
    (root / "COVID" / "COVID (0).png").rename(root / "COVID" / "renamed.png")
    load_dataset(root, image_size=32, progress=False)
    assert decode_calls == []  # same bytes, same cache
    (root / "COVID" / "renamed.png").write_bytes((root / "COVID" / "COVID (1).png").read_bytes())
    load_dataset(root, image_size=32, progress=False)
    assert decode_calls  # contents changed: rebuilt
    assert not list(isolated_cache.glob(".*.tmp"))  # atomic writes leave no temp files


def test_nothing_is_written_into_the_data_folder(tmp_path):
    root = make_class_folders(tmp_path / "data", 4)
    _add_bad_files(root)
    before = tree_snapshot(root)
    load_dataset(root, image_size=32, progress=False)
    load_dataset(root, image_size=32, progress=False)
    assert tree_snapshot(root) == before


def test_a_class_with_no_readable_image_is_an_error(tmp_path):
    root = make_class_folders(tmp_path / "data", 3)
    for f in (root / "non-COVID").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DataError, match="class 'non-COVID' has no readable images"):
        load_dataset(root, image_size=32, progress=False)


def test_identical_bytes_with_different_labels_is_an_error(tmp_path):
    root = make_class_folders(tmp_path / "data", 3)
    (root / "non-COVID" / "copy.png").write_bytes((root / "COVID" / "COVID (0).png").read_bytes())
    with pytest.raises(DataError, match="byte-identical but labelled"):
        load_dataset(root, image_size=32, progress=False)


@pytest.mark.parametrize("failure", [MemoryError(), OSError(errno.EIO, "Input/output error")])
def test_a_transient_failure_is_skipped_but_not_cached(tmp_path, monkeypatch, isolated_cache,
                                                       failure):
    root = make_class_folders(tmp_path / "data", 3)
    real, failed = cache_module.decode_frames, []

    def fail_once(*args):
        if not failed:
            failed.append(args)
            raise failure
        return real(*args)

    monkeypatch.setattr(cache_module, "decode_frames", fail_once)
    first = load_dataset(root, image_size=32, progress=False)
    [skipped] = first.skipped
    assert skipped.reason.startswith(type(failure).__name__)
    assert "not cached" in skipped.reason
    assert not list(isolated_cache.glob("*.npz"))  # so the next run tries that file again
    second = load_dataset(root, image_size=32, progress=False)
    assert len(second) == 6 and second.skipped == []
    assert list(isolated_cache.glob("*.npz"))


def test_a_broken_symlink_is_listed_as_skipped(tmp_path):
    root = make_class_folders(tmp_path / "data", 3)
    (root / "COVID" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "COVID" / "loop.png").symlink_to(root / "COVID" / "loop.png")
    ds = load_dataset(root, image_size=32, progress=False)
    assert len(ds) == 6
    assert {s.path: s.reason for s in ds.skipped} == {
        "COVID/gone.png": f"cannot read: broken symlink to {tmp_path / 'nowhere.png'}",
        "COVID/loop.png": f"cannot read: broken symlink to {root / 'COVID' / 'loop.png'}",
    }


def test_bit_depth_is_kept_per_file_and_cached(tmp_path):
    root = make_class_folders(tmp_path / "data", 3)
    wide = np.asarray(Image.open(root / "COVID" / "COVID (0).png")).astype(np.uint16) * 257
    Image.fromarray(wide).save(root / "COVID" / "wide.png")
    for _ in range(2):  # decoded, then loaded from the cache
        ds = load_dataset(root, image_size=32, progress=False)
        assert dict(zip(ds.paths, ds.bits, strict=True))["COVID/wide.png"] == 16
        assert sorted(ds.bits, key=str) == [16] + [8] * 6


def _pixels_by_path(ds) -> dict[str, bytes]:
    return {p: ds.images[i].tobytes() for i, p in enumerate(ds.paths)}


def test_cache_is_a_memory_map_that_round_trips(tmp_path, isolated_cache):
    root = make_class_folders(tmp_path / "data", 4)
    first = load_dataset(root, image_size=32, progress=False)
    assert isinstance(first.images, np.memmap)  # built in the dataset's order: no copy
    first_pixels = _pixels_by_path(first)
    first.images[0] = 0  # copy-on-write: the caller's change never reaches the cache
    second = load_dataset(root, image_size=32, progress=False)
    assert isinstance(second.images, np.memmap)
    assert _pixels_by_path(second) == first_pixels
    assert len(list(isolated_cache.glob("*.npy"))) == len(list(isolated_cache.glob("*.npz"))) == 1
    # A byte-identical copy and a rename reorder the rows: each file must keep its own pixels.
    (root / "COVID" / "COVID (0).png").rename(root / "COVID" / "z.png")
    (root / "COVID" / "a.png").write_bytes((root / "COVID" / "z.png").read_bytes())
    third = load_dataset(root, image_size=32, progress=False)
    expected = {{"COVID/COVID (0).png": "COVID/z.png"}.get(p, p): v
                for p, v in first_pixels.items()}
    assert _pixels_by_path(third) == {**expected, "COVID/a.png": expected["COVID/z.png"]}


def test_cache_is_rebuilt_when_its_format_changes_or_pixels_go_missing(
        tmp_path, monkeypatch, decode_calls, isolated_cache):
    root = make_class_folders(tmp_path / "data", 3)
    load_dataset(root, image_size=32, progress=False)
    monkeypatch.setattr(cache_module, "CACHE_FORMAT", cache_module.CACHE_FORMAT + 1)
    load_dataset(root, image_size=32, progress=False)
    assert len(decode_calls) == 12
    for pixels in isolated_cache.glob("*.npy"):
        pixels.unlink()
    again = load_dataset(root, image_size=32, progress=False)
    assert len(decode_calls) == 18 and len(again) == 6


def test_parallel_decode_is_byte_identical_to_serial(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "data", 12)
    _add_bad_files(root)  # failures interleave with rows
    files = {}
    for workers in (1, 4):
        monkeypatch.setattr(cache_module.os, "cpu_count", lambda w=workers: w)
        monkeypatch.setattr(cache_module, "SHARD_SLICES", 5)  # several shards, one partial
        cache = tmp_path / f"cache{workers}"
        ds = load_dataset(root, image_size=32, cache_dir=cache, progress=False)
        [npy] = cache.glob("*.npy")
        files[workers] = (npy.read_bytes(), ds.phash.tobytes(), ds.paths,
                          [s.path for s in ds.skipped])
    assert files[1] == files[4]


def test_unchanged_files_are_not_hashed_again(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "data", 3)
    target, twin = root / "COVID" / "COVID (0).png", root / "COVID" / "COVID (1).png"

    def settle(path, mtime_ns=1_000_000_000):  # written long ago, so its stamp is trusted
        os.utime(path, ns=(mtime_ns, mtime_ns))

    for f in root.rglob("*.png"):
        settle(f)
    first = load_dataset(root, image_size=32, progress=False)
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: reads.append(p.name) or real_read(p))
    assert load_dataset(root, image_size=32, progress=False).sha256 == first.sha256
    assert reads == []  # neither hashed nor decoded

    target.write_bytes(real_read(twin))
    settle(target, 2_000_000_000)  # another mtime: hashed again, the new content is seen
    changed = load_dataset(root, image_size=32, progress=False)
    digest = dict(zip(changed.paths, changed.sha256, strict=True))
    assert digest["COVID/COVID (0).png"] == digest["COVID/COVID (1).png"]

    # What is not detected, as the README says: new bytes of the same size, mtime put back.
    target.write_bytes(b"x" * target.stat().st_size)
    settle(target, 2_000_000_000)
    reads.clear()
    reloaded = load_dataset(root, image_size=32, progress=False)
    assert reads == [] and dict(zip(reloaded.paths, reloaded.sha256, strict=True)) == digest


def test_an_empty_cache_variable_counts_as_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CTSCAN_CACHE_DIR", "")
    assert default_cache_dir() == tmp_path / "xdg" / "ctscan"  # not the working folder
    monkeypatch.setenv("CTSCAN_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
