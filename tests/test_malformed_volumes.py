"""DICOM and NIfTI files that are damaged or hostile: each is skipped with a reason naming what is
wrong, and the rest of the data set loads. A header that declares more pixels than ctscan will
hold is refused before a pixel is decoded.

pydicom refuses to write a malformed value, so such a file is written with a valid placeholder of
the same length that is then overwritten in place, as a damaged header would hold it.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless
from test_volumes import level_slice, load, other_class, uid, write_ct

from data_utils.volumes import (
    MAX_FILE_PIXELS,
    MAX_SLICES,
    NotASlice,
    decode_frames,
    nifti_slices,
)

# pydicom warns of the very damage planted here, then reads on.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(Invalid value for VR|Value .* is not valid for elements with a VR):UserWarning")

# file -> (attributes it is written with, (placeholder, bytes written over it) or None, reason)
MALFORMED = {
    "position-two-numbers": ({"ImagePositionPatient": [0.0, 1.0]}, None,
                             "malformed ImagePositionPatient: expected 3 numbers, got 2"),
    "position-not-a-number": ({"ImagePositionPatient": "0.5\\1.5\\7.5"}, (b"1.5", b"1.x"),
                              "malformed ImagePositionPatient (ValueError: "),
    "position-nan": ({"ImagePositionPatient": "0.5\\1.5\\7.5"}, (b"1.5", b"nan"),
                     "malformed ImagePositionPatient: 0.5\\nan\\7.5 is not finite"),
    "orientation-five-numbers": ({"ImageOrientationPatient": [1, 0, 0, 0, 1]}, None,
                                 "malformed ImageOrientationPatient: expected 6 numbers, got 5"),
    "orientation-zero": ({"ImageOrientationPatient": [1, 0, 0, 0, 0, 0]}, None,
                         "malformed ImageOrientationPatient: 1\\0\\0\\0\\0\\0 is not two "
                         "perpendicular unit vectors"),
    "instance-not-a-number": ({"InstanceNumber": "4242"}, (b"4242", b"42x2"),
                              "malformed InstanceNumber (ValueError: "),
    "instance-fraction": ({"InstanceNumber": "4242"}, (b"4242", b"42.5"),
                          "malformed InstanceNumber: 42.5 is not a whole number"),
    "frames-not-a-number": ({"NumberOfFrames": "0001"}, (b"0001", b"00x1"),
                            "malformed NumberOfFrames (ValueError: "),
    "columns-missing": ({"Columns": None}, None,
                        "malformed image size: Rows 32, Columns missing, NumberOfFrames 1"),
    "rows-zero": ({"Rows": 0}, None,
                  "malformed image size: Rows 0, Columns 32, NumberOfFrames 1"),
    "per-frame-groups-short": ({"NumberOfFrames": 2, "PixelData": b"\0" * 4096,
                                "PerFrameFunctionalGroupsSequence": Sequence([Dataset()])}, None,
                               "malformed PerFrameFunctionalGroupsSequence: 1 item(s) for 2 "
                               "frames"),
    "slope-infinite": ({"RescaleSlope": "1.0625"}, (b"1.0625", b"inf   "),
                       "malformed RescaleSlope: inf is not finite"),
    "intercept-nan": ({"RescaleIntercept": "-1024.5"}, (b"-1024.5", b"nan    "),
                      "malformed RescaleIntercept: nan is not finite"),
    # Reformats: well formed, but not the axial slices ctscan reads.
    "sagittal": ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, None,
                 "sagittal slice (ImageOrientationPatient 0\\1\\0\\0\\0\\-1), not axial: ctscan "
                 "reads axial chest CT"),
    "coronal": ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, None,
                "coronal slice (ImageOrientationPatient 1\\0\\0\\0\\0\\-1), not axial: ctscan "
                "reads axial chest CT"),
}


def damage(path: Path, placeholder: bytes, written: bytes) -> None:
    data = path.read_bytes()
    assert data.count(placeholder) == 1 and len(placeholder) == len(written)
    path.write_bytes(data.replace(placeholder, written))


def good_series(root: Path) -> None:
    """Three good slices of patient PAT-A's series, z = 0, 2.5, 5: pixels 17, 68, 119."""
    for k in range(3):
        write_ct(root / "COVID" / f"good{k}.dcm", level_slice(-1250.0 + 300 * k),
                 ImagePositionPatient=[0.0, 0.0, 2.5 * k])


def test_each_malformed_header_skips_its_file_with_its_reason_and_the_rest_loads(tmp_path):
    root = tmp_path / "data"
    good_series(root)
    for name, (attrs, damaged, _) in MALFORMED.items():
        path = write_ct(root / "COVID" / f"{name}.dcm", level_slice(-500.0),
                        **{"ImagePositionPatient": [0.0, 0.0, 10.0], **attrs})
        if damaged:
            damage(path, *damaged)
    other_class(root)
    ds = load(root, tmp_path)
    reasons = sorted(s.reason for s in ds.skipped)
    expected = sorted(reason for _, _, reason in MALFORMED.values())
    assert len(reasons) == len(expected)
    for reason, start in zip(reasons, expected, strict=True):
        assert reason.startswith(start), (reason, start)
    covid = [i for i, label in enumerate(ds.labels) if ds.class_names[label] == "COVID"]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 68, 119]
    assert len(ds) == 5
    # decode_frames reads the bytes it is given by the same rules (InstanceNumber aside, which
    # only orders a series).
    for name, (_, _, reason) in MALFORMED.items():
        if not name.startswith("instance"):
            path = root / "COVID" / f"{name}.dcm"
            with pytest.raises(NotASlice, match=f"^{re.escape(reason)}"):
                decode_frames(path.name, path.read_bytes(), 32, "pad")


