"""DICOM series and NIfTI volumes read slice by slice: HU, windows, order, orientation, identity.

Every file here is a real one, written with pydicom or nibabel (or pydicom's own CT_small.dcm),
and every expected pixel is worked out by hand from the window formula
``round((HU - (CENTER - WIDTH / 2)) * 255 / WIDTH)``, clipped to 0..255 (numpy rounds half to
even). With the lung window (-600, 1500) every multiple of 100 HU above -1350 lands on a whole
number: HU -1350 + 100 * m is pixel 17 * m.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    RTStructureSetStorage,
    generate_uid,
)

from data_utils.cache import load_dataset
from data_utils.demo import make_demo_data
from data_utils.identity import file_pseudonym, pseudonym, pseudonym_of_name
from data_utils.sources import DataError, discover, image_files
from data_utils.split import (
    SPLITS,
    Split,
    group_kinds,
    group_rows,
    resolve_group_by,
    split_dataset,
)
from data_utils.volumes import (
    DEFAULT_WINDOW,
    decode_frames,
    nifti_slices,
    parse_slices,
    parse_window,
    read_dicom_header,
    select_slices,
    volume_kind,
)

KEY = b"test_volumes identity key"
LUNG = DEFAULT_WINDOW
assert LUNG == (-600.0, 1500.0)  # the hand-computed pixels below assume the lung window
AXIAL = ["ORIGINAL", "PRIMARY", "AXIAL"]


# --- writing files ------------------------------------------------------------------------------

def uid(*parts: object) -> str:
    """A valid, reproducible DICOM UID named by `parts`."""
    return generate_uid(entropy_srcs=["test_volumes", *map(str, parts)])


def write_dicom(path: Path, sop_class: str, syntax: str = ExplicitVRLittleEndian,
                **attrs: object) -> Path:
    """A DICOM Part 10 file of `sop_class` holding `attrs` (None: left out), compressed to
    `syntax` when that is not explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("instance", path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for name, value in attrs.items():
        if value is not None:
            setattr(ds, name, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct(path: Path, stored: np.ndarray, sop_class: str = CTImageStorage,
             syntax: str = ExplicitVRLittleEndian, **attrs: object) -> Path:
    """A CT image of signed 16-bit `stored` values ((rows, cols), or (frames, rows, cols)):
    patient PAT-A's one series at z = 0 and HU = stored - 1024 unless `attrs` say otherwise."""
    stored = np.asarray(stored)
    assert stored.min() >= -32768 and stored.max() <= 32767
    ct = {
        "Modality": "CT", "ImageType": AXIAL,
        "PatientID": "PAT-A", "PatientName": "Test^A",
        "StudyInstanceUID": uid("study", "A"), "SeriesInstanceUID": uid("series", "A"),
        "InstanceNumber": 1,
        "ImagePositionPatient": [0.0, 0.0, 0.0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [0.7, 0.7],
        "NumberOfFrames": stored.shape[0] if stored.ndim == 3 else None,
        "Rows": stored.shape[-2], "Columns": stored.shape[-1],
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
        "RescaleSlope": 1, "RescaleIntercept": -1024,
        "PixelData": stored.astype("<i2").tobytes(),
    }
    return write_dicom(path, sop_class, syntax, **{**ct, **attrs})


def hu_to_stored(hu: np.ndarray, slope: float = 1, intercept: float = -1024) -> np.ndarray:
    stored = (np.asarray(hu, np.float64) - intercept) / slope
    assert np.array_equal(stored, np.rint(stored)), "HU not reachable with this slope"
    return stored.astype(np.int16)


def level_slice(hu: float, size: int = 32, marker: float = 150.0) -> np.ndarray:
    """A size x size HU slice at `hu` with one `marker` pixel at [0, 0] (a constant slice is
    refused), stored with the default rescale."""
    slice_hu = np.full((size, size), hu, np.float64)
    slice_hu[0, 0] = marker
    return hu_to_stored(slice_hu)


def load(root: Path, tmp_path: Path, **kwargs):
    kwargs = {"image_size": 32, "cache_dir": tmp_path / "cache", "progress": False,
              "identity_key": KEY, **kwargs}
    return load_dataset(root, **kwargs)


def real(names: list[str], root: Path) -> list[str]:
    """Written names read back as `ctscan locate` does: each DICOM or NIfTI stand-in becomes its
    file's path below root (with its "#K"); other names stay."""
    files = {file_pseudonym(p, KEY): p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file()}

    def one(name: str) -> str:
        found = pseudonym_of_name(name)
        frame = name.partition("#")[2]
        return name if found is None else files[found] + (f"#{frame}" if frame else "")

    return [one(n) for n in names]


def only(items: list):
    (item,) = items
    return item


def other_class(root: Path, n: int = 2) -> None:
    """A non-COVID series of n plain slices (patient PAT-N), so a class-folder tree loads."""
    for k in range(n):
        write_ct(root / "non-COVID" / f"n{k}.dcm", level_slice(-1050 + 100 * k),
                 PatientID="PAT-N", StudyInstanceUID=uid("study", "N"),
                 SeriesInstanceUID=uid("series", "N"), ImagePositionPatient=[0, 0, 5.0 * k])


# --- 1, 2: HU and window arithmetic, MONOCHROME1 -----------------------------------------------

HU_CASES = {  # HU -> uint8 in the lung window (-1350..150 HU)
    -2000: 0,    # below the window: clipped
    -1350: 0,    # the window's low end
    -1024: 55,   # (326 * 0.17 = 55.42)
    -1000: 60,   # 59.5 rounds half to even
    -600: 128,   # the centre: 127.5 rounds half to even
    -300: 178,   # 178.5 rounds half to even, down
    0: 230,      # 229.5
    150: 255,    # the window's high end
    1000: 255,   # above: clipped
}


def _hu_test_slice() -> np.ndarray:
    """32 x 32 HU: HU_CASES along row 3; elsewhere a left-right ramp -1390, -1330, ... 470 HU,
    from below the window to above it, all even (slope 2) and never on a rounding half."""
    hu = np.tile(-1390.0 + 60 * np.arange(32), (32, 1))
    hu[3, : len(HU_CASES)] = list(HU_CASES)
    return hu


def _decode_one(path: Path, size: int = 32, window=LUNG):
    return only(decode_frames(path.name, path.read_bytes(), size, "pad", window))


def test_rescale_slope_intercept_then_lung_window_exact_pixels(tmp_path):
    hu = _hu_test_slice()
    stored = hu_to_stored(hu, slope=2, intercept=-1024)
    assert stored[3, 0] == -488 and stored[3, 4] == 212  # -2000 and -600 HU
    path = write_ct(tmp_path / "s.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024)
    decoded = _decode_one(path)
    assert (decoded.mode, decoded.bits, decoded.width, decoded.height) == ("DICOM", "HU", 32, 32)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (32, 32)
    assert decoded.pixels[3, : len(HU_CASES)].tolist() == list(HU_CASES.values())
    # Every other pixel by the formula, written out independently of the code.
    expected = np.clip(np.round((hu + 1350) * 255 / 1500), 0, 255)
    assert np.array_equal(decoded.pixels, expected)


def test_another_window_changes_the_pixels(tmp_path):
    hu = _hu_test_slice()
    path = write_ct(tmp_path / "s.dcm", hu_to_stored(hu))
    soft = _decode_one(path, window=(40, 400))  # -160..240 HU
    row = dict(zip(HU_CASES, soft.pixels[3, : len(HU_CASES)].tolist(), strict=True))
    assert row == {-2000: 0, -1350: 0, -1024: 0, -1000: 0, -600: 0, -300: 0,
                   0: 102, 150: 198, 1000: 255}  # 0 HU: 160 * 255 / 400 = 102


def test_monochrome1_is_inverted(tmp_path):
    stored = hu_to_stored(_hu_test_slice(), slope=2)
    mono2 = _decode_one(write_ct(tmp_path / "m2.dcm", stored, RescaleSlope=2))
    mono1 = _decode_one(write_ct(tmp_path / "m1.dcm", stored, RescaleSlope=2,
                                 PhotometricInterpretation="MONOCHROME1"))
    assert np.array_equal(mono1.pixels, 255 - mono2.pixels)
    assert mono1.pixels[3, 1] == 255 and mono1.pixels[3, 7] == 0  # -1350 HU white, 150 black


def test_a_slice_constant_in_the_window_is_refused_with_a_reason(tmp_path):
    # All air below the window but one pixel at -1400 HU: both clip to 0.
    stored = level_slice(-2000, marker=-1400)
    (reason,) = decode_frames("s.dcm", write_ct(tmp_path / "s.dcm", stored).read_bytes(), 32,
                              "pad")
    assert reason == "constant slice in window -600,1500: every pixel is 0"


def test_nifti_scl_slope_and_inter_are_applied(tmp_path):
    hu = _hu_test_slice()
    stored = hu_to_stored(hu, slope=2, intercept=-1024)
    # One axial slice: RAS+, slice k shown as data[::-1, ::-1, k].T (see test 9 below).
    img = nib.Nifti1Image(stored[::-1, ::-1].T[:, :, None].copy(), np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2, -1024)
    data = img.to_bytes()
    assert (nib.Nifti1Image.from_bytes(data).dataobj.slope,
            nib.Nifti1Image.from_bytes(data).dataobj.inter) == (2, -1024)
    decoded = only(decode_frames("v.nii", data, 32, "pad"))
    assert (decoded.mode, decoded.bits) == ("NIfTI", "HU")
    assert decoded.pixels[3, : len(HU_CASES)].tolist() == list(HU_CASES.values())


# --- 3: pydicom's CT_small.dcm ------------------------------------------------------------------

def test_pydicom_ct_small_decodes_and_its_header_reads():
    path = Path(get_testdata_file("CT_small.dcm"))
    header = read_dicom_header(path)
    assert header.patient == "1CT1"
    assert header.study == "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    assert header.series == "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
    assert header.size == (128, 128) and header.frames == 1
    assert header.positions == pytest.approx((-75.699997,))  # z: the axial normal is +z
    decoded = only(decode_frames(path.name, path.read_bytes(), 64, "pad"))
    assert (decoded.mode, decoded.bits, decoded.width, decoded.height) == ("DICOM", "HU", 128,
                                                                          128)
    assert decoded.pixels.shape == (64, 64) and decoded.pixels.dtype == np.uint8
    # The same by hand at full size: stored values 128..2191, HU = stored - 1024. Where the
    # exact value is a rounding half (HU + 1350 = 50 mod 100), float error may tip it either way.
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert (hu.min(), hu.max()) == (128 - 1024, 2191 - 1024)
    full = _decode_one(path, size=128)
    diff = full.pixels - np.clip(np.round((hu + 1350) * 255 / 1500), 0, 255)
    assert np.all(diff[(hu + 1350) % 100 != 50] == 0)
    assert np.all(np.abs(diff) <= 1)


# --- 4: slice order -----------------------------------------------------------------------------

def _write_series(folder: Path, levels: dict[str, float], **per_file: dict[str, object]) -> None:
    """Files `name` -> HU level, each with the attributes per_file[attr][name]."""
    for name, hu in levels.items():
        write_ct(folder / name, level_slice(hu),
                 **{attr: values[name] for attr, values in per_file.items()})


# File name order a, b, c, d; InstanceNumber 1..4 in that order; z order d, b, c, a.
ORDER_Z = {"a.dcm": 10.0, "b.dcm": -5.0, "c.dcm": 2.5, "d.dcm": -20.0}
ORDER_INSTANCE = {"a.dcm": 1, "b.dcm": 2, "c.dcm": 3, "d.dcm": 4}
# A level per file that grows with z: the slices in z order read 17, 68, 119, 170.
ORDER_HU = {"d.dcm": -1250.0, "b.dcm": -950.0, "c.dcm": -650.0, "a.dcm": -350.0}


def test_slices_follow_image_position_not_names_or_instance_numbers(tmp_path):
    root = tmp_path / "data"
    _write_series(root / "COVID" / "series", ORDER_HU,
                  ImagePositionPatient={n: [-10.0, -10.0, z] for n, z in ORDER_Z.items()},
                  InstanceNumber=ORDER_INSTANCE)
    other_class(root)
    src = discover(root, slices="all", key=KEY)
    covid = [s for s in src.samples if s.class_name == "COVID"]
    assert [s.path.name for s in covid] == ["d.dcm", "b.dcm", "c.dcm", "a.dcm"]
    ds = load(root, tmp_path)
    rows = [i for i, label in enumerate(ds.labels) if ds.class_names[label] == "COVID"]
    assert [real(ds.paths, root)[i] for i in rows] == ["COVID/series/d.dcm", "COVID/series/b.dcm",
                                           "COVID/series/c.dcm", "COVID/series/a.dcm"]
    assert [int(ds.images[i][16, 16]) for i in rows] == [17, 68, 119, 170]
    assert len({ds.series[i] for i in rows}) == 1


def test_slice_position_is_along_the_slice_normal(tmp_path):
    # A gantry tilted 30 degrees: rows along +x, columns along (0, cos 30, -sin 30), so the
    # normal (row x column) is (0, 0.5, 0.866). The order is by y / 2 + 0.866 z (c, a, b);
    # z (b, c, a) and names (a, b, c) are no guide.
    root = tmp_path / "data"
    yz = {"a.dcm": (0.0, 3.0), "b.dcm": (10.0, 0.0), "c.dcm": (-10.0, 2.0)}
    _write_series(root / "COVID" / "s", {"c.dcm": -1250.0, "a.dcm": -950.0, "b.dcm": -650.0},
                  ImagePositionPatient={n: [0.0, y, z] for n, (y, z) in yz.items()},
                  ImageOrientationPatient=dict.fromkeys(yz, [1, 0, 0, 0, 0.866025, -0.5]))
    other_class(root)
    ds = load(root, tmp_path)
    covid = [i for i, p in enumerate(ds.paths) if p.startswith("COVID/")]
    names = real(ds.paths, root)
    assert [names[i] for i in covid] == ["COVID/s/c.dcm", "COVID/s/a.dcm", "COVID/s/b.dcm"]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 68, 119]


def test_a_feet_first_series_is_ordered_feet_to_head_too(tmp_path):
    root = tmp_path / "data"
    _write_series(root / "COVID" / "s", ORDER_HU,
                  ImagePositionPatient={n: [10.0, -10.0, z] for n, z in ORDER_Z.items()},
                  ImageOrientationPatient=dict.fromkeys(ORDER_Z, [-1, 0, 0, 0, 1, 0]))
    other_class(root)
    ds = load(root, tmp_path)
    covid = [i for i, p in enumerate(ds.paths) if p.startswith("COVID/")]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 68, 119, 170]  # z ascending


def test_without_positions_instance_numbers_order_the_slices(tmp_path):
    root = tmp_path / "data"
    instance = {"a.dcm": 3, "b.dcm": 1, "c.dcm": 4, "d.dcm": 2}  # order b, d, a, c
    levels = {"b.dcm": -1250.0, "d.dcm": -950.0, "a.dcm": -650.0, "c.dcm": -350.0}
    _write_series(root / "COVID" / "s", levels, InstanceNumber=instance,
                  ImagePositionPatient=dict.fromkeys(instance))
    other_class(root)
    ds = load(root, tmp_path)
    covid = [i for i, p in enumerate(ds.paths) if p.startswith("COVID/")]
    names = real(ds.paths, root)
    assert [names[i] for i in covid] == ["COVID/s/b.dcm", "COVID/s/d.dcm", "COVID/s/a.dcm",
                                            "COVID/s/c.dcm"]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 68, 119, 170]


def test_slice_rules_choose_from_the_ordered_series(tmp_path):
    root = tmp_path / "data"
    _write_series(root / "COVID" / "series", ORDER_HU,
                  ImagePositionPatient={n: [0.0, 0.0, z] for n, z in ORDER_Z.items()},
                  InstanceNumber=ORDER_INSTANCE)
    other_class(root, n=3)
    ds = load(root, tmp_path, slices="every:2")
    covid = [i for i, p in enumerate(ds.paths) if p.startswith("COVID/")]
    assert [real(ds.paths, root)[i] for i in covid] == ["COVID/series/d.dcm", "COVID/series/c.dcm"]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 119]
    assert ds.slices == "every:2"
    # Each series' slices before the rule chose, under its pseudonym.
    assert ds.series_slices == {pseudonym(uid("series", "A"), KEY): 4,
                                pseudonym(uid("series", "N"), KEY): 3}


