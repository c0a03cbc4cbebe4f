"""Tests for the procedural demo dataset (data_utils/demo.py)."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_utils import demo
from data_utils.demo import make_demo_data

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
