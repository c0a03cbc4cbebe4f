from functools import partial
from pathlib import Path

import numpy as np
import pytest
from helpers import make_class_folders, smooth_image
from PIL import Image

from data_utils import sources
from data_utils.sources import DataError

discover = partial(sources.discover, key=b"test key")


def test_kaggle_layout_detects_covid_as_positive(tmp_path):
    src = discover(make_class_folders(tmp_path, 3))
    assert src.class_names == ("non-COVID", "COVID")
    assert len(src.samples) == 6
    assert {src.label(s) for s in src.samples if s.class_name == "COVID"} == {1}


@pytest.mark.parametrize("names, positive", [
    (("positive", "negative"), "positive"),
    (("Covid19", "normal"), "Covid19"),
    (("COVID", "non-COVID"), "COVID"),
    (("covid", "noncovid"), "covid"),
    (("CT_COVID", "CT_NonCOVID"), "CT_COVID"),
    (("covid_positive", "covid_negative"), "covid_positive"),
    (("COVID-19", "not_covid"), "COVID-19"),
    (("covid", "no-covid"), "covid"),
    (("covid_neg", "covid_pos"), "covid_pos"),
])
def test_positive_class_detected_case_insensitively(tmp_path, names, positive):
    assert discover(make_class_folders(tmp_path, 2, classes=names)).positive_class == positive


@pytest.mark.parametrize("names", [
    ("covid_negative", "normal"),  # it names covid, but negates it: never guessed positive
    ("COVIDnegative", "healthy"),
    ("non-COVID", "normal"),
    ("covid_a", "covid_b"),
])
def test_a_name_that_also_negates_is_never_guessed_positive(tmp_path, names):
    with pytest.raises(DataError, match="pass --positive-class NAME"):
        discover(make_class_folders(tmp_path, 2, classes=names))


def test_positive_class_override_and_unknown_name(tmp_path):
    root = make_class_folders(tmp_path, 2, classes=("cats", "dogs"))
    with pytest.raises(DataError, match="--positive-class"):
        discover(root)
    assert discover(root, "DOGS").class_names == ("cats", "dogs")
    with pytest.raises(DataError, match="'birds' is not one of"):
        discover(root, "birds")


def test_missing_folder_no_classes_single_class_empty_class(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file"):
        discover(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        discover(tmp_path / "empty")
    one = make_class_folders(tmp_path / "one", 2, classes=("COVID",))
    with pytest.raises(DataError, match="only class 'COVID'"):
        discover(one)
    two = make_class_folders(tmp_path / "two", 2)
    (two / "extra").mkdir()
    with pytest.raises(DataError, match="extra: class folder holds no image files"):
        discover(two)


def _write_manifest(root: Path, rows: list[str]) -> Path:
    (root / "manifest.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_manifest_with_groups(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(smooth_image(np.random.default_rng(i))).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'covid' if i % 2 else 'normal'},patient{i // 2}")
    src = discover(_write_manifest(tmp_path, rows))
    assert src.class_names == ("normal", "covid")
    # Kept as pseudonyms: the same patient alike, no ID in clear.
    groups = [s.group for s in src.samples]
    assert groups[0] == groups[1] != groups[2] == groups[3]
    assert not {"patient0", "patient1"} & set(groups)
    assert src.samples[0].rel == "img/0.png"


def test_manifest_path_escaping_its_folder_is_refused(tmp_path):
    inner = tmp_path / "data"
    inner.mkdir()
    manifest = _write_manifest(inner, ["../secret.png,covid,a", "x.png,normal,b"])
    with pytest.raises(DataError, match=r"manifest.csv:2: path '../secret.png' escapes"):
        discover(manifest)
    manifest = _write_manifest(inner, ["/etc/passwd,covid,a", "x.png,normal,b"])
    with pytest.raises(DataError, match="escapes"):
        discover(manifest)


def test_manifest_bad_header(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.png,covid\n")
    with pytest.raises(DataError, match="header must be path,label"):
        discover(tmp_path / "m.csv")


def test_manifest_listing_a_file_twice_is_refused(tmp_path):
    """Even spelled differently, and whatever the labels say: which row would be right?"""
    rows = ["img/0.png,covid,a", "img/1.png,normal,b", "img/2.png,covid,c",
            "./img/../img/1.png,covid,d"]
    with pytest.raises(DataError, match=r"manifest.csv:3 and :5 both list img/1.png$"):
        discover(_write_manifest(tmp_path, rows))


def test_manifest_symlinks_are_followed_and_refused_when_they_lead_out(tmp_path):
    """Folders are resolved once per manifest, files only when they are links: either way a path
    is judged by where it really lies."""
    inner, outside = tmp_path / "data", tmp_path / "elsewhere"
    (inner / "img").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"")
    (inner / "img" / "real.png").write_bytes(b"")
    (inner / "img" / "link.png").symlink_to(outside / "secret.png")
    (inner / "linked").symlink_to(outside)
    (inner / "img" / "alias.png").symlink_to(inner / "img" / "real.png")
    for listed in ("img/link.png", "linked/secret.png"):
        manifest = _write_manifest(inner, [f"{listed},covid,a", "img/real.png,normal,b"])
        with pytest.raises(DataError, match=f"manifest.csv:2: path '{listed}' escapes"):
            discover(manifest)
    manifest = _write_manifest(inner, ["img/alias.png,covid,a", "img/../img/x.png,normal,b"])
    assert [s.rel for s in discover(manifest).samples] == ["img/real.png", "img/x.png"]