# --- 5: what is not a CT slice is skipped, with its reason --------------------------------------

def test_non_slices_are_skipped_with_reasons_and_the_rest_loads(tmp_path):
    root = tmp_path / "data"
    covid = root / "COVID"
    for k in range(3):
        write_ct(covid / f"good{k}.dcm", level_slice(-1250 + 100 * k),
                 ImagePositionPatient=[0, 0, float(k)])
    other_class(root)
    common = {"PatientID": "PAT-A", "StudyInstanceUID": uid("study", "A")}
    write_dicom(covid / "report.dcm", BasicTextSRStorage, Modality="SR",
                SeriesInstanceUID=uid("sr"), **common)
    write_dicom(covid / "contours.dcm", RTStructureSetStorage, Modality="RTSTRUCT",
                SeriesInstanceUID=uid("rt"), **common)
    write_ct(covid / "mr.dcm", level_slice(-500), MRImageStorage, Modality="MR",
             SeriesInstanceUID=uid("mr"))
    write_ct(covid / "scout.dcm", level_slice(-500), ImageType=["ORIGINAL", "PRIMARY",
                                                                "LOCALIZER"],
             SeriesInstanceUID=uid("scout"))
    whole = write_ct(tmp_path / "whole.dcm", level_slice(-500),
                     SeriesInstanceUID=uid("truncated")).read_bytes()
    (covid / "truncated.dcm").write_bytes(whole[: len(whole) - 1000])  # cut in the pixels
    (covid / "cut-header.dcm").write_bytes(whole[:200])  # cut inside the file meta
    (covid / "notes.dcm").write_text("not DICOM at all, just a note saved as .dcm\n")
    (covid / "empty.dcm").write_bytes(b"")
    write_ct(covid / "big.dcm", level_slice(-500, size=48), ImagePositionPatient=[0, 0, 9.0])

    ds = load(root, tmp_path)
    reasons = {real([s.path], root)[0]: s.reason for s in ds.skipped}
    assert sorted(reasons) == sorted(f"COVID/{n}" for n in [
        "report.dcm", "contours.dcm", "mr.dcm", "scout.dcm", "truncated.dcm", "cut-header.dcm",
        "notes.dcm", "empty.dcm", "big.dcm"])
    assert reasons["COVID/report.dcm"] == "DICOM object without an image (Modality SR)"
    assert reasons["COVID/contours.dcm"] == "DICOM object without an image (Modality RTSTRUCT)"
    assert reasons["COVID/mr.dcm"] == "Modality MR is not CT"
    assert reasons["COVID/scout.dcm"] == "localizer (scout) image, not an axial slice"
    assert reasons["COVID/big.dcm"] == "48x48 slice in a series of 32x32 slices"
    assert reasons["COVID/truncated.dcm"].startswith("ValueError: ")
    assert "pixel data is less than expected (1048 vs 2048 bytes)" in reasons[
        "COVID/truncated.dcm"]
    assert reasons["COVID/notes.dcm"].startswith("not a DICOM file (")
    assert reasons["COVID/empty.dcm"].startswith("not a DICOM file (")
    # pydicom reads a header cut short without complaint: what is missing is the image.
    assert reasons["COVID/cut-header.dcm"].startswith((
        "not a DICOM file (", "unreadable DICOM header (", "DICOM object without an image ("))
    # The rest loads, in order.
    assert [p for p in real(ds.paths, root) if p.startswith("COVID/")] == [f"COVID/good{k}.dcm"
                                                               for k in range(3)]
    assert len(ds) == 5 and ds.images.shape == (5, 32, 32)
    assert [int(ds.images[i][16, 16]) for i in range(3)] == [17, 34, 51]


