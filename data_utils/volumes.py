"""CT as scanners write it: DICOM series and NIfTI volumes, read slice by slice.

Every slice goes the same way: stored values -> Hounsfield units (RescaleSlope and
RescaleIntercept, an Enhanced CT frame's from its functional groups; NIfTI's scl_slope and
scl_inter) -> a window of CENTER +- WIDTH/2 HU onto 0..255 (the lung window by default) -> the
square 8-bit slice every ctscan model takes. MONOCHROME1 (white = low values) is inverted after
windowing. Every slice is shown as radiologists read an axial CT, whatever the patient's position
on the table (head or feet first, supine or prone): anterior at the top, the patient's right on
the image's left.

- DICOM: one file is one slice (a multi-frame file: one slice per frame). Slices are grouped into
  series by SeriesInstanceUID and ordered feet to head along the slice normal by
  ImagePositionPatient and ImageOrientationPatient (an Enhanced CT's frame by its own, from
  PerFrameFunctionalGroupsSequence over SharedFunctionalGroupsSequence). Only a series none of
  whose files has a position is ordered by InstanceNumber; in one that has, a file without one
  is skipped (see order_series). Each slice is turned to the view above by its orientation, to
  the nearest patient axes where it is tilted or oblique (flipped or transposed, never
  resampled); a file without an orientation is shown as stored. Only axial CT images are
  slices: other modalities, objects without pixels (SR, RTSTRUCT...), localizers (scouts) and
  sagittal or coronal slices (reformats; ctscan reads axial chest CT) are skipped with a reason.
- NIfTI: each axial slice of a .nii / .nii.gz is a slice. The volume is read in nibabel's closest
  canonical orientation (RAS+), slices ordered inferior to superior.

Files may be damaged or hostile. A malformed header value (a position of two numbers, a
non-numeric InstanceNumber, an infinite RescaleSlope...) skips its file with a reason naming the
attribute; declared sizes are bounded before any pixel is decoded (see _refuse_oversized); a
slice holding NaN or infinite values is skipped with a reason, not shown as air or bone.

Patient, study and series IDs leave this module only to be made pseudonyms (data_utils.identity);
no other header value is kept.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from data_utils.decode import Decoded, decode_failure, decode_image, fit_square, linear_to_uint8

# The lung window (centre -600 HU, width 1500 HU: -1350..150 HU onto 0..255), as radiologists
# read lung parenchyma; --window CENTER,WIDTH changes it.
DEFAULT_WINDOW = (-600.0, 1500.0)
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_RULES = ("all", "every:K", "central:FRACTION", "max:N")
# What is read of a header before its pixels (the README lists them): what a slice is, whose
# (the three IDs, made pseudonyms at once), where it lies and how big it is. No name, date or
# accession number is read.
_ID_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"]
# An Enhanced (multi-frame) CT keeps each frame's position, orientation and rescale here; their
# other items (a frame's acquisition time...) are read with them and dropped.
_FRAME_GROUPS = ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
_HEADER_TAGS = ["Modality", "ImageType", "SOPClassUID", *_ID_TAGS, "ImagePositionPatient",
                "ImageOrientationPatient", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                "RescaleSlope", "RescaleIntercept", *_FRAME_GROUPS]
# Declared sizes, checked before any pixel is decoded (see _refuse_oversized). pydicom decodes a
# multi-frame file whole: 2,000 frames of 512 x 512 (a chest CT at 0.3 mm holds about 1,200) are
# 1 GiB as int16, each frame then becoming float64 HU.
MAX_FILE_PIXELS = 2_000 * 512 * 512
# Each slice of a file becomes a sample before its pixels are read, however small they are
# declared: more slices than a whole-body scan at 0.2 mm holds is a mistake or an attack.
MAX_SLICES = 10_000
# How far ImageOrientationPatient may stray from two perpendicular unit vectors: DS values hold
# 16 characters, and some scanners write 5 or 6 decimals.
ORIENTATION_TOLERANCE = 1e-2


class NotASlice(ValueError):
    """A file that holds no CT slice ctscan can use; the message is the reason it is skipped."""


def volume_kind(path: Path) -> str | None:
    """"dicom", "nifti" or None (a 2-D image file, or not an image) by the file's name, and for
    a file without a suffix by DICOM's "DICM" marker (PACS exports often name files by UID)."""
    name, head = path.name.lower(), b""
    if "." not in name or name.rsplit(".", 1)[1].isdigit():  # "IM0001", "1.2.840.10008.5"
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            pass
    return _kind(name, head)


