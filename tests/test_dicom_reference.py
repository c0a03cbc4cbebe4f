"""The DICOM reader against a reference nobody here wrote: SimpleITK, which reads DICOM with GDCM.

Series are written with pydicom as scanners lay them out: head or feet first, supine, prone or
on the side, a tilted gantry, an oblique plane, compressed, under shuffled file names and
InstanceNumbers (so only the positions tell the order). SimpleITK reads the same files:
ImageSeriesReader orders them (GDCM sorts by position along the slice normal) and applies the
rescale, and sitk.DICOMOrient(..., "LPS") turns the volume so that rows run to the back, columns
to the patient's left and slices to the head, which is the view ctscan shows. Its Hounsfield
units, windowed by the formula written out here, must equal ctscan's slices pixel for pixel and
in the same order. Slices are decoded at their own size, where fit_square copies rather than
resamples, so nothing stands between the two.

Every slice also holds one marker at the patient's front right: it must come out top left, which
is what the view means, whatever SimpleITK says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from test_volumes import LUNG, hu_to_stored, level_slice, load, other_class, uid, write_ct

from data_utils.volumes import decode_frames

SIZE = 32  # pixels a side, stored and decoded: no resampling
assert LUNG == (-600.0, 1500.0)  # window_by_hand's formula


def window_by_hand(hu: np.ndarray) -> np.ndarray:
    """The lung window, -1350..150 HU onto 0..255."""
    return np.clip(np.round((np.asarray(hu, np.float64) + 1350) * 255 / 1500), 0, 255
                   ).astype(np.uint8)


def random_hu(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """-1250..-50 HU in steps of 100, which the lung window takes to whole pixels (17 * m):
    never a rounding half, where float error could tip one reader's pixel and not the other's."""
    return -1350.0 + 100 * rng.integers(1, 14, shape)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    i, j = (a for a in range(3) if a != axis)
    m = np.eye(3)
    m[i, i] = m[j, j] = np.cos(t)
    m[i, j], m[j, i] = -np.sin(t), np.sin(t)
    return m


def _orientation(rotation: np.ndarray) -> list[float]:
    """ImageOrientationPatient of a rotated head-first supine slice, rounded as DS holds it."""
    return [round(float(v), 6) for v in (*rotation[:, 0], *rotation[:, 1])]


# ImageOrientationPatient: along a row, then along a column, in DICOM's patient space (+x the
# patient's left, +y the back, +z the head).
HEAD_FIRST_SUPINE = [1, 0, 0, 0, 1, 0]
FEET_FIRST_SUPINE = [-1, 0, 0, 0, 1, 0]
HEAD_FIRST_PRONE = [-1, 0, 0, 0, -1, 0]
FEET_FIRST_PRONE = [1, 0, 0, 0, -1, 0]
HEAD_FIRST_DECUBITUS_LEFT = [0, 1, 0, -1, 0, 0]  # rows run to the back: shown transposed
TILTED_GANTRY = _orientation(_rotation(0, -20))  # columns along (0, cos 20, -sin 20)
OBLIQUE = _orientation(_rotation(0, 15) @ _rotation(2, 110))  # nearest: rows -> +y, cols -> -x

CASES = {  # id: (orientation, transfer syntax, RescaleSlope)
    "head-first-supine": (HEAD_FIRST_SUPINE, ExplicitVRLittleEndian, 1),
    "feet-first-supine": (FEET_FIRST_SUPINE, ExplicitVRLittleEndian, 1),
    "head-first-prone": (HEAD_FIRST_PRONE, ExplicitVRLittleEndian, 2),
    "feet-first-prone": (FEET_FIRST_PRONE, ExplicitVRLittleEndian, 1),
    "decubitus": (HEAD_FIRST_DECUBITUS_LEFT, ExplicitVRLittleEndian, 1),
    "tilted-gantry": (TILTED_GANTRY, ExplicitVRLittleEndian, 1),
    "oblique": (OBLIQUE, ExplicitVRLittleEndian, 2),
    "RLE": (FEET_FIRST_PRONE, RLELossless, 2),
    "JPEG2000-lossless": (FEET_FIRST_SUPINE, JPEG2000Lossless, 1),
    "JPEG-LS-lossless": (HEAD_FIRST_PRONE, JPEGLSLossless, 1),
}


def write_series(folder: Path, orientation: list[float], syntax: str = ExplicitVRLittleEndian,
                 slope: float = 1, n: int = 5, seed: int = 0) -> None:
    """n slices of one series lying in `orientation`, the table moving 2.5 mm along z between
    them (as it does under a tilted gantry too), 1 mm pixels: random HU (see random_hu) and
    one 150 HU marker, the only white pixel, at the pixel nearest the point 6 mm to the
    patient's right and 6 mm to the front of the slice's centre. File names and InstanceNumbers
    are two other shuffles of the slices."""
    rng = np.random.default_rng(seed)
    along_row, along_column = np.array(orientation[:3]), np.array(orientation[3:])
    names, instances = rng.permutation(n), rng.permutation(n)
    assert list(names) != sorted(names) and list(instances) != sorted(instances)
    for k in range(n):
        centre = np.array([0.0, 0.0, 2.5 * k])
        corner = centre - (SIZE - 1) / 2 * (along_row + along_column)  # pixel [0, 0]'s centre
        hu = random_hu(rng, (SIZE, SIZE))
        front_right = centre + [-6.0, -6.0, 0.0]  # DICOM's -x is the patient's right, -y front
        i, j = np.rint([(front_right - corner) @ along_column,
                        (front_right - corner) @ along_row]).astype(int)
        hu[i, j] = 150.0
        write_ct(folder / f"{names[k]:02d}.dcm", hu_to_stored(hu, slope), syntax=syntax,
                 ImagePositionPatient=[round(float(v), 4) for v in corner],
                 ImageOrientationPatient=orientation, PixelSpacing=[1.0, 1.0],
                 RescaleSlope=slope, InstanceNumber=int(instances[k]) + 1,
                 SeriesInstanceUID=uid("reference", folder))


def simpleitk_view(folder: Path) -> np.ndarray:
    """HU of the series in `folder` as SimpleITK reads it: GDCM's order, turned to LPS."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(sitk.DICOMOrient(reader.Execute(), "LPS"))


