"""CT as scanners write it: DICOM series and NIfTI volumes, read slice by slice.

Every slice goes the same way: stored values -> Hounsfield units (DICOM's modality LUT, i.e.
RescaleSlope and RescaleIntercept; NIfTI's scl_slope and scl_inter) -> a window of
CENTER +- WIDTH/2 HU onto 0..255 (the lung window by default) -> the square 8-bit slice every
ctscan model takes. MONOCHROME1 (white = low values) is inverted after windowing.

- DICOM: one file is one slice (a multi-frame file: one slice per frame). Slices are grouped into
  series by SeriesInstanceUID and ordered along the slice normal by ImagePositionPatient
  (InstanceNumber where a file has no position). Only CT images are slices: other modalities,
  objects without pixels (SR, RTSTRUCT...) and localizers (scouts) are skipped with a reason.
- NIfTI: each axial slice of a .nii / .nii.gz is a slice. The volume is read in nibabel's closest
  canonical orientation (RAS+), slices ordered inferior to superior, and each is shown as
  radiologists read an axial CT (and as DICOM stores it): anterior at the top, the patient's
  right on the image's left.

Patient IDs and UIDs never leave this module in clear: `pseudonym` is an HMAC under a key kept
with the run (or, outside a run, in the cache folder).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from data_utils.decode import Decoded, decode_failure, decode_image, fit_square, linear_to_uint8

# The lung window (centre -600 HU, width 1500 HU: -1350..150 HU onto 0..255), as radiologists
# read lung parenchyma; --window CENTER,WIDTH changes it.
DEFAULT_WINDOW = (-600.0, 1500.0)
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_RULES = ("all", "every:K", "central:FRACTION", "max:N")
# An identifier shorter than this is scrubbed from a path only where it is a whole folder or
# file name: as a substring, "12" would also hit "slice-012.dcm".
MIN_SUBSTRING_ID = 6
_HEADER_TAGS = ["Modality", "ImageType", "SOPClassUID", "PatientID", "PatientName",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber",
                "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "Rows",
                "Columns", "NumberOfFrames"]


class NotASlice(ValueError):
    """A file that holds no CT slice ctscan can use; the message is the reason it is skipped,
    `identifiers` what its header names (to scrub from its path where it is listed)."""

    def __init__(self, reason: str, identifiers: tuple[str, ...] = ()):
        super().__init__(reason)
        self.identifiers = identifiers


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


def pseudonym(value: str, key: bytes) -> str:
    """A stable stand-in for an identifier: HMAC-SHA256 under `key`, 12 hex digits. Without the
    key nobody can test a guessed ID against it, as one could against a plain hash."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:12]


def scrub(rel: str, identifiers: list[str], key: bytes) -> str:
    """`rel` with each identifier replaced by its pseudonym: PACS exports name folders and files
    by PatientID and UIDs, and the paths ctscan writes must not carry them."""
    parts = rel.split("/")
    for value in sorted({v for v in identifiers if v}, key=len, reverse=True):
        stand_in = f"id-{pseudonym(value, key)}"
        for i, part in enumerate(parts):
            if part == value:
                parts[i] = stand_in
            elif part.startswith(value + "."):  # a file named by the ID: keep its suffix
                parts[i] = stand_in + part[len(value):]
            elif len(value) >= MIN_SUBSTRING_ID:
                parts[i] = part.replace(value, stand_in)
    return "/".join(parts)


@dataclass(frozen=True)
class DicomHeader:
    """What grouping and ordering need of one DICOM file; the IDs are raw, kept in memory only."""

    patient: str  # PatientID, or StudyInstanceUID where it is empty; "" when both are
    study: str
    series: str
    identifiers: tuple[str, ...]  # every ID the file holds, to scrub from its path
    position: float  # along the slice normal; InstanceNumber where there is no position
    size: tuple[int, int]  # (rows, columns)
    frames: int


def read_dicom_header(path: Path) -> DicomHeader:
    """The header of a DICOM file, pixels unread; NotASlice for anything but a CT image."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError as e:
        raise NotASlice(f"not a DICOM file ({e})") from e
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a damaged header
        raise NotASlice(f"unreadable DICOM header ({decode_failure(e)})") from e
    modality = str(ds.get("Modality", "") or "")
    ids = {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS[3:9]}
    held = tuple(v for v in ids.values() if v)
    if "Rows" not in ds:
        raise NotASlice(f"DICOM object without an image (Modality {modality or 'unset'})", held)
    if modality != "CT":
        raise NotASlice(f"Modality {modality or 'unset'} is not CT", held)
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        raise NotASlice("localizer (scout) image, not an axial slice", held)
    return DicomHeader(
        patient=ids["PatientID"] or ids["StudyInstanceUID"],
        study=ids["StudyInstanceUID"],
        series=ids["SeriesInstanceUID"],
        identifiers=held,
        position=_position(ds),
        size=(int(ds.Rows), int(ds.Columns)),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def _position(ds: pydicom.Dataset) -> float:
    """Where the slice lies along its normal (mm), so slices sort from feet to head (the
    normal turned to point headwards: a feet-first scan's row x column points to the feet);
    without ImagePositionPatient, its InstanceNumber."""
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None and len(orientation) == 6:
        normal = np.cross(np.array(orientation[:3], float), np.array(orientation[3:], float))
        if normal[2] < 0:  # DICOM's patient z points to the head
            normal = -normal
        return float(np.dot(normal, np.array(position, float)))
    return float(ds.get("InstanceNumber", 0) or 0)


def nifti_slices(path: Path) -> int:
    """The number of axial slices of a NIfTI volume, from its header alone."""
    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise NotASlice(f"not a NIfTI volume ({type(e).__name__}: {e})") from e
    if len(img.shape) < 3 or any(n != 1 for n in img.shape[3:]):
        raise NotASlice(f"NIfTI shape {img.shape} is not one 3-D volume")
    return int(img.shape[_superior_axis(img.affine)])


def _superior_axis(affine: np.ndarray) -> int:
    return int(np.flatnonzero(nib.orientations.io_orientation(affine)[:, 0] == 2)[0])


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
    """Every frame of a DICOM CT image as a windowed square slice, or why it is not one."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise NotASlice("DICOM file without pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotASlice(f"{ds.SamplesPerPixel} samples per pixel: a colour image, not CT")
    frames = ds.pixel_array  # raises for a transfer syntax no installed plugin decodes
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        frames = frames[None]
    invert = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    return [_windowed(apply_modality_lut(frame, ds), window, invert, size, resize, "DICOM")
            for frame in frames]


def decode_nifti(data: bytes, size: int, resize: str, window: tuple[float, float]
                 ) -> list[Decoded | str]:
    """Every axial slice of a NIfTI volume, inferior to superior, as a windowed square slice."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns of unusual headers it still reads
        img = nib.Nifti1Image.from_bytes(data)
    ornt = nib.orientations.io_orientation(img.affine)
    axis = _superior_axis(img.affine)
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
    pixels = window_to_uint8(np.asarray(hu, np.float64), window)
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
