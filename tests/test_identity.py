"""Who a slice belongs to, said without saying who: the key that stays home, groups linked on
every ID and named for what they are, a run that keeps its recorded split, `--window -600,1500`."""

from __future__ import annotations

import json
import re
import stat
from collections import Counter

import numpy as np
import pytest
from helpers import make_class_folders, smooth_image
from PIL import Image
from test_volumes import level_slice, load, uid, write_ct

from ctscan.cli import main
from data_utils.errors import RunFolderError, UserError
from data_utils.identity import (
    KEY_FILE_ENV,
    check_key,
    file_pseudonym,
    fingerprint,
    load_key,
    pseudonym_of_name,
    stand_in,
)
from data_utils.split import (
    describe_split,
    group_kinds,
    group_unit,
    load_and_split,
    resolve_group_by,
    split_dataset,
    split_record,
)

OPTIONS = {"ratios": [0.5, 0.25, 0.25], "seed": 0, "group_by": "auto"}


# --- the key -------------------------------------------------------------------------------------

def test_the_key_is_made_once_in_the_config_folder_readable_by_its_owner_only(tmp_path,
                                                                               monkeypatch):
    monkeypatch.delenv(KEY_FILE_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = load_key()
    path = tmp_path / "config" / "ctscan" / "identity.key"
    assert len(key) == 32 and path.read_text().strip() == key.hex()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key() == key  # made once


def test_a_key_file_named_by_the_user_must_exist_and_hold_a_key(tmp_path):
    with pytest.raises(UserError, match="--key-file .*missing.key: no such file"):
        load_key(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text("not hex")
    with pytest.raises(UserError, match="bad.key: not a ctscan pseudonym key"):
        load_key(tmp_path / "bad.key")
    assert main(["inspect", str(tmp_path), "--key-file", str(tmp_path / "missing.key")]) == 2


def test_the_fingerprint_tells_keys_apart_and_a_run_refuses_another_key():
    one, two = b"1" * 32, b"2" * 32
    assert fingerprint(one) == fingerprint(one) != fingerprint(two)
    assert one.hex() not in fingerprint(one)
    check_key(fingerprint(one), one, "run")
    check_key(None, one, "run")  # a run whose data carry no ID recorded no key
    with pytest.raises(RunFolderError, match=f"run was made with pseudonym key "
                                             f"{fingerprint(two)}.*--key-file FILE"):
        check_key(fingerprint(two), one, "run")


def test_written_names_read_back_to_the_file_pseudonym(tmp_path):
    key = b"k" * 32
    own = file_pseudonym(tmp_path / "a" / "IM0001", key)
    name = stand_in("COVID", ("patient", "p" * 12), ("series", "s" * 12), ("slice", own))
    assert name == f"COVID/patient-{'p' * 12}/series-{'s' * 12}/slice-{own}"
    assert pseudonym_of_name(name) == pseudonym_of_name(f"{name}#3") == own
    assert pseudonym_of_name(f"volume-{own}#7") == own
    assert pseudonym_of_name("COVID/patient-abc/series-def") is None
    # However the folder is spelled, the same file has the same name.
    (tmp_path / "a").mkdir()
    assert file_pseudonym(tmp_path / "a" / ".." / "a" / "IM0001", key) == own


# --- groups on every ID --------------------------------------------------------------------------

def _series(root, label, patient, series, n=2, level=-1250.0):
    for k in range(n):
        write_ct(root / label / f"{series}-{k}.dcm", level_slice(level + 100 * k),
                 PatientID=patient, StudyInstanceUID=uid("study", series),
                 SeriesInstanceUID=uid("series", series), InstanceNumber=k + 1,
                 ImagePositionPatient=[0, 0, float(k)])


def test_files_of_one_series_that_disagree_on_the_patient_are_one_group(tmp_path):
    root = tmp_path / "data"
    _series(root, "COVID", "PAT-1", "s1", n=4)
    write_ct(root / "COVID" / "s1-x.dcm", level_slice(-300.0), PatientID="PAT-9",
             StudyInstanceUID=uid("study", "s1"), SeriesInstanceUID=uid("series", "s1"),
             InstanceNumber=9, ImagePositionPatient=[0, 0, 9.0])
    for n in range(2, 5):
        _series(root, "COVID", f"PAT-{n}", f"s{n}")
    for n in range(5, 9):
        _series(root, "non-COVID", f"PAT-{n}", f"s{n}", level=-1000.0)
    ds = load(root, tmp_path)
    assert len(set(ds.groups)) == 9 and resolve_group_by(ds, "auto") == "patient"
    split = split_dataset(ds, (0.5, 0.25, 0.25), seed=1)
    series_one = [i for i, s in enumerate(ds.series) if s == ds.series[0]]
    assert len(series_one) == 5 and len({split.groups[i] for i in series_one}) == 1
    assert group_kinds(split, ds) == {"patients": 8}  # PAT-9 joined PAT-1's group
    assert "1 series hold files with different PatientIDs" in describe_split(split, ds)


def test_auto_links_ids_and_near_duplicates_where_ids_are_missing(tmp_path):
    """DICOM patients with IDs, PNGs without: `mixed`. A PNG that repeats a DICOM patient's
    slice joins that patient; the PNGs and the count of slices without an ID are said."""
    root = tmp_path / "data"
    for n in range(3):
        _series(root, "COVID", f"PAT-C{n}", f"c{n}")
        _series(root, "non-COVID", f"PAT-N{n}", f"n{n}", level=-1000.0)
    rng = np.random.default_rng(0)
    for label in ("COVID", "non-COVID"):
        for k in range(3):
            Image.fromarray(smooth_image(rng)).save(root / label / f"png-{k}.png")
    patient_slice = load(root, tmp_path).images[0]
    Image.fromarray(patient_slice).save(root / "COVID" / "copy-of-a-patient-slice.png")
    ds = load(root, tmp_path)
    assert resolve_group_by(ds, "auto") == "mixed"
    split = split_dataset(ds, (0.5, 0.25, 0.25), seed=0)
    copy = ds.paths.index("COVID/copy-of-a-patient-slice.png")
    assert split.groups[copy] == split.groups[0]
    # The copy resembles every patient's (near-flat) slices, yet joins one patient and does
    # not merge the six into one.
    kinds = group_kinds(split, ds)
    assert kinds == {"patients": 6, "near-duplicate groups": 6} and group_unit(kinds) == "groups"
    text = describe_split(split, ds)
    assert "12 groups (6 patients, 6 near-duplicate groups)" in text
    assert "7 of 19 slices carry no patient, study or series ID" in text


def test_nifti_volumes_are_called_volumes_with_what_that_does_not_guarantee(tmp_path):
    import nibabel as nib

    root = tmp_path / "data"
    for label in ("COVID", "non-COVID"):
        (root / label).mkdir(parents=True)
        for n in range(3):
            volume = np.full((16, 16, 4), -1000 + 100 * n + 300 * (label == "COVID"), np.int16)
            volume[0, 0, :] = 200
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / label / f"scan{n}.nii.gz")
    ds = load(root, tmp_path)
    split = split_dataset(ds, (0.34, 0.33, 0.33), seed=0)
    text = describe_split(split, ds)
    assert text.splitlines()[0].startswith("24 images (0 skipped), 6 volumes (--group-by patient)")
    assert "two files of one patient are two groups" in text
    assert split_record(split, ds)["unit"] == "volumes"


# --- a run keeps the split it recorded ----------------------------------------------------------

def test_a_recorded_split_is_followed_whatever_rule_made_it(tmp_path):
    data = make_class_folders(tmp_path / "data", 12)
    ds, split = load_and_split(data, 32, "pad", OPTIONS, tmp_path / "cache")
    record = split_record(split, ds)
    # As another rule (ctscan 0.3's, say) might have dealt them: every file's side rotated.
    sides = ("train", "val", "test")
    old = {**record, "files": [{**f, "split": sides[(sides.index(f["split"]) + 1) % 3]}
                               for f in record["files"]]}
    _, followed = load_and_split(data, 32, "pad", OPTIONS, tmp_path / "cache", recorded=old)
    assert split_record(followed, ds)["files"] == old["files"]


def test_evaluation_finds_each_recorded_slice_by_content_byte_identical_copies_each(tmp_path):
    from results.evaluate import recorded_groups, recorded_rows

    data = make_class_folders(tmp_path / "data", 12)
    copy = data / "COVID" / "a copy.png"
    copy.write_bytes((data / "COVID" / "COVID (0).png").read_bytes())
    ds, split = load_and_split(data, 32, "pad", OPTIONS, tmp_path / "cache")
    record = split_record(split, ds)
    for name in ("train", "val", "test"):
        rows = recorded_rows(ds, record, name)
        assert sorted(rows.tolist()) == split.indices(name).tolist()
        assert len(recorded_groups(record, name)) == len(rows)
    # Moved elsewhere, the same slices are found; a changed one is named.
    moved = tmp_path / "moved"
    (data).rename(moved)
    ds_moved, _ = load_and_split(moved, 32, "pad", OPTIONS, tmp_path / "cache")
    assert recorded_rows(ds_moved, record, "test").tolist() == recorded_rows(ds, record,
                                                                           "test").tolist()
    copies = Counter(e["sha256"] for e in record["files"])
    victim = next(e for e in record["files"] if e["split"] == "test" and copies[e["sha256"]] == 1)
    (moved / victim["path"]).write_bytes(smooth_image(np.random.default_rng(9)).tobytes()[:99])
    ds_changed, _ = load_and_split(moved, 32, "pad", OPTIONS, tmp_path / "cache")
    with pytest.raises(UserError, match=f"test slice {re.escape(victim['path'])} of split.json "
                       "is missing"):
        recorded_rows(ds_changed, record, "test")


def test_a_split_made_under_another_key_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for n in range(3):
        _series(root, "COVID", f"PAT-C{n}", f"c{n}")
        _series(root, "non-COVID", f"PAT-N{n}", f"n{n}", level=-1000.0)
    assert main(["split", str(root), "--out", str(tmp_path / "run"), "--image-size", "32",
                 "--ratios", "0.34", "0.33", "0.33"]) == 0
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["key_fingerprint"] == fingerprint(load_key())
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "other.key"))
    with pytest.raises(RunFolderError, match="was made with pseudonym key"):
        load_and_split(root, 32, "pad", OPTIONS, tmp_path / "cache", recorded=record)


# --- --window as documented ---------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--window", "-600,1500"], ["--window=-600,1500"],
                                  ["--window", "40,400"]])
def test_the_documented_window_forms_parse(tmp_path, argv, capsys):
    root = tmp_path / "data"
    for n in range(2):
        _series(root, "COVID", f"PAT-C{n}", f"c{n}")
        _series(root, "non-COVID", f"PAT-N{n}", f"n{n}", level=-1000.0)
    assert main(["inspect", str(root), "--image-size", "32", *argv]) == 0
    assert "error" not in capsys.readouterr().err