def _kind(name: str, head: bytes) -> str | None:
    """The one rule of what a file is, from its name and (at least) its first 132 bytes."""
    name = name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES) or head[128:132] == b"DICM":
        return "dicom"
    return None


@dataclass(frozen=True)
class DicomHeader:
    """What grouping and ordering need of one DICOM file; the IDs are raw, kept in memory only."""

    patient: str  # PatientID; "" where it is empty (then the study names the group)
    study: str
    series: str
    # Each frame's place along its slice normal turned headwards (mm), so slices sort feet to
    # head; None where the file has no valid position (see order_series).
    positions: tuple[float, ...] | None
    instance: int  # InstanceNumber, 0 where absent: the order of a series without positions
    size: tuple[int, int]  # (rows, columns)
    frames: int


def read_dicom_header(path: Path) -> DicomHeader:
    """The header of a DICOM file, pixels unread; NotASlice for anything but an axial CT image,
    and for a malformed or oversized one (see the module doc)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError as e:
        raise NotASlice(f"not a DICOM file ({e})") from e
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a damaged header
        raise NotASlice(f"unreadable DICOM header ({decode_failure(e)})") from e
    modality = str(ds.get("Modality", "") or "")
    ids = {tag: str(ds.get(tag, "") or "").strip() for tag in _ID_TAGS}
    if "Rows" not in ds:
        raise NotASlice(f"DICOM object without an image (Modality {modality or 'unset'})")
    if modality != "CT":
        raise NotASlice(f"Modality {modality or 'unset'} is not CT")
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        raise NotASlice("localizer (scout) image, not an axial slice")
    rows, columns, frames = _declared_size(ds)
    positions = tuple(position for _, position in _geometry(ds, frames))
    # Checked now, though only decoding uses it: a file that cannot be decoded must take no
    # place in its series, and is listed with the files skipped.
    for k in range(frames):
        _rescale(ds, k)
    return DicomHeader(
        patient=ids["PatientID"],
        study=ids["StudyInstanceUID"],
        series=ids["SeriesInstanceUID"],
        positions=None if None in positions else positions,
        instance=_integer(ds, "InstanceNumber") or 0,
        size=(rows, columns),
        frames=frames,
    )


Item = TypeVar("Item")


def order_series(members: list[tuple[DicomHeader, Item]]
                 ) -> tuple[list[tuple[DicomHeader, Item, int]],
                            list[tuple[DicomHeader, Item, str]]]:
    """The slices of one series' files feet to head, as (header, item, frame), and the files
    left out with the reason why:
    - a file of another size than most of the series' is a reconstruction or a stray file, not
      part of this stack;
    - where any file has a position, every slice goes by its own (a multi-frame file's frames
      too, wherever the file stores them), and a file without one is left out: its
      InstanceNumber cannot be placed among millimetres;
    - where no file has one, InstanceNumber orders the files, a file's frames as stored.
    Slices at one place keep InstanceNumber order, then the order of `members`."""
    size = Counter(h.size for h, _ in members).most_common(1)[0][0]
    left_out = [(h, item, f"{h.size[0]}x{h.size[1]} slice in a series of {size[0]}x{size[1]} "
                          "slices") for h, item in members if h.size != size]
    kept = [(h, item) for h, item in members if h.size == size]
    if any(h.positions for h, _ in kept):
        left_out += [(h, item, "no position (ImagePositionPatient with ImageOrientationPatient) "
                               "in a series ordered by position")
                     for h, item in kept if h.positions is None]
        kept = [(h, item) for h, item in kept if h.positions]
    slices = [(h, item, k) for h, item in kept for k in range(h.frames)]
    slices.sort(key=lambda s: (s[0].positions[s[2]] if s[0].positions else 0.0, s[0].instance))
    return slices, left_out


def _numbers(ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray | None:
    """The `count` finite numbers `keyword` holds; None where it is absent or empty. Anything
    else is NotASlice naming the attribute: one damaged header skips its file, never ends the
    command with a traceback."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        numbers = np.array([float(v) for v in (value if isinstance(value, MultiValue)
                                               else [value])], np.float64)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a value it cannot read
        raise NotASlice(f"malformed {keyword} ({decode_failure(e)})") from e
    if numbers.size != count:
        raise NotASlice(f"malformed {keyword}: expected {count} number{'s' * (count > 1)}, got "
                        f"{numbers.size}")
    if not np.isfinite(numbers).all():
        raise NotASlice(f"malformed {keyword}: {_shown(numbers)} is not finite")
    return numbers


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    numbers = _numbers(ds, keyword, 1)
    if numbers is None:
        return None
    if not numbers[0].is_integer():
        raise NotASlice(f"malformed {keyword}: {numbers[0]:g} is not a whole number")
    return int(numbers[0])


