"""Demo patients as DICOM series, end to end: tune -> evaluate (slice and patient level) ->
predict and explain per series; and no identifier, however spelled, nor the pseudonym key, in
anything ctscan wrote or printed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctscan.cli import main
from data_utils.demo import make_demo_data
from data_utils.identity import KEY_FILE_ENV


def _spellings(value: str) -> set[str]:
    """An identifier as a folder name may spell it: as is, in another case, `^` as `_` or a
    space, without its separators."""
    forms = {value, value.replace("^", "_"), value.replace("^", " "), value.replace("^", ""),
             value.replace("-", "")}
    return {f for form in forms for f in (form, form.lower(), form.upper())}


def _identifiers(root: Path) -> set[str]:
    """Every patient ID, name, accession number, study date and UID the DICOM headers under
    root hold, in every spelling of _spellings."""
    found = set()
    for path in root.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        for value in (str(ds.PatientID), str(ds.PatientName), ds.AccessionNumber, ds.StudyDate,
                      ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                      ds.FrameOfReferenceUID):
            found |= _spellings(value)
    return found


def _name_folders_as_a_pacs_export_does(data: Path) -> None:
    """Give each demo patient an accession number and study date of its own, and name the
    folders and files by them, the patient's name and ID, in the spellings people use; add a
    file whose header cannot be read, in a folder named by a patient."""
    for n, patient_dir in enumerate(sorted(data.glob("*/*"))):
        series_dir = next(patient_dir.iterdir())
        accession, date = f"ACC{n:05d}", f"2020{1 + n % 12:02d}{1 + n % 28:02d}"
        for k, path in enumerate(sorted(series_dir.glob("*.dcm"))):
            ds = pydicom.dcmread(path)
            ds.PatientName = f"Silva^Maria{n:03d}"
            ds.AccessionNumber, ds.StudyDate = accession, date
            ds.save_as(path)
            path.rename(series_dir / f"{ds.PatientID}_{k:03d}.dcm")
        series_dir.rename(patient_dir / f"{date}_{accession}")
        named = [f"silva_maria{n:03d}", f"SILVA MARIA{n:03d}", ds.PatientID.lower(),
                 f"Silva^Maria{n:03d} {ds.PatientID}"][n % 4]
        patient_dir.rename(patient_dir.parent / named)
        if n == 0:
            (patient_dir.parent / named / "notes.dcm").write_bytes(b"not a DICOM file" * 9)


def _printed(*argv: str) -> tuple[int, str]:
    """main(argv)'s exit code and everything it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def _files_holding(folder: Path, identifiers: set[str]) -> dict[str, list[str]]:
    """{file: identifiers it holds}, over every file below folder, read as bytes (event files,
    checkpoints and the ONNX model too; a zip's members decompressed).

    An identifier can only lie inside a run of the bytes that identifiers are made of, at least
    as long as the shortest identifier. So each file is scanned once for such runs, and within a
    run only the identifiers that begin with the bytes at each place are tried: the answer of
    searching the whole file for each of a thousand spellings, in seconds.
    """
    encoded = {i.encode(): i for i in identifiers}
    shortest = min(map(len, encoded))
    starting: dict[bytes, list[bytes]] = {}
    for e in encoded:
        starting.setdefault(e[:shortest], []).append(e)
    alphabet = sorted(set(b"".join(encoded)))
    runs = re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in alphabet) + b"]{%d,}"
                      % shortest)
    hits = {}
    for path in folder.rglob("*"):
        if path.is_file():
            held = {encoded[e] for content in _contents(path) for run in runs.findall(content)
                    for at in range(len(run) - shortest + 1)
                    for e in starting.get(run[at:at + shortest], ()) if run.startswith(e, at)}
            if held:
                hits[str(path.relative_to(folder))] = sorted(held)
    return hits


def _contents(path: Path) -> list[bytes]:
    """A file's bytes, and for a zip (a torch checkpoint, a TorchScript export) each member's
    bytes as well, decompressed: a member stored deflated hides its text from a byte scan."""
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return [data]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [data, *(archive.read(name) for name in archive.namelist())]


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, local_ray) -> tuple[Path, Path, Path, str]:
    """(data, run folder, cache, what tune printed) of one small search on demo DICOM
    patients whose folders and files a PACS export named."""
    tmp = tmp_path_factory.mktemp("dicom")
    data = make_demo_data(tmp / "data", n_per_class=90, size=64, format="dicom")
    _name_folders_as_a_pacs_export_does(data)
    cache = tmp / "cache"
    code, printed = _printed("tune", str(data), "--storage-path", str(tmp / "runs"), "--name",
                             "d", "--image-size", "32", "--num-samples", "2", "--max-epochs",
                             "1", "--bootstrap", "200", "--ensemble", "2", "--cache-dir",
                             str(cache))
    assert code == 0, printed
    return data, tmp / "runs" / "d", cache, printed


