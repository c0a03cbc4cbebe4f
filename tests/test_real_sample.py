"""The real SARS-CoV-2 CT sample (../shared/data): its traps are handled, not just survived."""

import io
import json

import numpy as np
import pytest
from helpers import png_bytes, png_with_sbit
from PIL import Image

from ctscan.cli import main
from data_utils import decode
from data_utils.cache import load_dataset
from data_utils.decode import _plain_gray_png, decode_image
from data_utils.split import SPLITS, near_duplicate_pairs, split_dataset

DUPLICATE_PAIRS = [("Covid (128).png", "Covid (129).png"), ("Covid (134).png", "Covid (135).png")]


@pytest.fixture
def sample(sample_dir):
    return load_dataset(sample_dir, progress=False)


def test_all_314_slices_load(sample):
    assert len(sample) == 314 and sample.skipped == []
    assert sample.positive_class == "COVID"
    assert np.bincount(sample.labels).tolist() == [154, 160]
    assert sample.images.shape == (314, 224, 224)


@pytest.mark.parametrize("group_by", ["none", "duplicates"])
def test_duplicate_pairs_share_a_split(sample, group_by):
    for seed in range(10):
        split = split_dataset(sample, seed=seed, group_by=group_by)
        where = {p.split("/")[-1]: SPLITS[s] for p, s in zip(sample.paths, split.assignment,
                                                              strict=True)}
        for a, b in DUPLICATE_PAIRS:
            assert where[a] == where[b]


def test_rgb_and_rgba_versions_of_one_slice_decode_identically(sample_dir):
    rgb_file = next(p for p in sorted((sample_dir / "COVID").iterdir())
                    if Image.open(p).mode == "RGB")
    rgb = Image.open(rgb_file)
    versions = {}
    for mode in ("RGB", "RGBA", "L"):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format="PNG")
        versions[mode] = decode_image(buf.getvalue(), 224).pixels
    np.testing.assert_array_equal(versions["RGB"], versions["RGBA"])
    np.testing.assert_array_equal(versions["RGB"], versions["L"])


def test_inspect_warns_about_the_mode_shortcut(sample_dir, capsys):
    assert main(["inspect", str(sample_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == {"non-COVID": 154, "COVID": 160}
    assert report["modes"]["non-COVID"] == {"RGBA": 154}
    assert report["modes"]["COVID"] == {"RGBA": 105, "RGB": 55}
    assert report["skipped"] == []
    assert ["COVID/Covid (128).png", "COVID/Covid (129).png"] in report["duplicate_groups"]
    assert ["COVID/Covid (134).png", "COVID/Covid (135).png"] in report["duplicate_groups"]
    assert any(w.startswith("image mode predicts the label") for w in report["warnings"])


@pytest.mark.parametrize("depth", [8, 16])
def test_libpng_and_pillow_build_the_same_cache_and_near_duplicate_pairs(
        sample_dir, tmp_path, monkeypatch, depth):
    """The real slices as gray PNGs (8 bits as COVIDx CT ships them; 12 bits in 16 with sBIT as
    a scanner writes them, its low bits noisy) take the libpng path; the cache built through it
    holds the pixels and hashes Pillow gives, so the near-duplicate pairs are the same."""
    rng = np.random.default_rng(0)
    root = tmp_path / "gray"
    for src in sorted(sample_dir.glob("*/*.png")):
        gray = np.asarray(Image.open(src).convert("L"))
        dest = root / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if depth == 8:
            data = png_bytes(Image.fromarray(gray))
        else:
            scanner = gray.astype(np.uint16) << 4 | rng.integers(0, 16, gray.shape, np.uint16)
            data = png_with_sbit(scanner << 4 | scanner >> 8, 12)  # the PNG spec's scaling
        assert _plain_gray_png(data) is not None
        dest.write_bytes(data)
    through_libpng = load_dataset(root, cache_dir=tmp_path / "libpng", progress=False)
    monkeypatch.setattr(decode, "_decode_gray_png", lambda *args: None)
    through_pillow = load_dataset(root, cache_dir=tmp_path / "pillow", progress=False)
    assert len(through_libpng) == 314 and through_libpng.bits[0] == (8 if depth == 8 else 12)
    np.testing.assert_array_equal(through_libpng.images, through_pillow.images)
    np.testing.assert_array_equal(through_libpng.phash, through_pillow.phash)
    pairs = near_duplicate_pairs(through_libpng.phash)
    assert len(pairs) >= len(DUPLICATE_PAIRS)
    np.testing.assert_array_equal(pairs, near_duplicate_pairs(through_pillow.phash))
