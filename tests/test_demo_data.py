"""Tests for the procedural demo dataset (data_utils/demo.py)."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from scipy.ndimage import binary_dilation
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_utils import demo
from data_utils.demo import make_demo_data
from data_utils.volumes import DEFAULT_WINDOW

NAME = re.compile(r"^(?P<group>(covid|noncovid)-p\d{3,})-s(?P<slice>\d{2})\.png$")


def _read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "label", "group"]
        return list(reader)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _logreg_group_cv(features: np.ndarray, labels: np.ndarray, groups: list[str]) -> float:
    # Folds split by patient: neighbouring slices of one patient are near-duplicates, so a
    # slice-level split would let a classifier recognise patients instead of the class.
    clf = make_pipeline(StandardScaler(), LogisticRegression())
    return cross_val_score(clf, features, labels, cv=GroupKFold(5), groups=groups).mean()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    assert make_demo_data(root, n_per_class=25, size=64, seed=1) == root
    return root


@pytest.fixture(scope="module")
def patients() -> list[tuple[str, str, list[demo.RenderedSlice]]]:
    return list(demo._iter_patients(n_per_class=300, size=64, seed=0))


def test_layout_counts_and_modes(small_dataset: Path) -> None:
    assert sorted(p.name for p in small_dataset.iterdir()) == ["COVID", "manifest.csv", "non-COVID"]
    for label in demo.CLASSES:
        files = sorted((small_dataset / label).iterdir())
        assert len(files) == 25
        for f in files:
            assert NAME.match(f.name), f.name
            with Image.open(f) as im:
                assert im.format == "PNG" and im.mode == "L"
                assert all(int(0.8 * 64) <= side <= 64 for side in im.size)


def test_manifest_matches_files_and_groups(small_dataset: Path) -> None:
    rows = _read_manifest(small_dataset)
    on_disk = {p.relative_to(small_dataset).as_posix() for p in small_dataset.rglob("*.png")}
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(on_disk)
    assert set(paths) == on_disk

    slices_per_group: dict[str, list[int]] = {}
    labels_per_group: dict[str, set[str]] = {}
    for r in rows:
        folder, name = r["path"].split("/")
        m = NAME.match(name)
        assert m and folder == r["label"] and m["group"] == r["group"]
        assert r["group"].startswith("covid-" if r["label"] == "COVID" else "noncovid-")
        slices_per_group.setdefault(r["group"], []).append(int(m["slice"]))
        labels_per_group.setdefault(r["group"], set()).add(r["label"])
    assert all(len(labels) == 1 for labels in labels_per_group.values())
    # Each patient is one run of consecutive slices s00, s01, ... of plausible length.
    for idx in slices_per_group.values():
        assert sorted(idx) == list(range(len(idx)))
        assert demo._MIN_SLICES <= len(idx) <= demo._MAX_SLICES
    assert Counter(r["label"] for r in rows) == {"COVID": 25, "non-COVID": 25}


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = _all_bytes(make_demo_data(tmp_path / "a", n_per_class=12, size=48, seed=3))
    b = _all_bytes(make_demo_data(tmp_path / "b", n_per_class=12, size=48, seed=3))
    c = _all_bytes(make_demo_data(tmp_path / "c", n_per_class=12, size=48, seed=4))
    assert a == b
    assert a != c
    shared = set(a) & set(c) - {"manifest.csv"}
    assert not any(a[k] == c[k] for k in shared)


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="mine"):
        make_demo_data(out, n_per_class=4, size=32)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp dir left behind

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        make_demo_data(a_file, n_per_class=4, size=32)


def test_accepts_empty_out_dir_and_creates_parents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    make_demo_data(tmp_path / "empty", n_per_class=4, size=32)
    make_demo_data(tmp_path / "deep" / "er", n_per_class=4, size=32)
    for root in (tmp_path / "empty", tmp_path / "deep" / "er"):
        assert len(_read_manifest(root)) == 8
    assert not [p for p in tmp_path.rglob(".*")]  # temp dirs were renamed away


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> list[demo.RenderedSlice]:
        raise RuntimeError("render failed")

    monkeypatch.setattr(demo, "_render_patient", boom)
    with pytest.raises(RuntimeError):
        make_demo_data(tmp_path / "out", n_per_class=4, size=32)
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_data(tmp_path / "x", n_per_class=0)
    with pytest.raises(ValueError):
        make_demo_data(tmp_path / "x", size=8)
    with pytest.raises(ValueError, match="png, dicom, nifti.*'jpeg'"):
        make_demo_data(tmp_path / "x", n_per_class=4, size=32, format="jpeg")
    assert list(tmp_path.iterdir()) == []


def test_plan_runs_cover_total() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 11, 13, 300):
        runs = demo._plan_runs(rng, n)
        assert sum(runs) == n
        if n >= demo._MIN_SLICES:
            assert all(demo._MIN_SLICES <= r <= demo._MAX_SLICES for r in runs)


def test_lesions_only_inside_lungs_and_on_every_positive_slice(patients) -> None:
    for label, _, slices in patients:
        for sl in slices:
            assert sl.image.dtype == np.uint8 and sl.image.shape == sl.lung_mask.shape
            assert sl.lung_mask.mean() > 0.05  # two lungs are there
            if label == "COVID":
                assert sl.lesion_mask.sum() >= 3
                assert not (sl.lesion_mask & ~sl.lung_mask).any()
            else:
                assert not sl.lesion_mask.any()


def test_lesions_stand_out_from_the_lung_around_them(patients) -> None:
    # Lung density varies within the lung (dependent gradient, atelectasis), so each lesion is
    # compared with a ring of lung just around it: faint or not, it must be brighter than that,
    # or there is nothing to learn.
    contrast = []
    for label, _, slices in patients:
        if label != "COVID":
            continue
        for sl in slices:
            img = sl.image.astype(np.float32)
            ring = binary_dilation(sl.lesion_mask, iterations=3) & sl.lung_mask & ~sl.lesion_mask
            contrast.append(img[sl.lesion_mask].mean() - img[ring].mean())
    assert min(contrast) > 5


def test_neighbouring_slices_look_alike_patients_differ(patients) -> None:
    def diff(a: np.ndarray, b: np.ndarray) -> float:
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        return float(np.abs(a[:h, :w].astype(np.float32) - b[:h, :w]).mean())

    firsts = [slices[0].image for _, _, slices in patients]
    within = [diff(s[i].image, s[i + 1].image) for _, _, s in patients for i in range(len(s) - 1)]
    between = [diff(a, b) for a, b in zip(firsts[:-1], firsts[1:], strict=True)]
    assert np.median(within) < 0.5 * np.median(between)


def test_global_statistics_do_not_reveal_label(patients) -> None:
    feats, lung, sizes, labels, groups, area = [], [], [], [], [], []
    for label, group, slices in patients:
        for sl in slices:
            img = sl.image.astype(np.float32)
            feats.append([img.mean(), img.std()])
            lung.append([img[sl.lung_mask].mean()])
            sizes.append(sl.image.shape)
            labels.append(label == "COVID")
            groups.append(group)
            area.append([sl.lesion_mask.mean()])
    y = np.array(labels)
    assert len(y) == 600 and y.sum() == 300

    assert _logreg_group_cv(np.array(feats), y, groups) < 0.65
    # Healthy lungs are as dense as diseased ones on average: the lung field's brightness alone
    # does not give the label away either.
    assert _logreg_group_cv(np.array(lung), y, groups) < 0.65
    assert _logreg_group_cv(np.array(sizes, dtype=float), y, groups) < 0.65
    assert len(set(sizes)) > 10  # sizes do vary, so loaders must pad/resize
    # Conversely, the label is there: the same classifier given the lesion area is near-perfect.
    assert _logreg_group_cv(np.array(area), y, groups) > 0.9


# --- The same patients as CT arrives: DICOM series and NIfTI volumes -------------------------

# Enough slices for at least two patients per class, so "distinct across patients" means something.
CT_ARGS = {"n_per_class": 12, "size": 64, "seed": 2}


def _window(hu: np.ndarray) -> np.ndarray:
    """ctscan's default lung window, written out: low..low + width HU onto 0..255."""
    center, width = DEFAULT_WINDOW
    low = center - width / 2
    return np.clip(np.rint((hu - low) * 255 / width), 0, 255).astype(np.uint8)