def covid_images(ds) -> np.ndarray:
    return ds.images[[ds.class_names[label] == "COVID" for label in ds.labels]]


def assert_front_right_is_top_left(images: np.ndarray) -> None:
    for image in images:
        ((row, column),) = np.argwhere(image == 255)
        assert row < SIZE // 2 and column < SIZE // 2, (row, column)


@pytest.mark.parametrize("case", CASES)
def test_a_series_reads_as_simpleitk_reads_it(tmp_path, case):
    orientation, syntax, slope = CASES[case]
    if syntax != ExplicitVRLittleEndian and not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder installed")
    series = tmp_path / "data" / "COVID" / "series"
    write_series(series, orientation, syntax, slope)
    other_class(tmp_path / "data")
    expected = window_by_hand(simpleitk_view(series))
    ds = load(tmp_path / "data", tmp_path, image_size=SIZE)
    assert not ds.skipped
    got = covid_images(ds)
    assert got.shape == expected.shape == (5, SIZE, SIZE)
    assert np.array_equal(got, expected)  # order, HU and view, every pixel
    assert_front_right_is_top_left(got)


def test_files_without_a_position_are_left_out_of_a_series_ordered_by_position(tmp_path):
    series = tmp_path / "data" / "COVID" / "series"
    write_series(series, FEET_FIRST_PRONE)
    expected = window_by_hand(simpleitk_view(series))
    # Two more files of the series without a position. By InstanceNumber (1 and 2, the lowest
    # with the others') they would sort first; among millimetres they have no place.
    for k in (1, 2):
        write_ct(series / f"unplaced{k}.dcm", level_slice(-1250.0 + 100 * k),
                 ImagePositionPatient=None, ImageOrientationPatient=FEET_FIRST_PRONE,
                 InstanceNumber=k, SeriesInstanceUID=uid("reference", series))
    other_class(tmp_path / "data")
    ds = load(tmp_path / "data", tmp_path, image_size=SIZE)
    assert [s.reason for s in ds.skipped] == [
        "no position (ImagePositionPatient with ImageOrientationPatient) in a series ordered "
        "by position"] * 2
    assert np.array_equal(covid_images(ds), expected)


