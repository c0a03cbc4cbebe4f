import errno

import numpy as np
import pytest
from conftest import make_class_folders, tree_snapshot
from PIL import Image

import data_utils.cache as cache_module
from data_utils.cache import load_dataset
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
    real = cache_module.decode_image
    monkeypatch.setattr(cache_module, "decode_image", lambda *a: calls.append(a) or real(*a))
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
    real, failed = cache_module.decode_image, []

    def fail_once(data, *args):
        if not failed:
            failed.append(data)
            raise failure
        return real(data, *args)

    monkeypatch.setattr(cache_module, "decode_image", fail_once)
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