# --- 6: compressed transfer syntaxes ------------------------------------------------------------

@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["RLE", "J2K"])
def test_compressed_slice_decodes_like_the_uncompressed_one(tmp_path, syntax):
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder installed")
    stored = hu_to_stored(_hu_test_slice(), slope=2)
    plain = write_ct(tmp_path / "plain.dcm", stored, RescaleSlope=2)
    packed = write_ct(tmp_path / "packed.dcm", stored, syntax=syntax, RescaleSlope=2)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    assert packed.read_bytes() != plain.read_bytes()
    assert np.array_equal(_decode_one(packed).pixels, _decode_one(plain).pixels)
    # And through the whole pipeline.
    root = tmp_path / "data"
    (root / "COVID").mkdir(parents=True)
    (root / "COVID" / "packed.dcm").write_bytes(packed.read_bytes())
    other_class(root)
    ds = load(root, tmp_path)
    assert real(ds.paths, root)[0] == "COVID/packed.dcm" and not ds.skipped
    assert np.array_equal(ds.images[0], _decode_one(plain).pixels)


# --- 7: multi-frame -----------------------------------------------------------------------------

def test_a_multi_frame_ct_is_one_slice_per_frame(tmp_path):
    root = tmp_path / "data"
    frames = np.stack([level_slice(hu) for hu in (-1250, -950, -650)])
    write_ct(root / "COVID" / "multi.dcm", frames)
    other_class(root)
    assert read_dicom_header(root / "COVID" / "multi.dcm").frames == 3
    ds = load(root, tmp_path)
    covid = [i for i, p in enumerate(ds.paths) if p.startswith("COVID/")]
    assert [real(ds.paths, root)[i] for i in covid] == ["COVID/multi.dcm#0", "COVID/multi.dcm#1",
                                            "COVID/multi.dcm#2"]
    assert [ds.frames[i] for i in covid] == [0, 1, 2]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 68, 119]
    assert len({ds.sha256[i] for i in covid}) == 1


