"""Procedurally generated CT-like axial slices, for trying ctscan without the real dataset.

The output mimics the Kaggle SARS-CoV-2 CT-scan layout (``COVID/`` and ``non-COVID/`` folders of
grayscale PNGs) plus a ``manifest.csv`` naming the patient of every slice. Each patient is a run
of consecutive, near-identical slices, as in the real data, so a split that ignores patients
leaks.

The classes differ only by focal lesions inside the lungs: positives have 1-6 ground-glass or
denser consolidation patches, mostly peripheral and posterior, whose number and density follow
a per-patient severity. Everything else is drawn the same way in both classes, including what
makes healthy lungs look denser: lung density from patient to patient, a dependent (posterior)
gradient, smooth patchiness and, in a quarter of patients, dependent atelectasis (a band along
the back with a flat upper edge). So the lung field's brightness is not the label; a model has
to find the patches.

``make_demo_data(..., format=...)`` also writes the same patients, pixel for pixel, the way
scanners and PACS exports deliver CT, so ctscan's DICOM and NIfTI readers can be tried on them:

- ``"dicom"``: one CT series per patient, ``<label>/<PatientID>/<SeriesInstanceUID>/001.dcm``,
  one single-frame CT Image Storage file per slice (signed 16-bit, rescale intercept -1024,
  InstanceNumber 1 at the lowest z, slices 5 mm apart). The paths carry patient identifiers on
  purpose, as real exports do: ctscan has to keep them out of what it writes.
- ``"nifti"``: one ``<label>/<group>.nii.gz`` volume per patient, int16 Hounsfield units in
  RAS+ with the axial slices along the third axis.

In both, the lung window ctscan applies by default (``data_utils.volumes.DEFAULT_WINDOW``) turns
the Hounsfield units back into exactly the PNG demo's 8-bit pixels (see ``hu_of_pixels``).
Neither has a manifest: the patient is in the DICOM headers, and a NIfTI file is one patient.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from data_utils.volumes import DEFAULT_WINDOW

CLASSES = ("COVID", "non-COVID")
_PREFIX = {"COVID": "covid", "non-COVID": "noncovid"}
_MIN_SLICES, _MAX_SLICES = 4, 10

FORMATS = ("png", "dicom", "nifti")
# Scan geometry of the DICOM and NIfTI outputs: thick slices, as in many routine chest CTs;
# a pixel spacing that is exact in binary, so positions print short in the DICOM headers.
PIXEL_SPACING_MM = 0.75
SLICE_THICKNESS_MM = 5.0
# Stored value 0 is -1024 HU, as on most CT scanners, so air is near 0 and bone positive.
_RESCALE_INTERCEPT = -1024


@dataclass(frozen=True)
class RenderedSlice:
    image: np.ndarray  # uint8 (H, W)
    lung_mask: np.ndarray  # bool (H, W)
    lesion_mask: np.ndarray  # bool (H, W); all False for negatives


def make_demo_data(
    out_dir: Path, n_per_class: int = 300, size: int = 256, seed: int = 0, format: str = "png"
) -> Path:
    """Write a demo dataset and return out_dir.

    With format "png" (the default): the Kaggle layout, ``out_dir/COVID/*.png``,
    ``out_dir/non-COVID/*.png`` (8-bit grayscale, each side in [0.8 * size, size]) and
    ``out_dir/manifest.csv`` with columns ``path,label,group``. With "dicom" or "nifti": the same
    patients as CT series or volumes under ``out_dir/COVID/`` and ``out_dir/non-COVID/`` (see
    the module docstring), no manifest. The same arguments always give byte-identical files.
    Raises ValueError for an unknown format, and FileExistsError if out_dir exists and is not an
    empty directory; nothing is written in either case.
    """
    out_dir = Path(out_dir)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    _refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    # Built next to out_dir so the final rename stays on one filesystem and is atomic: readers
    # never see a half-written dataset, and a crash leaves only a dot-prefixed temp folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for label in CLASSES:
            (tmp / label).mkdir()
        patients = _iter_patients(n_per_class, size, seed)
        if format == "png":
            _write_pngs(tmp, patients)
        else:
            for label, group, slices in patients:
                if format == "dicom":
                    _write_dicom_series(tmp / label, label, group, slices, seed)
                else:
                    _write_nifti_volume(tmp / label / f"{group}.nii.gz", slices)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a dataset is not a secret
        _refuse_existing(out_dir)  # someone may have filled it while we were rendering
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above; rename cannot replace a directory portably
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hu_of_pixels(pixels: np.ndarray) -> np.ndarray:
    """Hounsfield units (int16) that ctscan's default lung window maps back to exactly `pixels`.

    The window maps ``low = center - width / 2`` to 0 and ``low + width`` to 255 linearly, so
    pixel p becomes ``round(low + p * width / 255)`` HU. Rounding to whole HU moves a pixel by at
    most 0.5 * 255 / width (0.09 at the default width of 1500), so the window's own rounding
    lands on p again. Black pixels come out at -1350 HU, below the -1024 HU of air: real scans
    do not go there, but the demo needs the exact round trip more than that realism.
    """
    center, width = DEFAULT_WINDOW
    low = center - width / 2
    return np.rint(low + pixels.astype(np.float64) * (width / 255)).astype(np.int16)


def _write_pngs(root: Path, patients: Iterator[tuple[str, str, list[RenderedSlice]]]) -> None:
    """The Kaggle layout: ``<label>/<group>-sNN.png`` per slice, and manifest.csv."""
    rows = []
    for label, group, slices in patients:
        for s, sl in enumerate(slices):
            rel = f"{label}/{group}-s{s:02d}.png"
            Image.fromarray(sl.image).save(root / rel, format="PNG")
            rows.append((rel, label, group))
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "group"))
        writer.writerows(rows)


def _write_dicom_series(
    label_dir: Path, label: str, group: str, slices: list[RenderedSlice], seed: int
) -> None:
    """One CT series: ``label_dir/<PatientID>/<SeriesInstanceUID>/<InstanceNumber:03d>.dcm``.

    Axial slices in the usual patient orientation (row 0 anterior, column 0 the patient's
    right), centred on x = y = 0, InstanceNumber 1 at the lowest z.
    """
    rows, cols = slices[0].image.shape  # one size per patient: _render_patient draws it once
    series = _dicom_series_header(label, group, seed, rows, cols)
    folder = label_dir / series.PatientID / series.SeriesInstanceUID
    folder.mkdir(parents=True)
    x0, y0 = -(cols - 1) / 2 * PIXEL_SPACING_MM, -(rows - 1) / 2 * PIXEL_SPACING_MM
    for k, sl in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = _demo_uid(seed, label, group, "instance", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{k + 1:03d}.dcm"
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(series)  # copies the elements; FileDataset(path, series) would share them
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = k + 1
        z = k * SLICE_THICKNESS_MM
        ds.ImagePositionPatient = [x0, y0, z]
        ds.SliceLocation = z
        stored = hu_of_pixels(sl.image) - _RESCALE_INTERCEPT  # -326..1174: fits int16
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)


def _dicom_series_header(label: str, group: str, seed: int, rows: int, cols: int) -> Dataset:
    """The attributes all slices of one patient's series share: patient, study, series, image."""
    prefix, number = group.split("-p")  # "covid-p007" -> "covid", "007"
    ds = Dataset()
    ds.PatientID = f"DEMO-{prefix.upper()}-{number}"
    ds.PatientName = f"Demo^{prefix.capitalize()}{number}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = _demo_uid(seed, label, group, "study")
    ds.StudyDate = "20200401"  # fixed, not today: the same arguments give the same bytes
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT chest (ctscan demo)"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = _demo_uid(seed, label, group, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Axial {SLICE_THICKNESS_MM:g} mm, synthetic {label}"
    ds.FrameOfReferenceUID = _demo_uid(seed, label, group, "frame of reference")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "ctscan demo"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = ""
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed
    ds.RescaleIntercept = _RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = DEFAULT_WINDOW  # viewers open it as ctscan reads it
    return ds


def _demo_uid(seed: int, label: str, group: str, *what: object) -> str:
    """A valid DICOM UID derived from the arguments, so the same call gives the same files."""
    return generate_uid(entropy_srcs=["ctscan demo", str(seed), label, group, *map(str, what)])


def _write_nifti_volume(path: Path, slices: list[RenderedSlice]) -> None:
    """One patient as a RAS+ int16 HU volume, axial slice k at ``data[:, :, k]``.

    ctscan shows slice k of a volume as ``data[::-1, ::-1, k].T`` after
    ``nibabel.as_closest_canonical``: row 0 anterior, column 0 the patient's right, as in
    DICOM. Each slice is stored as the inverse of that. The affine puts every voxel where the
    DICOM output puts the same pixel (centred on x = y = 0, slice k at z = k * thickness).
    """
    vol = np.stack([hu_of_pixels(sl.image)[::-1, ::-1].T for sl in slices], axis=-1)
    n_x, n_y = vol.shape[:2]
    affine = np.diag([PIXEL_SPACING_MM, PIXEL_SPACING_MM, SLICE_THICKNESS_MM, 1.0])
    affine[:2, 3] = -(n_x - 1) / 2 * PIXEL_SPACING_MM, -(n_y - 1) / 2 * PIXEL_SPACING_MM
    img = nib.Nifti1Image(vol, affine)
    # Both transforms, as scanner coordinates: readers differ in which one they trust.
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1, 0)  # the stored values are HU as they are
    # nibabel (>= 4) gzips with mtime 0 and no file name in the header: reproducible bytes.
    nib.save(img, path)


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise FileExistsError(f"refusing to overwrite non-empty directory: {out_dir}")
    elif out_dir.exists():
        raise FileExistsError(f"refusing to overwrite existing file: {out_dir}")


def _iter_patients(
    n_per_class: int, size: int, seed: int
) -> Iterator[tuple[str, str, list[RenderedSlice]]]:
    """Yield (label, group, slices) for every patient of the dataset, in manifest order."""
    for class_idx, label in enumerate(CLASSES):
        # One random stream per class and per patient: the output does not depend on the
        # order of generation, and changing one class leaves the other untouched.
        runs = _plan_runs(np.random.default_rng([seed, class_idx]), n_per_class)
        digits = max(3, len(str(len(runs) - 1)))
        for p, n_slices in enumerate(runs):
            rng = np.random.default_rng([seed, class_idx, p + 1])
            group = f"{_PREFIX[label]}-p{p:0{digits}d}"
            yield label, group, _render_patient(rng, label == "COVID", n_slices, size)


def _plan_runs(rng: np.random.Generator, n_total: int) -> list[int]:
    """Split n_total slices into per-patient runs of _MIN_SLICES.._MAX_SLICES slices."""
    runs = []
    left = n_total
    while left > 0:
        n = int(rng.integers(_MIN_SLICES, _MAX_SLICES + 1))
        if left - n < _MIN_SLICES:
            # Never leave a tiny last patient: take everything, or leave exactly the minimum.
            n = left if left <= _MAX_SLICES else left - _MIN_SLICES
        runs.append(n)
        left -= n
    return runs


def _render_patient(
    rng: np.random.Generator, positive: bool, n_slices: int, size: int
) -> list[RenderedSlice]:
    """Render n_slices consecutive axial slices of one synthetic patient.

    Every random draw is made the same way for both classes, lesion parameters included:
    positives paint the lesions, negatives spread the same intensity evenly over the lungs, so
    global mean and contrast carry no label signal. That shift is small next to the natural
    spread of lung density, so it does not give negatives away either.
    """
    # Image size comes from the same distribution in both classes so it cannot leak the label.
    h = int(rng.integers(int(0.8 * size), size + 1))
    w = int(rng.integers(int(0.8 * size), size + 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px = min(h, w) / 256.0  # sizes below are in pixels at 256 px and scale from there

    chest, body = _render_chest(rng, xx, yy, px)
    lungs = [_sample_lung(rng, body, side, xx, yy, px) for side in (-1, 1)]
    heart_r0 = _radius(
        xx, yy, body[0] + 0.1 * body[2], body[1] - 0.4 * body[3], 0.26 * body[2], 0.36 * body[3]
    )
    lesions = _sample_lesions(rng, n_slices)
    z0, dz = rng.uniform(0.15, 0.75), rng.uniform(0.015, 0.03)  # position along the thorax
    # Lung density varies a lot between patients and within the lungs, in both classes: overall
    # level, a dependent (posterior) gradient, smooth patchiness, and in some patients a band of
    # dependent atelectasis: denser lung along the back with a flat, gravity-made upper edge.
    lung_level = rng.uniform(12, 45)
    dependent = rng.uniform(0, 8)
    patchy = rng.uniform(1, 3)
    atelectasis = rng.uniform(8, 20) * (rng.uniform() < 0.25)
    atelectasis_top = rng.uniform(0.45, 0.8)
    lung_cy = (lungs[0]["cy"] + lungs[1]["cy"]) / 2
    lung_ay = (lungs[0]["ay"] + lungs[1]["ay"]) / 2
    gain = rng.uniform(0.9, 1.1)  # scanner calibration differs between patients
    noise_sd = rng.uniform(5, 14)
    fields = [_smooth_field(rng, (h, w), 10) for _ in range(2)]

    slices = []
    for i in range(n_slices):
        z = z0 + i * dz
        # The heart grows towards the base of the chest and pushes the left lung aside.
        heart = _soft_inside(1 - heart_r0 / (0.3 + 0.6 * z), 0.05)
        grow = 0.82 + 0.18 * np.sin(np.pi * z)  # lungs are widest mid-chest
        lung_soft = np.zeros((h, w), np.float32)
        vessels = np.zeros((h, w), np.float32)
        for lung in lungs:
            edge = 1 + lung["wobble"] + np.sin(6 * z) * lung["wobble_z"]
            lung_soft = np.maximum(lung_soft, _soft_inside(edge - lung["r0"] / grow, 0.02))
            vessels += _render_vessels(lung, grow, z - z0, (h, w), px)
        lung_soft *= 1 - heart
        lung_mask = lung_soft > 0.5

        # Haze texture shifts slowly between slices: rotate between two fixed noise fields.
        angle = 0.8 * i * dz / 0.03
        mottle = np.cos(angle) * fields[0] + np.sin(angle) * fields[1]
        lesion_add, lesion_mask = _render_lesions(lesions, lungs, i, grow, mottle, xx, yy)
        lesion_add *= lung_soft
        lesion_mask &= lung_mask

        back = (yy - lung_cy) / (lung_ay * grow)  # -1 at the front of the lungs, +1 at the back
        density = dependent * np.clip(back, 0, 1) ** 2 + patchy * mottle
        density += atelectasis * _soft_inside(back - atelectasis_top, 0.05) * (1 + 0.2 * mottle)
        lung_value = lung_level + vessels + density
        if positive:
            lung_value = lung_value + lesion_add
        else:
            lung_value = lung_value + lesion_add.sum() / max(lung_soft.sum(), 1.0)
            lesion_mask[:] = False
        img = chest * (1 - lung_soft) + lung_value * lung_soft
        img = gain * img + noise_sd * rng.standard_normal((h, w), dtype=np.float32)
        img = _blur(img, 0.7 * px)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        slices.append(RenderedSlice(image, lung_mask, lesion_mask))
    return slices


def _render_chest(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, px: float
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Everything but the lungs: body with fat layer, vertebra, aorta, ribs and the table.

    Returns the image and the body ellipse (cx, cy, ax, ay). Over a short run of slices these
    structures barely change, so they are drawn once per patient.
    """
    h, w = xx.shape
    cx = w / 2 + rng.normal(0, 0.02) * w
    cy = h / 2 + rng.normal(0, 0.02) * h - 0.03 * h
    ax, ay = rng.uniform(0.38, 0.46) * w, rng.uniform(0.27, 0.34) * h
    tissue = rng.uniform(140, 185)
    fat = tissue - rng.uniform(25, 45)
    fat_frac = rng.uniform(0.04, 0.11)

    r, theta = _radius(xx, yy, cx, cy, ax, ay), np.arctan2((yy - cy) / ay, (xx - cx) / ax)
    outline = 1 + _harmonics(rng, theta, 0.02)
    outline -= 0.08 * np.clip(np.sin(theta), 0, None) ** 4  # flattened back: patient is supine
    body = _soft_inside(outline - r, 0.01)
    muscle = _soft_inside(outline * (1 - fat_frac) - r, 0.01)
    img = body * (fat + (tissue - fat) * muscle)

    # Vertebra: bright cortical ring around a less bright body, spinal canal behind it.
    vr = rng.uniform(0.085, 0.11) * ax
    vx, vy = cx + rng.normal(0, 2) * px, cy + 0.7 * ay
    d = np.hypot(xx - vx, yy - vy)
    img = np.where(d < vr, 185 + 50 * (d > 0.8 * vr), img)
    img = np.where(np.hypot(xx - vx, yy - vy - 1.45 * vr) < 0.45 * vr, tissue - 50, img)
    # Descending aorta, beside the spine on the patient's left (image right).
    img = np.where(np.hypot(xx - vx - 1.2 * vr, yy - vy + 1.3 * vr) < 0.75 * vr, tissue + 15, img)

    # Ribs: bright dots just inside the fat layer, none across the front of the chest.
    n = int(rng.integers(5, 9))
    ang = np.concatenate([rng.uniform(0.15, 1.35, n), np.pi - rng.uniform(0.15, 1.35, n)])
    rr = 1 - fat_frac - rng.uniform(0.03, 0.07)
    ribs = _splat(
        (h, w),
        cy + rr * ay * np.sin(ang),
        cx + rr * ax * np.cos(ang),
        np.full(ang.size, 900.0 * px * px),
    )
    img += _blur(ribs, 1.8 * px)

    # Patient table: a curved bright band below the back, clear of the body.
    table_y = cy + ay * (1 + rng.uniform(0.05, 0.12)) + 0.002 * (xx - cx) ** 2 / px
    table = (np.abs(yy - table_y) < 2.5 * px) & (np.abs(xx - cx) < 0.45 * w) & (body < 0.5)
    img = np.where(table, 150.0, img)
    return img.astype(np.float32), (cx, cy, ax, ay)


def _sample_lung(
    rng: np.random.Generator, body: tuple, side: int, xx: np.ndarray, yy: np.ndarray, px: float
) -> dict:
    """One lung: an irregular ellipse plus its vessel tree, in lung-normalised coordinates.

    Shape terms are precomputed on the pixel grid; per slice the lung only scales and wobbles.
    """
    bcx, bcy, bax, bay = body
    cx = bcx + side * rng.uniform(0.42, 0.5) * bax
    cy = bcy - rng.uniform(0.0, 0.08) * bay
    ax, ay = rng.uniform(0.30, 0.37) * bax, rng.uniform(0.58, 0.7) * bay
    theta = np.arctan2((yy - cy) / ay, (xx - cx) / ax)
    medial = np.clip(-side * np.cos(theta), 0, None) ** 3  # flattened against the mediastinum
    # Vessels branch out from the hilum (medial side) towards the periphery and thin out.
    n_branch = int(rng.integers(6, 12))
    n_dots = int(rng.integers(15, 45))  # vessels crossing the slice plane
    return {
        "cx": cx,
        "cy": cy,
        "ax": ax,
        "ay": ay,
        "r0": _radius(xx, yy, cx, cy, ax, ay),
        "wobble": _harmonics(rng, theta, 0.05) - 0.18 * medial,
        "wobble_z": _harmonics(rng, theta, 0.02),
        "hilum": (-side * rng.uniform(0.35, 0.5), rng.uniform(-0.1, 0.15)),
        "branch_angle": rng.uniform(0, 2 * np.pi, n_branch),
        "branch_len": rng.uniform(0.4, 1.1, n_branch),
        "branch_bend": rng.normal(0, 0.6, n_branch),
        "branch_spin": rng.normal(0, 3, n_branch),
        "branch_weight": rng.uniform(250, 500, n_branch) * px * px,
        "dots": rng.uniform(-0.9, 0.9, (2, n_dots)),
        "dot_drift": rng.normal(0, 1.5, (2, n_dots)),
        "dot_weight": rng.uniform(250, 700, n_dots) * px * px,
    }


def _render_vessels(lung: dict, grow: float, dz: float, shape: tuple, px: float) -> np.ndarray:
    """Bright vessel lines and dots of one lung at a slice dz below the patient's first slice."""
    t = np.linspace(0.05, 1, 14)[:, None]  # position along each branch, hilum to tip
    ang = lung["branch_angle"] + lung["branch_spin"] * dz + lung["branch_bend"] * t
    u = lung["hilum"][0] + t * lung["branch_len"] * np.cos(ang)
    v = lung["hilum"][1] + t * lung["branch_len"] * np.sin(ang)
    wt = lung["branch_weight"] * (1.2 - t) ** 2 / 3  # thick near the hilum, faint at the tips
    du, dv = lung["dots"] + lung["dot_drift"] * dz
    u = np.concatenate([u.ravel(), du])
    v = np.concatenate([v.ravel(), dv])
    wt = np.concatenate([wt.ravel(), lung["dot_weight"]])
    ax, ay = lung["ax"] * grow, lung["ay"] * grow
    return _blur(_splat(shape, lung["cy"] + v * ay, lung["cx"] + u * ax, wt), 1.1 * px)


def _sample_lesions(rng: np.random.Generator, n_slices: int) -> list[dict]:
    """Lesions as ellipsoids in (lung-normalised x, y, slice index), so they persist over slices.

    Severity varies by patient: mild cases have one to three fainter patches, severe ones up to
    six, denser ones.
    """
    severity = np.sqrt(rng.uniform(0.1, 1))  # most cases are clear, some mild
    lesions = []
    for j in range(int(rng.integers(1, int(3 + 4 * severity)))):
        ggo = rng.uniform() < 0.7  # ground glass is the commoner finding
        # COVID findings favour the periphery and the back of the lungs; the angle is measured
        # from the lateral direction, which also keeps lesions clear of the heart.
        lung = int(rng.integers(0, 2))
        rad, ang = rng.uniform(0.35, 0.75), rng.uniform(-0.3 * np.pi, 0.6 * np.pi)
        lesions.append(
            {
                "lung": lung,
                "u": (2 * lung - 1) * rad * np.cos(ang),
                "v": rad * np.sin(ang),
                "r": rng.uniform(0.25 if j == 0 else 0.12, 0.45),
                "aspect": rng.uniform(0.7, 1.4),
                # The first lesion spans the whole run, so every positive slice shows a finding.
                "zc": (n_slices - 1) / 2 if j == 0 else rng.uniform(-2, n_slices + 1),
                "zr": n_slices + 2 if j == 0 else rng.uniform(2, 8),
                "soft": rng.uniform(0.12, 0.3) if ggo else rng.uniform(0.04, 0.08),
                "amp": rng.uniform(0.75, 1) * (40 + 40 * severity if ggo else 80 + 40 * severity),
                "mottle": rng.uniform(0.2, 0.5) if ggo else 0.15,
            }
        )
    return lesions


def _render_lesions(
    lesions: list[dict],
    lungs: list[dict],
    i: int,
    grow: float,
    mottle: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Added intensity and half-maximum mask of the lesions cut by slice i, not yet lung-clipped."""
    add = np.zeros(xx.shape, np.float32)
    mask = np.zeros(xx.shape, bool)
    for les in lesions:
        through = 1 - ((i - les["zc"]) / les["zr"]) ** 2
        if through <= 0:
            continue
        lung = lungs[les["lung"]]
        ax, ay = lung["ax"] * grow, lung["ay"] * grow
        r = les["r"] * np.sqrt(through)  # an ellipsoid's cross-section shrinks towards its ends
        d = _radius(
            xx,
            yy,
            lung["cx"] + les["u"] * ax,
            lung["cy"] + les["v"] * ay,
            r * ax * les["aspect"],
            r * ay,
        )
        # The noise field roughens the outline too, so patches are not clean ovals.
        blob = _soft_inside(1 - d * (1 + 0.15 * mottle), les["soft"])
        texture = np.clip(1 + les["mottle"] * mottle, 0.5, 2.0)
        # max, not sum: overlapping patches merge instead of stacking into bright spots.
        add = np.maximum(add, les["amp"] * blob * texture)
        mask |= blob > 0.5
    return add, mask


def _radius(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float):
    """Elliptical radius of every pixel: 1 on the ellipse, 0 at its centre."""
    return np.hypot((xx - cx) / ax, (yy - cy) / ay)


def _harmonics(rng: np.random.Generator, theta: np.ndarray, amount: float) -> np.ndarray:
    """Random smooth radial irregularity (angular orders 2-4) so outlines are not ellipses."""
    amps, phases = rng.uniform(0, amount, 3), rng.uniform(0, 2 * np.pi, 3)
    return sum(amps[k] * np.cos((k + 2) * theta + phases[k]) for k in range(3))


def _soft_inside(signed: np.ndarray, width: float) -> np.ndarray:
    """~1 where signed > 0, ~0 where < 0, with a logistic edge (anti-aliasing, soft haze)."""
    return (0.5 + 0.5 * np.tanh(signed / (2 * width))).astype(np.float32)


def _splat(shape: tuple, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Deposit point weights on a grid; blurring the result draws many blobs at one blur's cost."""
    h, w = shape
    iy, ix = np.rint(ys).astype(int), np.rint(xs).astype(int)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    flat = np.bincount(iy[ok] * w + ix[ok], weights=weights[ok], minlength=h * w)
    return flat.reshape(h, w).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape
    p = np.pad(img, radius, mode="edge")
    rows = sum(k[i] * p[:, i : i + w] for i in range(k.size))
    return sum(k[i] * rows[i : i + h, :] for i in range(k.size))


def _smooth_field(rng: np.random.Generator, shape: tuple, cells: int) -> np.ndarray:
    """Zero-mean, unit-sd low-frequency noise: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.BICUBIC))
    return (up - up.mean()) / (up.std() + 1e-6)