def write_enhanced(path: Path, hu: np.ndarray, z: list[float], orientation: list[float],
                   rescale: tuple[float, float], own_rescale: dict[int, tuple[float, float]]
                   ) -> Path:
    """An Enhanced CT Image Storage file of the frames `hu` (frames, rows, cols), as the
    standard lays one out: frame k at z[k] in its own PlanePositionSequence; orientation, pixel
    spacing and (slope, intercept) `rescale` in the functional groups all frames share, unless
    `own_rescale` gives frame k its own; no position, orientation or rescale at the top level."""
    def item(keyword: str, **attrs: object) -> Dataset:
        group, inner = Dataset(), Dataset()
        for name, value in attrs.items():
            setattr(inner, name, value)
        setattr(group, keyword, Sequence([inner]))
        return group

    shared = item("PlaneOrientationSequence", ImageOrientationPatient=orientation)
    shared.PixelMeasuresSequence = item("PixelMeasuresSequence", PixelSpacing=[1.0, 1.0],
                                        SliceThickness=2.5).PixelMeasuresSequence
    shared.PixelValueTransformationSequence = item(
        "PixelValueTransformationSequence", RescaleSlope=rescale[0], RescaleIntercept=rescale[1],
        RescaleType="HU").PixelValueTransformationSequence
    per_frame, stored = [], []
    for k, position in enumerate(z):
        frame = item("PlanePositionSequence", ImagePositionPatient=[-15.5, -15.5, position])
        slope, intercept = own_rescale.get(k, rescale)
        if k in own_rescale:
            frame.PixelValueTransformationSequence = item(
                "PixelValueTransformationSequence", RescaleSlope=slope,
                RescaleIntercept=intercept, RescaleType="HU").PixelValueTransformationSequence
        per_frame.append(frame)
        stored.append(hu_to_stored(hu[k], slope, intercept))
    return write_ct(path, np.stack(stored), EnhancedCTImageStorage,
                    ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
                    ImagePositionPatient=None, ImageOrientationPatient=None, PixelSpacing=None,
                    RescaleSlope=None, RescaleIntercept=None,
                    SharedFunctionalGroupsSequence=Sequence([shared]),
                    PerFrameFunctionalGroupsSequence=Sequence(per_frame))


def test_an_enhanced_ct_reads_as_simpleitk_reads_it_frames_by_their_positions(tmp_path):
    rng = np.random.default_rng(7)
    hu = random_hu(rng, (5, SIZE, SIZE))
    hu[:, 9, 22] = 150.0  # stored at the patient's front right: x flipped, feet first
    z = [5.0, -2.5, 10.0, 0.0, 2.5]  # as stored; feet to head: frames 1, 3, 4, 0, 2
    path = write_enhanced(tmp_path / "data" / "COVID" / "enhanced.dcm", hu, z,
                          FEET_FIRST_SUPINE, rescale=(2, -1024), own_rescale={})
    other_class(tmp_path / "data")
    ds = load(tmp_path / "data", tmp_path, image_size=SIZE)
    assert not ds.skipped
    covid = [i for i, label in enumerate(ds.labels) if ds.class_names[label] == "COVID"]
    # GDCM keeps an Enhanced CT's frames in stored order, so their order is checked against the
    # per-frame positions the file was written with.
    assert [ds.frames[i] for i in covid] == [1, 3, 4, 0, 2]
    # Each frame's HU (through the shared PixelValueTransformationSequence) and view, as
    # SimpleITK reads that frame.
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (SIZE, SIZE, 5)
    for i in covid:
        k = ds.frames[i]
        frame = sitk.GetArrayFromImage(sitk.DICOMOrient(image[:, :, k : k + 1], "LPS"))[0]
        assert np.array_equal(ds.images[i], window_by_hand(frame)), k
    assert_front_right_is_top_left(ds.images[covid])


def test_an_enhanced_ct_frame_rescale_overrides_the_shared_one(tmp_path):
    # GDCM applies one rescale to a whole file, so this is checked against the standard: a
    # frame's own PixelValueTransformationSequence over the shared one.
    hu = np.stack([level_slice(level, SIZE) for level in (-1250.0, -950.0, -650.0)]) - 1024.0
    path = write_enhanced(tmp_path / "enhanced.dcm", hu, [0.0, 2.5, 5.0], HEAD_FIRST_SUPINE,
                          rescale=(2, -1024), own_rescale={1: (1, -2024)})
    slices = decode_frames(path.name, path.read_bytes(), SIZE, "pad")
    assert [int(d.pixels[16, 16]) for d in slices] == [17, 68, 119]
    assert [int(d.pixels[0, 0]) for d in slices] == [255] * 3  # the 150 HU marker, top left