# --- 8: a DICOM file without a suffix -----------------------------------------------------------

def test_dicom_files_without_suffix_are_found(tmp_path):
    root = tmp_path / "data"
    named_by_uid = root / "COVID" / "1.2.826.0.1.3680043.8.498.12345"
    write_ct(named_by_uid, level_slice(-1250))
    write_ct(root / "COVID" / "IM0002", level_slice(-950), ImagePositionPatient=[0, 0, 5.0])
    (root / "COVID" / "README").write_text("no suffix, not DICOM\n")
    (root / "COVID" / "9.12").write_bytes(b"\0" * 200)  # digits suffix, not DICOM either
    other_class(root)
    assert volume_kind(named_by_uid) == "dicom"
    assert volume_kind(root / "COVID" / "IM0002") == "dicom"
    assert volume_kind(root / "COVID" / "README") is None
    assert volume_kind(root / "COVID" / "9.12") is None
    assert volume_kind(Path("x/VOLUME.NII.GZ")) == "nifti"
    assert volume_kind(Path("x/scan.DCM")) == "dicom"
    assert volume_kind(Path("x/slice.png")) is None
    assert [p.name for p in image_files(root / "COVID")] == [named_by_uid.name, "IM0002"]
    ds = load(root, tmp_path)
    covid = [i for i, p in enumerate(ds.paths) if p.startswith("COVID/")]
    names = real(ds.paths, root)
    assert [names[i] for i in covid] == [f"COVID/{named_by_uid.name}", "COVID/IM0002"]
    assert [int(ds.images[i][16, 16]) for i in covid] == [17, 68]