def _shown(numbers: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in numbers)  # as DICOM writes several values


def _declared_size(ds: pydicom.Dataset) -> tuple[int, int, int]:
    """(rows, columns, frames) as the header declares them, refused unless each is a positive
    whole number within the bounds (see _refuse_oversized), and unless an Enhanced CT's
    per-frame functional groups have an item per frame."""
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    frames = _integer(ds, "NumberOfFrames") or 1  # 0 as pydicom reads it: one frame
    if rows is None or columns is None or min(rows, columns, frames) < 1:
        said = ", ".join(f"{k} {'missing' if v is None else v}" for k, v in
                         (("Rows", rows), ("Columns", columns), ("NumberOfFrames", frames)))
        raise NotASlice(f"malformed image size: {said}")
    _refuse_oversized(rows, columns, frames)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != frames:
        raise NotASlice(f"malformed PerFrameFunctionalGroupsSequence: {len(per_frame)} item(s) "
                        f"for {frames} frames")
    return rows, columns, frames


def _refuse_oversized(rows: int, columns: int, slices: int) -> None:
    """Declared sizes, checked before a pixel is decoded: decoders allocate what a header
    declares, and a file of a few bytes can declare gigabytes. One slice is bounded as a PNG is
    (Pillow's Image.MAX_IMAGE_PIXELS), a file by MAX_FILE_PIXELS and MAX_SLICES."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and rows * columns > limit:
        raise NotASlice(f"declared {columns}x{rows} slice is over Pillow's MAX_IMAGE_PIXELS "
                        f"({limit}): a mistake or a decompression bomb")
    if slices > MAX_SLICES or rows * columns * slices > MAX_FILE_PIXELS:
        raise NotASlice(f"declared {slices} slices of {columns}x{rows} are over the bound of one "
                        f"file ({MAX_SLICES} slices, {MAX_FILE_PIXELS} pixels): a mistake or a "
                        "decompression bomb")


def _frame_attributes(ds: pydicom.Dataset, frame: int, macro: str) -> pydicom.Dataset:
    """Where frame `frame`'s attributes of functional group `macro` (e.g. PlanePositionSequence)
    lie: the frame's own item of PerFrameFunctionalGroupsSequence, else the one all frames share
    in SharedFunctionalGroupsSequence, else (a classic image) the dataset itself. pydicom's
    apply_modality_lut looks only at the last, where an Enhanced CT keeps nothing."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups) or []
        if index < len(items) and items[index].get(macro):
            return items[index][macro][0]
    return ds


def _geometry(ds: pydicom.Dataset, frames: int
              ) -> list[tuple[tuple[bool, int, int] | None, float | None]]:
    """Per frame: how to turn it to the radiological view (see _radiological), and its place
    along the slice normal turned headwards (mm); None for what the header does not say (a
    position needs an orientation). NotASlice for a malformed orientation or position, and for
    a slice that is not axial: its normal nearest the patient's left-right (sagittal) or
    front-back (coronal) axis."""
    out = []
    for frame in range(frames):
        orientation = _numbers(_frame_attributes(ds, frame, "PlaneOrientationSequence"),
                               "ImageOrientationPatient", 6)
        position = _numbers(_frame_attributes(ds, frame, "PlanePositionSequence"),
                            "ImagePositionPatient", 3)
        if orientation is None:
            out.append((None, None))
            continue
        along_row, along_column = orientation[:3], orientation[3:]
        if (abs(along_row @ along_row - 1) > ORIENTATION_TOLERANCE
                or abs(along_column @ along_column - 1) > ORIENTATION_TOLERANCE
                or abs(along_row @ along_column) > ORIENTATION_TOLERANCE):
            raise NotASlice(f"malformed ImageOrientationPatient: {_shown(orientation)} is not "
                            "two perpendicular unit vectors")
        normal = np.cross(along_row, along_column)
        # Nearest axes, as nibabel's io_orientation finds them for any slice within 45 degrees
        # of them, without its SVD (which would add a third to the time a header takes): the
        # plane is the axis the normal lies nearest; in an axial one the stored columns (along
        # a row) run nearest x or y, the rows nearest the other.
        plane = int(np.argmax(np.abs(normal)))
        if plane != 2:
            raise NotASlice(f"{('sagittal', 'coronal')[plane]} slice (ImageOrientationPatient "
                            f"{_shown(orientation)}), not axial: ctscan reads axial chest CT")
        if abs(along_row[0]) >= abs(along_row[1]):
            view = (False, _step(along_column[1]), _step(along_row[0]))
        else:  # a row runs front to back: transposed, so that the columns run left-right
            view = (True, _step(along_row[1]), _step(along_column[0]))
        if normal[2] < 0:  # a feet-first or prone scan's row x column points to the feet
            normal = -normal
        out.append((view, None if position is None else float(normal @ position)))
    return out