def test_a_dicom_search_splits_by_patient_and_scores_patients(dicom_run):
    data, run, _, _ = dicom_run
    split = json.loads((run / "split.json").read_text())
    assert split["group_by"] == "patient" and split["window"] == [-600.0, 1500.0]
    patients = sum(1 for p in data.glob("*/*") if p.is_dir())
    assert split["unit"] == "patients" and split["group_kinds"] == {"patients": patients}
    # No patient on two sides: the demo's folders are its patients.
    sides: dict[str, set[str]] = {}
    for entry in split["files"]:
        sides.setdefault(entry["group"], set()).add(entry["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert len(sides) == patients

    metrics = json.loads((run / "results" / "metrics.json").read_text())
    patient = metrics["patient"]
    assert patient["aggregate"] in ("mean", "top25", "max")
    test_patients = {e["group"] for e in split["files"] if e["split"] == "test"}
    assert patient["test"]["n"] == len(test_patients)
    assert set(patient["test"]["metrics"]) >= {"accuracy", "recall", "specificity",
                                               "roc_auc"}
    report = (run / "results" / "report.md").read_text()
    assert "Patient-level" in report
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["patient"]["aggregate"] == patient["aggregate"]


def test_no_identifier_nor_the_key_in_anything_written_or_printed(dicom_run, tmp_path):
    data, run, cache, printed = dicom_run
    # Every ID in the headers in every spelling, every folder and file name below the class
    # folders, and the pseudonym key's hex.
    identifiers = (_identifiers(data) | {p.name for p in data.glob("*/**/*")}
                   | {Path(os.environ[KEY_FILE_ENV]).read_text().strip()})
    assert len(identifiers) > 180 and "silva_maria000" in identifiers
    outputs = [printed]
    for argv in (["inspect", str(data), "--cache-dir", str(cache)],
                 ["export", str(run), "--out", str(tmp_path / "export")],
                 ["predict", str(run / "export"), str(data), "--per-slice", "--csv",
                  str(tmp_path / "predictions.csv")],
                 # The unreadable file's folder, and another patient's.
                 ["explain", str(run / "export"), str(next(data.glob("*/*/notes.dcm")).parent),
                  str(next(data.glob("non-COVID/*"))), "--out", str(tmp_path / "cams")]):
        code, text = _printed(*argv)
        assert code in (0, 1), text  # predict and explain: 1 for the unreadable file
        outputs.append(text)
    assert "notes.dcm" not in "".join(outputs) and "file-" in outputs[3]  # skipped by stand-in
    assert _files_holding(run, identifiers) == {}
    assert _files_holding(cache, identifiers) == {}
    assert _files_holding(tmp_path, identifiers) == {}
    assert not [i for i in identifiers if any(i in text for text in outputs)]
    # What predict names by stand-ins the user can map back, on this machine.
    first = next(line for line in outputs[3].splitlines() if "/slice-" in line).split("\t")[0]
    code, located = _printed("locate", str(data), "--name", first)
    found = Path(located.split("\t")[1].strip())
    assert code == 0 and found.is_file() and found.is_relative_to(data)


def test_a_run_without_its_key_is_refused_in_one_line(dicom_run, tmp_path, monkeypatch):
    _, run, cache, _ = dicom_run
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "another-machine.key"))
    before = {p: p.read_bytes() for p in moved.rglob("*") if p.is_file()}
    for argv in (["evaluate", str(moved), "--cache-dir", str(cache)],
                 ["tune", "--resume", str(moved), "--cache-dir", str(cache)]):
        code, text = _printed(*argv)
        (line,) = [t for t in text.splitlines() if t.startswith("ctscan: error")]
        assert code == 2 and "was made with pseudonym key" in line and "--key-file" in line
    assert {p: p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before


def test_predict_and_explain_answer_per_series(dicom_run, tmp_path, capsys):
    data, run, _, _ = dicom_run
    series = sorted(p for p in data.glob("COVID/*/*") if p.is_dir())[:2]
    capsys.readouterr()
    assert main(["predict", str(run / "export"), *map(str, series)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, folder in zip(lines, series, strict=True):
        path, prob, label, slices = line.split("\t")
        assert 0 <= float(prob) <= 1 and label in ("COVID", "non-COVID")
        assert slices == f"{len(list(folder.glob('*.dcm')))} slices"
        # Named by its patient's and series' stand-ins, not by its folders.
        assert folder.name not in path and folder.parent.name not in path
        assert re.fullmatch(r"patient-[0-9a-f]{12}/series-[0-9a-f]{12}", path)
    assert main(["predict", str(run / "export"), str(series[0]), "--per-slice"]) == 0
    per_slice = capsys.readouterr().out.strip().splitlines()
    assert len(per_slice) == 1 + len(list(series[0].glob("*.dcm")))
    assert main(["explain", str(run / "export"), *map(str, series),
                 "--out", str(tmp_path / "cams")]) == 0
    assert len(list((tmp_path / "cams").glob("*.png"))) == 2


def test_the_identifier_scan_finds_identifiers_inside_binary_files(tmp_path):
    """The scan above must be able to fail: a UID inside a longer run of digits and a name inside
    random bytes are both found, in a nested file, and a clean file is not listed."""
    rng = np.random.default_rng(0)
    uid, other_uid, name = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "DOE^J"
    (tmp_path / "deep").mkdir()
    noise = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "deep" / "weights.pt").write_bytes(noise + b"7" + uid.encode() + b".5" + noise)
    (tmp_path / "events").write_bytes(noise + name.encode() + noise)
    (tmp_path / "clean").write_bytes(noise)
    with zipfile.ZipFile(tmp_path / "packed.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.pkl", b"x" * 1000 + other_uid.encode() + b"x" * 1000)
    assert other_uid.encode() not in (tmp_path / "packed.zip").read_bytes()
    assert _files_holding(tmp_path, {uid, other_uid, name}) == {
        "deep/weights.pt": [uid], "events": [name], "packed.zip": [other_uid]}