# --- 9: NIfTI orientation -----------------------------------------------------------------------

N_X, N_Y, N_Z = 32, 24, 5  # right-left columns, anterior-posterior rows, slices


def _display_stack(seed: int = 0) -> np.ndarray:
    """(N_Z, N_Y, N_X) HU as the slices should be shown, inferior to superior: row 0 anterior,
    column 0 the patient's right. A 150 HU marker, the only one, at the anterior-right corner
    of the most superior slice; elsewhere multiples of 100 HU in -1250..-550."""
    rng = np.random.default_rng(seed)
    stack = -1350.0 + 100 * rng.integers(1, 9, (N_Z, N_Y, N_X))
    stack[-1, 0, 0] = 150.0
    return stack


def _ras_volume(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stack as RAS+ voxels (+i right, +j anterior, +k superior) and its affine."""
    data = np.stack([s[::-1, ::-1].T for s in stack], axis=-1)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-11.0, -9.0, 40.0]
    return data, affine


def _orientations(stack: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same voxels at the same world places, stored four ways. Re-indexed data whose new
    voxel v is old voxel M @ v has the affine `affine @ M`."""
    ras, affine = _ras_volume(stack)
    flip_xy = np.array([[-1, 0, 0, N_X - 1], [0, -1, 0, N_Y - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    flip_z = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, N_Z - 1], [0, 0, 0, 1]])
    return {
        "RAS": (ras, affine),
        "LPS": (ras[::-1, ::-1, :], affine @ flip_xy),
        # Slices along axis 0: new voxel (k, i, j) is old (i, j, k).
        "SRA": (np.transpose(ras, (2, 0, 1)), affine[:, [2, 0, 1, 3]]),
        "RAI": (ras[:, :, ::-1], affine @ flip_z),  # stored superior to inferior
    }


def _marker_world(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    voxel = np.unravel_index(np.argmax(data), data.shape)
    return (affine @ [*voxel, 1])[:3]


def test_nifti_slices_are_shown_the_same_whatever_the_stored_orientation(tmp_path):
    stack = _display_stack()
    ras, ras_affine = _ras_volume(stack)
    # The marker really is the most right, anterior and superior voxel (RAS+ world).
    corner = (ras_affine @ [N_X - 1, N_Y - 1, N_Z - 1, 1])[:3]
    assert np.allclose(_marker_world(ras, ras_affine), corner)
    # Expected by hand: lung window, 24 rows padded to 32 (4 black rows above and below).
    expected = np.zeros((N_Z, 32, 32), np.uint8)
    expected[:, 4:28, :] = np.clip(np.round((stack + 1350) * 255 / 1500), 0, 255)
    assert expected[-1, 4, 0] == 255 and (expected == 255).sum() == 1

    for name, (data, affine) in _orientations(stack).items():
        assert "".join(nib.orientations.aff2axcodes(affine)) == name
        assert np.allclose(_marker_world(data, affine), corner), name  # same place in the body
        img = nib.Nifti1Image(data.astype(np.int16), affine)
        path = tmp_path / f"{name}.nii.gz"
        nib.save(img, path)
        assert nifti_slices(path) == N_Z, name
        slices = decode_frames(path.name, path.read_bytes(), 32, "pad")
        assert len(slices) == N_Z, name
        assert all(d.mode == "NIfTI" and (d.width, d.height) == (N_X, N_Y) for d in slices)
        got = np.stack([d.pixels for d in slices])
        assert np.array_equal(got, expected), name


def test_nifti_volumes_through_discover_and_load(tmp_path):
    root = tmp_path / "data"
    for label in ("COVID", "non-COVID"):
        (root / label).mkdir(parents=True)
    data, affine = _orientations(_display_stack())["SRA"]
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), root / "COVID" / "p1.nii.gz")
    data, affine = _ras_volume(_display_stack(seed=1))
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), root / "non-COVID" / "p2.nii")
    ds = load(root, tmp_path, slices="max:3")
    assert real(ds.paths, root) == [f"COVID/p1.nii.gz#{k}" for k in (0, 2, 4)] + [
        f"non-COVID/p2.nii#{k}" for k in (0, 2, 4)]
    assert ds.frames == [0, 2, 4, 0, 2, 4]
    assert ds.images[2][4, 0] == 255  # the marker: top slice, anterior-right
    # A NIfTI file is a volume, not proof of a patient: no patient, one series each.
    assert ds.groups == [None] * 6 and ds.id_kinds == ["volume"] * 6
    assert len(set(ds.series)) == 2
    assert sorted(ds.series_slices.values()) == [N_Z, N_Z]