def _step(direction: float) -> int:
    """1 to keep an axis that runs towards + (the patient's left, the back), -1 to flip it."""
    return 1 if direction >= 0 else -1


def nifti_slices(path: Path) -> int:
    """The number of axial slices of a NIfTI volume, from its header alone."""
    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise NotASlice(f"not a NIfTI volume ({type(e).__name__}: {e})") from e
    return int(img.shape[_superior_axis(img.shape, img.affine)])


def _superior_axis(shape: tuple[int, ...], affine: np.ndarray) -> int:
    """Which axis of a NIfTI volume runs inferior-superior; NotASlice for anything but one 3-D
    volume of a size within the bounds (see _refuse_oversized)."""
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise NotASlice(f"NIfTI shape {shape} is not one 3-D volume")
    superior = np.flatnonzero(nib.orientations.io_orientation(affine)[:, 0] == 2)
    if len(superior) != 1:
        raise NotASlice("NIfTI affine has no inferior-superior axis")
    axis = int(superior[0])
    rows, columns = (n for a, n in enumerate(shape[:3]) if a != axis)
    _refuse_oversized(rows, columns, shape[axis])
    return axis


def parse_slices(rule: str) -> str:
    """A --slices rule, checked: all, every:K (K >= 1), central:FRACTION (0 < F <= 1) or max:N."""
    kind, _, value = rule.partition(":")
    try:
        ok = {"all": lambda: not value, "every": lambda: int(value) >= 1,
              "max": lambda: int(value) >= 1,
              "central": lambda: 0 < float(value) <= 1}[kind]()
    except (KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--slices {rule!r}: expected one of {', '.join(SLICE_RULES)}")
    return rule


def select_slices(n: int, rule: str) -> list[int]:
    """Which of a series' n ordered slices to keep, so a 300-slice scan does not outweigh a
    40-slice one: all; every K-th (from the first); the central FRACTION (the lungs, without the
    neck and abdomen of a long scan); or at most N spread evenly from first to last."""
    kind, _, value = parse_slices(rule).partition(":")
    if kind == "every":
        return list(range(0, n, int(value)))
    if kind == "central":
        keep = max(1, round(n * float(value)))
        start = (n - keep) // 2
        return list(range(start, start + keep))
    if kind == "max" and n > int(value):
        return sorted({round(i) for i in np.linspace(0, n - 1, int(value))})
    return list(range(n))


def parse_window(text: str) -> tuple[float, float]:
    """--window CENTER,WIDTH in HU, e.g. -600,1500 (lung) or 40,400 (soft tissue)."""
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        center, width = 0.0, -1.0
    if not (width > 0 and np.isfinite(width) and np.isfinite(center)):
        raise ValueError(f"--window {text!r}: expected CENTER,WIDTH in HU with WIDTH > 0, "
                         "e.g. -600,1500")
    return center, width


def window_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """CENTER - WIDTH/2 .. CENTER + WIDTH/2 HU onto 0..255, clipping outside."""
    center, width = window
    return linear_to_uint8(hu, center - width / 2, center + width / 2)


def decode_dicom(data: bytes, size: int, resize: str, window: tuple[float, float]
                 ) -> list[Decoded | str]:
    """Every frame of a DICOM CT image, in the order the file stores them, as a windowed square
    slice in the radiological view (see _radiological), or why it is not one."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise NotASlice("DICOM file without pixel data")
    samples = _integer(ds, "SamplesPerPixel") or 1
    if samples != 1:
        raise NotASlice(f"{samples} samples per pixel: a colour image, not CT")
    # Checked again on the bytes decoded, not trusted from the header read before.
    _, _, frames = _declared_size(ds)
    geometry = _geometry(ds, frames)
    rescale = [_rescale(ds, k) for k in range(frames)]
    # Raises for a transfer syntax no installed plugin decodes and for pixel data that do not
    # fill the declared Rows x Columns x NumberOfFrames; what it returns has that shape.
    stored = ds.pixel_array
    if frames == 1:
        stored = stored[None]
    invert = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    return [_windowed(_radiological(frame * slope + intercept, view), window, invert, size,
                      resize, "DICOM")
            for frame, (view, _), (slope, intercept) in zip(stored, geometry, rescale,
                                                            strict=True)]


def _rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    """Frame `frame`'s (RescaleSlope, RescaleIntercept): stored values -> HU; (1, 0) where
    absent. An Enhanced CT keeps them in its functional groups, and may per frame."""
    where = _frame_attributes(ds, frame, "PixelValueTransformationSequence")
    slope, intercept = _numbers(where, "RescaleSlope", 1), _numbers(where, "RescaleIntercept", 1)
    return (1.0 if slope is None else float(slope[0]),
            0.0 if intercept is None else float(intercept[0]))


def _radiological(pixels: np.ndarray, view: tuple[bool, int, int] | None) -> np.ndarray:
    """An axial frame as radiologists read it, whatever the patient's position on the table:
    anterior at the top, the patient's right on the image's left; that is, rows run towards
    DICOM's +y (the back) and columns towards +x (the patient's left), as decode_nifti shows a
    volume. `view` (see _geometry): whether to transpose, then the row and column steps. A
    tilted or oblique slice goes to its nearest axes, flipped or transposed, never resampled;
    None: shown as stored."""
    if view is None:
        return pixels
    transposed, row_step, column_step = view
    return (pixels.T if transposed else pixels)[::row_step, ::column_step]


def decode_nifti(data: bytes, size: int, resize: str, window: tuple[float, float]
                 ) -> list[Decoded | str]:
    """Every axial slice of a NIfTI volume, inferior to superior, as a windowed square slice."""
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else \
        io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns of unusual headers it still reads
        header = nib.Nifti1Header.from_fileobj(stream)
        shape = header.get_data_shape()
        axis = _superior_axis(shape, header.get_best_affine())
        # Inflated only as far as the declared voxels go, once their size has been checked: a
        # small .nii.gz can inflate to gigabytes.
        stream.seek(0)
        img = nib.Nifti1Image.from_bytes(stream.read(
            int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize))
    ornt = nib.orientations.io_orientation(img.affine)
    n = img.shape[axis]
    slices = []
    for k in range(n):
        # One slice at a time through the proxy (scl_slope and scl_inter applied): a whole
        # thin-slice volume in float64 would need gigabytes.
        raw_k = n - 1 - k if ornt[axis, 1] < 0 else k
        slab = np.asarray(img.dataobj[(slice(None),) * axis + (slice(raw_k, raw_k + 1),)])
        ras = nib.orientations.apply_orientation(slab.reshape(slab.shape[:3]), ornt)[:, :, 0]
        # RAS: +x is the patient's right, +y anterior. Row 0 anterior, column 0 the right.
        slices.append(_windowed(ras[::-1, ::-1].T, window, False, size, resize, "NIfTI"))
    return slices


def _windowed(hu: np.ndarray, window: tuple[float, float], invert: bool, size: int,
              resize: str, mode: str) -> Decoded | str:
    hu = np.asarray(hu, np.float64)
    if not np.isfinite(hu).all():
        # Neither air nor bone: windowing would make NaN black and inf white, silently.
        return f"{np.count_nonzero(~np.isfinite(hu))} NaN or infinite values in the slice"
    pixels = window_to_uint8(hu, window)
    if invert:
        pixels = 255 - pixels
    if pixels.min() == pixels.max():
        # All air, or all outside the window: it would teach the model nothing but its label.
        return f"constant slice in window {window[0]:g},{window[1]:g}: every pixel is " \
               f"{pixels.flat[0]}"
    height, width = pixels.shape
    return Decoded(fit_square(Image.fromarray(pixels), size, resize), mode, width, height, "HU")


def slice_at(slices: list, frame: int) -> object:
    """Item `frame` of a file's slices (decoded, their cache rows, or why each is unusable), or
    why it is missing: a header may promise more frames than the pixel data hold."""
    return slices[frame] if frame < len(slices) else f"slice {frame} missing from the file"


def decode_frames(name: str, data: bytes, size: int, resize: str,
                  window: tuple[float, float] = DEFAULT_WINDOW) -> list[Decoded | str]:
    """Every slice a file holds, by its kind (see `volume_kind`): one for a 2-D image, each
    frame of a DICOM file, each axial slice of a NIfTI volume. A slice that cannot be used is
    the reason why, in its place; a file that cannot be read at all raises."""
    kind = _kind(name, data)
    if kind == "dicom":
        return decode_dicom(data, size, resize, window)
    if kind == "nifti":
        return decode_nifti(data, size, resize, window)
    return [decode_image(data, size, resize)]
