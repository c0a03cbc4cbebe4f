import numpy as np
from helpers import make_class_folders, png_bytes, png_with_sbit, smooth_image
from PIL import Image

from data_utils.cache import load_dataset
from data_utils.doctor import format_report, inspect_dataset


def _resave(folder, size):
    for f in folder.iterdir():
        Image.open(f).resize(size).save(f)


def test_size_that_follows_the_label_is_warned_about(tmp_path):
    root = make_class_folders(tmp_path / "d", 20)
    _resave(root / "COVID", (64, 40))
    report = inspect_dataset(load_dataset(root, image_size=32, progress=False))
    [warning] = report["warnings"]
    assert warning.startswith("image size predicts the label") and "--resize stretch" in warning
    assert report["sizes"]["COVID"] == {"width": [64, 64], "height": [40, 40]}


def test_no_false_alarm_when_sizes_only_identify_patients(tmp_path):
    """Each 'patient' (a run of near-identical slices) has its own size, in both classes."""
    rng = np.random.default_rng(0)
    for name in ("COVID", "non-COVID"):
        (tmp_path / name).mkdir()
        for patient in range(12):
            base = rng.integers(0, 256, (16, 16)).astype(float)
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            for s in range(4):
                noisy = (base + rng.normal(0, 2, base.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(noisy).resize(size, Image.Resampling.BICUBIC).save(
                    tmp_path / name / f"p{patient}-{s}.png")
    report = inspect_dataset(load_dataset(tmp_path, image_size=48, progress=False))
    assert len(report["near_duplicate_groups"]) == 24  # the patients were found
    assert report["warnings"] == []


def test_near_identical_files_with_different_labels_are_flagged(tmp_path):
    root = make_class_folders(tmp_path / "d", 10)
    pixels = np.asarray(Image.open(root / "COVID" / "COVID (0).png")).astype(int) + 1
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "non-COVID" / "twin.png")
    report = inspect_dataset(load_dataset(root, image_size=32, progress=False))
    assert ["COVID/COVID (0).png", "non-COVID/twin.png"] in report["near_duplicate_groups"]
    assert any("hold both labels" in w for w in report["warnings"])


def test_bit_depths_are_reported_per_class_and_a_mix_is_warned_about(tmp_path):
    root = make_class_folders(tmp_path / "d", 6)
    for f in sorted((root / "non-COVID").iterdir())[:2]:  # the same pictures, stored 16-bit
        Image.fromarray(np.asarray(Image.open(f)).astype(np.uint16) * 257).save(f)
    report = inspect_dataset(load_dataset(root, image_size=32, progress=False))
    assert report["bits"] == {"non-COVID": {"8": 4, "16": 2}, "COVID": {"8": 6}}
    assert any(w.startswith("images mix bit depths (8-bit 10, 16-bit 2)")
               for w in report["warnings"])
    assert "depth: 8-bit 4, 16-bit 2" in format_report(report)


def test_one_bit_depth_is_no_warning(tmp_path):
    report = inspect_dataset(load_dataset(make_class_folders(tmp_path / "d", 6), image_size=32,
                                          progress=False))
    assert report["bits"] == {"non-COVID": {"8": 6}, "COVID": {"8": 6}}
    assert not any("bit depth" in w for w in report["warnings"])


def _twelve_bit_in_sixteen(root, significant_bits=None):
    """Every slice a 12-bit scan (0..4095) in a 16-bit PNG, with or without an sBIT chunk."""
    rng = np.random.default_rng(3)
    for name in ("COVID", "non-COVID"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            samples = (smooth_image(rng, 40).astype(np.uint16) * 16)  # at most 4080
            data = (png_with_sbit(samples, significant_bits) if significant_bits
                    else png_bytes(Image.fromarray(samples)))
            (root / name / f"{i}.png").write_bytes(data)
    return root


def test_twelve_bit_slices_in_sixteen_bit_files_are_warned_about(tmp_path):
    report = inspect_dataset(load_dataset(_twelve_bit_in_sixteen(tmp_path / "a"), image_size=32,
                                          progress=False))
    [warning] = [w for w in report["warnings"] if "12 bits" in w]
    assert warning.startswith("all 12 16-bit slice(s) use at most 12 bits (largest sample 40")
    assert "sBIT" in warning
    # With sBIT the file says 12 bits, and ctscan scales it by them: nothing to warn about.
    report = inspect_dataset(load_dataset(_twelve_bit_in_sixteen(tmp_path / "b", 12),
                                          image_size=32, progress=False))
    assert not [w for w in report["warnings"] if "12 bits" in w]