def test_a_nifti_that_is_not_one_volume_is_skipped(tmp_path):
    root = tmp_path / "data"
    for label in ("COVID", "non-COVID"):
        (root / label).mkdir(parents=True)
    data, affine = _ras_volume(_display_stack())
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), root / "COVID" / "ok.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1).astype(np.int16), affine),
             root / "COVID" / "timeseries.nii.gz")
    nib.save(nib.Nifti1Image(data[:, :, 0].astype(np.int16), affine), root / "COVID" / "2d.nii")
    (root / "COVID" / "broken.nii").write_bytes(b"not a volume")
    data, affine = _ras_volume(_display_stack(seed=1))
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), root / "non-COVID" / "n.nii.gz")
    ds = load(root, tmp_path)
    reasons = {real([s.path], root)[0]: s.reason for s in ds.skipped}
    assert reasons["COVID/timeseries.nii.gz"] == (
        f"NIfTI shape ({N_X}, {N_Y}, {N_Z}, 2) is not one 3-D volume")
    assert reasons["COVID/2d.nii"] == f"NIfTI shape ({N_X}, {N_Y}) is not one 3-D volume"
    assert reasons["COVID/broken.nii"].startswith("not a NIfTI volume (")
    assert len(reasons) == 3 and len(ds) == 2 * N_Z


# --- 10: slice rules and windows ----------------------------------------------------------------

@pytest.mark.parametrize("n, rule, expected", [
    (10, "all", list(range(10))),
    (10, "every:1", list(range(10))),
    (10, "every:3", [0, 3, 6, 9]),
    (10, "every:4", [0, 4, 8]),
    (3, "every:5", [0]),
    (10, "central:1", list(range(10))),
    (10, "central:0.5", [2, 3, 4, 5, 6]),
    (10, "central:0.25", [4, 5]),  # round(2.5) = 2, half to even
    (11, "central:0.3", [4, 5, 6]),  # round(3.3) = 3, start (11 - 3) // 2 = 4
    (5, "central:0.01", [2]),  # at least one slice
    (10, "max:4", [0, 3, 6, 9]),
    (10, "max:3", [0, 4, 9]),  # linspace 0, 4.5, 9; round(4.5) = 4
    (10, "max:2", [0, 9]),
    (10, "max:1", [0]),
    (10, "max:10", list(range(10))),
    (4, "max:50", [0, 1, 2, 3]),
    (0, "every:2", []),
])
def test_select_slices(n, rule, expected):
    assert select_slices(n, rule) == expected


@pytest.mark.parametrize("rule", ["every:0", "every:-2", "every:x", "every", "every:1.5",
                                  "central:0", "central:1.5", "central:-0.5", "central:",
                                  "max:0", "max:-3", "max:", "all:3", "first:5", "", "ALL",
                                  "central:nan"])
def test_bad_slice_rules_are_refused_naming_the_rule(rule):
    with pytest.raises(ValueError, match=re.escape(f"--slices {rule!r}")):
        parse_slices(rule)
    with pytest.raises(ValueError, match=re.escape(repr(rule))):
        select_slices(10, rule)


def test_good_slice_rules_parse_to_themselves():
    for rule in ("all", "every:1", "every:7", "central:1", "central:0.6", "max:1", "max:40"):
        assert parse_slices(rule) == rule


@pytest.mark.parametrize("text, window", [
    ("-600,1500", (-600.0, 1500.0)),
    ("40,400", (40.0, 400.0)),
    (" 40 , 400 ", (40.0, 400.0)),
    ("-600.5,0.5", (-600.5, 0.5)),
])
def test_parse_window(text, window):
    assert parse_window(text) == window


@pytest.mark.parametrize("text", ["", "1500", "40,400,1", "a,b", "40,0", "40,-400", "nan,400",
                                  "40,nan", "inf,400", "-inf,400", "40;400"])
def test_bad_windows_are_refused_naming_the_text(text):
    with pytest.raises(ValueError, match=re.escape(f"--window {text!r}")):
        parse_window(text)


@pytest.mark.parametrize("text", ["40,inf", "40,1e999"])
def test_an_infinite_window_width_is_refused(text):
    with pytest.raises(ValueError, match="--window"):
        parse_window(text)


# --- 11: grouping by patient --------------------------------------------------------------------

def _patient_id_of(path: str) -> str:
    """The patient pseudonym in a DICOM slice's name: <label>/patient-<pseudonym>/series-..."""
    return path.split("/")[1].removeprefix("patient-")


def test_dicom_slices_are_grouped_by_patient_in_every_split(tmp_path):
    root = make_demo_data(tmp_path / "dicom", n_per_class=30, size=64, seed=3, format="dicom")
    patient_ids = sorted(d.name for label in ("COVID", "non-COVID")
                         for d in (root / label).iterdir())
    ds = load(root, tmp_path)
    assert set(ds.groups) == {pseudonym(p, KEY) for p in patient_ids}
    assert all(g == _patient_id_of(p) for g, p in zip(ds.groups, ds.paths, strict=True))
    assert resolve_group_by(ds, "auto") == "patient"
    groups = np.array(ds.groups)
    for seed in range(5):
        split = split_dataset(ds, (0.5, 0.25, 0.25), seed=seed)
        assert split.group_by == "patient"
        for patient in set(ds.groups):
            assert len(set(split.assignment[groups == patient])) == 1, (seed, patient)
        for name in SPLITS:  # and every split has both classes
            assert set(ds.labels[split.indices(name)]) == {0, 1}