def _patient_id(group: str) -> str:
    prefix, number = group.split("-p")
    return f"DEMO-{prefix.upper()}-{number}"


@pytest.fixture(scope="module")
def png_patients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list]]:
    """label -> group -> slice images, in order, as the PNG demo writes them for CT_ARGS."""
    root = make_demo_data(tmp_path_factory.mktemp("png") / "data", **CT_ARGS)
    patients: dict[str, dict[str, list]] = {label: {} for label in demo.CLASSES}
    for r in _read_manifest(root):  # one patient's slices are consecutive rows, s00 first
        with Image.open(root / r["path"]) as im:
            patients[r["label"]].setdefault(r["group"], []).append(np.asarray(im))
    return patients


def test_hu_of_pixels_round_trips_through_the_default_window() -> None:
    pixels = np.arange(256, dtype=np.uint8)
    hu = demo.hu_of_pixels(pixels)
    assert hu.dtype == np.int16
    assert np.array_equal(_window(hu), pixels)
    assert np.all(np.diff(hu) > 0)
    assert (hu[0], hu[-1]) == (-1350, 150)  # the window's ends


def test_dicom_series_read_back_as_the_png_demo(
    tmp_path: Path, png_patients: dict[str, dict[str, list]]
) -> None:
    root = make_demo_data(tmp_path / "dicom", **CT_ARGS, format="dicom")
    assert sorted(p.name for p in root.iterdir()) == sorted(demo.CLASSES)  # no manifest
    study_uids, sop_uids = set(), set()
    for label, groups in png_patients.items():
        # One folder per patient, named by PatientID; one series folder in it, named by its UID.
        patient_dirs = sorted((root / label).iterdir())
        assert [d.name for d in patient_dirs] == [_patient_id(g) for g in groups]
        for patient_dir, (group, images) in zip(patient_dirs, groups.items(), strict=True):
            (series_dir,) = patient_dir.iterdir()
            files = sorted(series_dir.iterdir())
            assert [f.name for f in files] == [f"{k:03d}.dcm" for k in range(1, len(images) + 1)]
            datasets = [pydicom.dcmread(f) for f in files]  # not forced: a real DICOM file
            first = datasets[0]
            assert first.PatientID == patient_dir.name
            assert first.PatientName == f"Demo^{group.split('-p')[0].capitalize()}{group[-3:]}"
            assert first.SeriesInstanceUID == series_dir.name
            for uid in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
                assert UID(first[uid].value).is_valid
                assert {ds[uid].value for ds in datasets} == {first[uid].value}
            study_uids.add(first.StudyInstanceUID)
            for f, ds in zip(files, datasets, strict=True):
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
                assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
                assert UID(ds.SOPInstanceUID).is_valid
                sop_uids.add(ds.SOPInstanceUID)
                assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
                assert ds.PatientID == first.PatientID
                assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 1)
                assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
                assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
                assert ds.InstanceNumber == int(f.stem)
            # InstanceNumber runs with z, one slice thickness apart.
            z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
            assert np.allclose(np.diff(z), float(first.SliceThickness))
            assert float(first.SliceThickness) > 0
            for ds, image in zip(datasets, images, strict=True):
                hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                assert np.array_equal(_window(hu), image)
    n_patients = sum(len(groups) for groups in png_patients.values())
    assert n_patients >= 4
    assert len(study_uids) == n_patients
    assert len(sop_uids) == sum(len(im) for g in png_patients.values() for im in g.values())