def test_pixel_data_that_do_not_fill_the_declared_size_are_a_listed_skip(tmp_path):
    root = tmp_path / "data"
    good_series(root)
    path = write_ct(root / "COVID" / "rows.dcm", level_slice(-500.0), syntax=JPEG2000Lossless,
                    SeriesInstanceUID=uid("series", "rows"))
    ds = pydicom.dcmread(path)
    ds.Rows = 16  # the codestream holds 32 rows
    ds.save_as(path)
    other_class(root)
    loaded = load(root, tmp_path)
    (skipped,) = loaded.skipped
    assert skipped.reason.startswith("ValueError: could not broadcast input array from shape "
                                     "(1024,) into shape (512,)")
    assert len(loaded) == 5


# --- declared sizes -----------------------------------------------------------------------------

def test_a_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    limit = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS, which bounds a PNG's size too
    reasons = {
        "wide.dcm": f"declared 20000x20000 slice is over Pillow's MAX_IMAGE_PIXELS ({limit}): a "
                    "mistake or a decompression bomb",
        "frames.dcm": f"declared 1000000 slices of 32x32 are over the bound of one file "
                      f"({MAX_SLICES} slices, {MAX_FILE_PIXELS} pixels): a mistake or a "
                      "decompression bomb",
        "thick.dcm": f"declared 2001 slices of 512x512 are over the bound of one file "
                     f"({MAX_SLICES} slices, {MAX_FILE_PIXELS} pixels): a mistake or a "
                     "decompression bomb",
    }
    root = tmp_path / "data"
    good_series(root)
    covid = root / "COVID"
    write_ct(covid / "wide.dcm", level_slice(-500.0), Rows=20000, Columns=20000)
    write_ct(covid / "frames.dcm", level_slice(-500.0), NumberOfFrames=1_000_000)
    write_ct(covid / "thick.dcm", level_slice(-500.0), Rows=512, Columns=512,
             NumberOfFrames=2001)
    other_class(root)
    for name in reasons:  # a few kilobytes each, declaring gigabytes
        assert (covid / name).stat().st_size < 4096
    ds = load(root, tmp_path)
    assert sorted(s.reason for s in ds.skipped) == sorted(reasons.values())
    assert len(ds) == 5
    # decode_frames refuses them too, on the bytes it is given, before pydicom decodes a pixel.
    monkeypatch.setattr(pydicom.Dataset, "pixel_array",
                        property(lambda _: pytest.fail("pixel data decoded")))
    for name, reason in reasons.items():
        with pytest.raises(NotASlice, match=re.escape(reason)):
            decode_frames(name, (covid / name).read_bytes(), 32, "pad")


def _nifti_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI file declaring an int16 volume of `shape` that holds 64 bytes of voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    data = header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_a_nifti_declaring_a_huge_volume_is_refused_before_decoding(tmp_path, monkeypatch):
    limit = 89_478_485
    reasons = {
        "wide.nii": f"declared 20000x20000 slice is over Pillow's MAX_IMAGE_PIXELS ({limit}): a "
                    "mistake or a decompression bomb",
        "long.nii.gz": f"declared 30000 slices of 512x512 are over the bound of one file "
                       f"({MAX_SLICES} slices, {MAX_FILE_PIXELS} pixels): a mistake or a "
                       "decompression bomb",
    }
    root = tmp_path / "data"
    good_series(root)
    _nifti_header_only(root / "COVID" / "wide.nii", (20000, 20000, 1))
    _nifti_header_only(root / "COVID" / "long.nii.gz", (512, 512, 30_000))  # dims: int16
    other_class(root)
    ds = load(root, tmp_path)
    assert sorted(s.reason for s in ds.skipped) == sorted(reasons.values())
    assert len(ds) == 5
    monkeypatch.setattr(nib.Nifti1Image, "from_bytes",
                        classmethod(lambda *_: pytest.fail("voxels read")))
    for name, reason in reasons.items():
        with pytest.raises(NotASlice, match=re.escape(reason)):
            decode_frames(name, (root / "COVID" / name).read_bytes(), 32, "pad")


# --- values that are no number ------------------------------------------------------------------

def test_nifti_slices_holding_nan_or_inf_are_skipped_with_a_reason(tmp_path):
    rng = np.random.default_rng(3)
    volume = (-1350.0 + 100 * rng.integers(1, 14, (24, 20, 4))).astype(np.float32)
    volume[5, 6, 1] = np.nan
    volume[:2, :, 2] = np.inf
    root = tmp_path / "data"
    (root / "COVID").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "COVID" / "v.nii.gz")
    other_class(root)
    ds = load(root, tmp_path)
    assert sorted(s.reason for s in ds.skipped) == [
        "1 NaN or infinite values in the slice", "40 NaN or infinite values in the slice"]
    covid = [i for i, label in enumerate(ds.labels) if ds.class_names[label] == "COVID"]
    assert [ds.frames[i] for i in covid] == [0, 3]


def test_a_nifti_whose_affine_has_no_superior_axis_is_skipped(tmp_path):
    # An sform whose third column is zero: no voxel axis runs inferior-superior.
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 3))
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    header["sform_code"], header["srow_x"], header["srow_y"], header["srow_z"] = (
        1, [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0])
    path = tmp_path / "flat.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + np.arange(48, dtype="<i2").tobytes())
    for read in (lambda: nifti_slices(path),
                 lambda: decode_frames(path.name, path.read_bytes(), 32, "pad")):
        with pytest.raises(NotASlice, match="^NIfTI affine has no inferior-superior axis$"):
            read()