def _patient_slices(root: Path, label: str, patient: str | None, study: str | None = None
                    ) -> None:
    """Two slices of one series of `patient` (None: no PatientID element) under `label`."""
    folder = root / label / (patient or "anonymous")
    for k in range(2):
        write_ct(folder / f"{k}.dcm", level_slice(-1250 + 100 * k),
                 PatientID=patient, StudyInstanceUID=study or uid("study", patient),
                 SeriesInstanceUID=uid("series", patient, study, label),
                 ImagePositionPatient=[0, 0, float(k)])


def test_a_patient_under_both_labels_is_refused_by_count_not_by_id(tmp_path):
    root = tmp_path / "data"
    for label, patient in [("COVID", "PAT12"), ("non-COVID", "PAT12"), ("COVID", "PAT-C1"),
                           ("non-COVID", "PAT-N1")]:
        _patient_slices(root, label, patient)
    ds = load(root, tmp_path)
    with pytest.raises(DataError) as caught:
        split_dataset(ds)
    message = str(caught.value)
    assert ("1 of 3 patients (or studies, series, volumes) have slices under both 'non-COVID' "
            "and 'COVID'") in message
    assert "PAT12" not in message and pseudonym("PAT12", KEY) not in message


def test_without_patient_id_the_study_stands_for_the_patient(tmp_path):
    root = tmp_path / "data"
    study_c, study_n = uid("study", "C"), uid("study", "N")
    _patient_slices(root, "COVID", None, study=study_c)  # no PatientID element
    _patient_slices(root, "non-COVID", "", study=study_n)  # an empty one
    ds = load(root, tmp_path)
    assert ds.groups == [None] * 4  # a study is not proof of a patient
    assert ds.studies == [pseudonym(study_c, KEY)] * 2 + [pseudonym(study_n, KEY)] * 2
    assert ds.id_kinds == ["study"] * 4
    assert all(p.split("/")[1] == f"study-{s}" for p, s in zip(ds.paths, ds.studies, strict=True))
    assert resolve_group_by(ds, "auto") == "patient"
    split = Split(np.zeros(4, np.int8), group_rows(ds, "patient"), 0, (0.5, 0.25, 0.25),
                  "patient")
    assert group_kinds(split, ds) == {"studies": 2}


def test_without_patient_or_study_the_series_is_the_group(tmp_path):
    root = tmp_path / "data"
    for label in ("COVID", "non-COVID"):
        for k in range(2):
            write_ct(root / label / f"{k}.dcm", level_slice(-1250 + 100 * k), PatientID=None,
                     StudyInstanceUID=None, SeriesInstanceUID=uid("series", label),
                     ImagePositionPatient=[0, 0, float(k)])
    ds = load(root, tmp_path)
    assert ds.groups == [None] * 4 and ds.studies == [None] * 4
    assert ds.id_kinds == ["series"] * 4
    assert resolve_group_by(ds, "auto") == "patient"
    split = Split(np.zeros(4, np.int8), group_rows(ds, "patient"), 0, (0.5, 0.25, 0.25),
                  "patient")
    assert group_kinds(split, ds) == {"series": 2}


# --- 12: identity -------------------------------------------------------------------------------

IDENTIFYING = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "FrameOfReferenceUID")


def _identifiers(root: Path) -> set[str]:
    found = set()
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.get(tag)) for tag in IDENTIFYING if ds.get(tag)}
    return found


def _leaks(ids: set[str], written: list[str]) -> set[str]:
    """The IDs found in `written`, whole or (a UID) by its last 20 characters."""
    return {i for i in ids for w in written if i in w or (len(i) > 20 and i[-20:] in w)}


@pytest.fixture
def demo_dicom(tmp_path) -> tuple[Path, set[str]]:
    root = make_demo_data(tmp_path / "dicom", n_per_class=10, size=48, seed=1, format="dicom")
    ids = _identifiers(root)
    assert {"DEMO-COVID-000", "DEMO-NONCOVID-000"} <= ids and len(ids) > 20
    return root, ids


def test_no_patient_id_or_uid_reaches_groups_series_studies_or_the_cache(tmp_path, demo_dicom):
    root, ids = demo_dicom
    ds = load(root, tmp_path)
    assert len(ds) == 20 and not ds.skipped
    written = [*ds.groups, *ds.series, *ds.studies, *ds.series_slices]
    assert all(re.fullmatch(r"[0-9a-f]{12}", w) for w in written)
    assert not _leaks(ids, written)
    # Each of the three is the pseudonym of its header's ID under the key.
    dicom = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID: p
             for p in root.rglob("001.dcm")}
    headers = {pseudonym(series, KEY): pydicom.dcmread(p, stop_before_pixels=True)
               for series, p in dicom.items()}
    for group, series, study in zip(ds.groups, ds.series, ds.studies, strict=True):
        assert group == pseudonym(headers[series].PatientID, KEY)
        assert study == pseudonym(headers[series].StudyInstanceUID, KEY)
    cache_bytes = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*")
                           if p.is_file())
    assert not [i for i in ids if i.encode() in cache_bytes or i[-20:].encode() in cache_bytes]