def test_nifti_volumes_read_back_as_the_png_demo(
    tmp_path: Path, png_patients: dict[str, dict[str, list]]
) -> None:
    root = make_demo_data(tmp_path / "nifti", **CT_ARGS, format="nifti")
    assert sorted(p.name for p in root.iterdir()) == sorted(demo.CLASSES)  # no manifest
    for label, groups in png_patients.items():
        files = sorted((root / label).iterdir())
        assert [f.name for f in files] == [f"{g}.nii.gz" for g in groups]
        for f, images in zip(files, groups.values(), strict=True):
            img = nib.load(f)
            assert img.get_data_dtype() == np.int16
            assert (img.dataobj.slope, img.dataobj.inter) == (1.0, 0.0)  # stored values are HU
            # What ctscan's reader does: RAS+, then slice k shown as data[::-1, ::-1, k].T.
            data = np.asarray(nib.as_closest_canonical(img).dataobj)
            assert data.shape[2] == len(images)
            for k, image in enumerate(images):
                assert np.array_equal(_window(data[::-1, ::-1, k].T), image)


def test_dicom_and_nifti_place_pixels_alike(tmp_path: Path) -> None:
    args = {"n_per_class": 4, "size": 48, "seed": 5}
    dicom_root = make_demo_data(tmp_path / "dicom", **args, format="dicom")
    nifti_root = make_demo_data(tmp_path / "nifti", **args, format="nifti")
    series = sorted(next((dicom_root / "COVID").rglob("*.dcm")).parent.iterdir())
    datasets = [pydicom.dcmread(f) for f in series]
    img = nib.as_closest_canonical(nib.load(nifti_root / "COVID" / "covid-p000.nii.gz"))
    n_x, n_y, n_z = img.shape
    assert (datasets[0].Rows, datasets[0].Columns, len(datasets)) == (n_y, n_x, n_z)
    spacing = [float(v) for v in datasets[0].PixelSpacing]  # row spacing, column spacing
    for k in (0, n_z - 1):
        for row, col in [(0, 0), (0, n_x - 1), (n_y - 1, 0), (n_y - 1, n_x - 1)]:
            # DICOM: patient coordinates (LPS) of pixel (row, col); RAS flips x and y.
            x, y, z = [float(v) for v in datasets[k].ImagePositionPatient]
            lps = np.array([x + col * spacing[1], y + row * spacing[0], z])
            ras = lps * [-1, -1, 1]
            # NIfTI: the voxel the reader shows at (row, col) of slice k.
            voxel = [n_x - 1 - col, n_y - 1 - row, k, 1]
            assert np.allclose(img.affine @ voxel, [*ras, 1])


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_ct_formats_are_deterministic(tmp_path: Path, fmt: str) -> None:
    a = _all_bytes(make_demo_data(tmp_path / "a", **CT_ARGS, format=fmt))
    b = _all_bytes(make_demo_data(tmp_path / "b", **CT_ARGS, format=fmt))
    assert a == b  # paths (UIDs among them) and bytes
    c = _all_bytes(make_demo_data(tmp_path / "c", **{**CT_ARGS, "seed": 3}, format=fmt))
    assert set(a.values()).isdisjoint(c.values())