def test_no_part_of_a_dicom_path_below_the_class_folder_is_kept(tmp_path, demo_dicom):
    root, ids = demo_dicom
    ds = load(root, tmp_path)
    assert not _leaks(ids, ds.paths)
    # Only stand-ins below the class folder: the patient, the series and the file.
    assert all(re.fullmatch(r"(COVID|non-COVID)/patient-[0-9a-f]{12}/series-[0-9a-f]{12}/"
                            r"slice-[0-9a-f]{12}", p) for p in ds.paths)
    files = {file_pseudonym(p, KEY): p for p in root.rglob("*.dcm")}
    assert {files[p.rsplit("slice-", 1)[1]] for p in ds.paths} == set(root.rglob("*.dcm"))


def _identified_extras(root: Path) -> tuple[Path, str]:
    """A localizer and a slice of another size in the first patient's series folder."""
    series_dir = next((root / "COVID").glob("*/*"))
    first = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True)
    same = {tag: first.get(tag) for tag in ("PatientID", "StudyInstanceUID",
                                            "SeriesInstanceUID")}
    return series_dir, same


def test_a_skipped_odd_size_slice_is_reported_under_its_stand_in(tmp_path):
    root = make_demo_data(tmp_path / "dicom", n_per_class=4, size=48, seed=1, format="dicom")
    series_dir, same = _identified_extras(root)
    write_ct(series_dir / "999.dcm", level_slice(-500, size=16), **same)
    ds = load(root, tmp_path)
    (skipped,) = ds.skipped
    assert skipped.reason.startswith("16x16 slice in a series of")
    assert skipped.path == f"COVID/file-{file_pseudonym(series_dir / '999.dcm', KEY)}"


def test_a_skipped_localizer_is_reported_under_its_stand_in(tmp_path):
    root = make_demo_data(tmp_path / "dicom", n_per_class=4, size=48, seed=1, format="dicom")
    series_dir, same = _identified_extras(root)
    write_ct(series_dir / "000.dcm", level_slice(-500), **same,
             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    ds = load(root, tmp_path)
    (skipped,) = ds.skipped
    assert skipped.reason == "localizer (scout) image, not an axial slice"
    assert skipped.path == f"COVID/file-{file_pseudonym(series_dir / '000.dcm', KEY)}"


def test_pseudonyms_are_keyed_and_stable():
    a = pseudonym("PAT-0001", b"key one")
    assert re.fullmatch(r"[0-9a-f]{12}", a)
    assert a == pseudonym("PAT-0001", b"key one")
    assert a != pseudonym("PAT-0001", b"key two")
    assert a != pseudonym("PAT-0002", b"key one")


def test_the_identity_key_decides_the_pseudonyms_of_a_dataset(tmp_path):
    root = make_demo_data(tmp_path / "dicom", n_per_class=4, size=48, seed=2, format="dicom")
    one = load(root, tmp_path)
    again = load(root, tmp_path)
    other = load(root, tmp_path, identity_key=b"another key")
    assert one.paths == again.paths and one.groups == again.groups
    assert set(one.groups).isdisjoint(other.groups)
    assert set(one.paths).isdisjoint(other.paths)
    assert np.array_equal(one.images, other.images)


# --- 13: the demo in every format ---------------------------------------------------------------

def _slice_key(path: str, patient_of: dict[str, str], files: dict[str, Path]
               ) -> tuple[str, int]:
    """(demo group, slice index) of a demo slice's name in any format; `files` maps file
    pseudonyms to the files (what `ctscan locate` does)."""
    label, rest = path.split("/", 1)
    if path.endswith(".png"):  # COVID/covid-p000-s03.png
        group, index = re.fullmatch(r"(.+)-s(\d+)\.png", rest).groups()
        return group, int(index)
    if "#" in path:  # COVID/volume-<file>#3 of COVID/covid-p000.nii.gz
        volume, index = re.fullmatch(r"volume-(\w+)#(\d+)", rest).groups()
        return files[volume].name.removesuffix(".nii.gz"), int(index)
    # COVID/patient-<patient>/series-<series>/slice-<file> of .../004.dcm: InstanceNumber 4
    number = int(files[path.rsplit("slice-", 1)[1]].stem)
    return patient_of[_patient_id_of(path)], number - 1


def test_the_demo_reads_the_same_as_png_dicom_and_nifti(tmp_path):
    args = {"n_per_class": 12, "size": 48, "seed": 4}
    loaded = {}
    for fmt in ("png", "dicom", "nifti"):
        root = make_demo_data(tmp_path / fmt, **args, format=fmt)
        loaded[fmt] = load(root, tmp_path, image_size=48)
    png = loaded["png"]
    # DICOM PatientIDs are DEMO-COVID-000 for group covid-p000.
    groups = {Path(p).stem.rsplit("-s", 1)[0] for p in png.paths}
    patient_of = {pseudonym(f"DEMO-{g.split('-p')[0].upper()}-{g.split('-p')[1]}", KEY): g
                  for g in groups}
    files = {file_pseudonym(p, KEY): p for p in tmp_path.rglob("*") if p.is_file()}
    reference = {_slice_key(p, patient_of, files): (png.labels[i], png.images[i])
                 for i, p in enumerate(png.paths)}
    assert len(reference) == len(png) == 24
    for fmt in ("dicom", "nifti"):
        ds = loaded[fmt]
        assert not ds.skipped, fmt
        assert np.bincount(ds.labels).tolist() == np.bincount(png.labels).tolist(), fmt
        assert set(ds.bits) == {"HU"}
        seen = set()
        for i, path in enumerate(ds.paths):
            key = _slice_key(path, patient_of, files)
            label, image = reference[key]
            assert ds.labels[i] == label, (fmt, path)
            assert np.array_equal(ds.images[i], image), (fmt, path)
            seen.add(key)
        assert seen == set(reference), fmt
