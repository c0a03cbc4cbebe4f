"""Demo patients as DICOM series, end to end: tune -> evaluate (slice and patient level) ->
predict and explain per series; and no patient ID or UID in clear in anything ctscan wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctscan.cli import main
from data_utils.demo import make_demo_data


def _identifiers(root: Path) -> set[str]:
    """Every patient ID, name and UID the DICOM headers under root hold."""
    found = set()
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.PatientID), str(ds.PatientName), ds.StudyInstanceUID,
                  ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    return found


def _files_holding(folder: Path, identifiers: set[str]) -> dict[str, list[str]]:
    """{file: identifiers it holds}, over every file below folder, read as bytes (event files,
    checkpoints and the ONNX model too).

    An identifier can only lie inside a run of the bytes that identifiers are made of, at least
    as long as the shortest identifier. So each file is scanned once for such runs, and only they
    are searched for each identifier: the answer of searching the whole file for each, in a
    second or two instead of half a minute over the checkpoints.
    """
    encoded = {i.encode(): i for i in identifiers}
    alphabet = sorted(set(b"".join(encoded)))
    runs = re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in alphabet) + b"]{%d,}"
                      % min(map(len, encoded)))
    hits = {}
    for path in folder.rglob("*"):
        if path.is_file():
            held = {encoded[e] for run in runs.findall(path.read_bytes())
                    for e in encoded if e in run}
            if held:
                hits[str(path.relative_to(folder))] = sorted(held)
    return hits


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, local_ray) -> tuple[Path, Path, Path]:
    """(data, run folder, cache) of one small search on demo DICOM patients."""
    tmp = tmp_path_factory.mktemp("dicom")
    data = make_demo_data(tmp / "data", n_per_class=90, size=64, format="dicom")
    cache = tmp / "cache"
    assert main(["tune", str(data), "--storage-path", str(tmp / "runs"), "--name", "d",
                 "--image-size", "32", "--num-samples", "2", "--max-epochs", "1",
                 "--bootstrap", "200", "--ensemble", "2", "--cache-dir", str(cache)]) == 0
    return data, tmp / "runs" / "d", cache


def test_a_dicom_search_splits_by_patient_and_scores_patients(dicom_run):
    data, run, _ = dicom_run
    split = json.loads((run / "split.json").read_text())
    assert split["group_by"] == "patient" and split["window"] == [-600.0, 1500.0]
    # No patient on two sides: the demo's folders are its patients.
    sides: dict[str, set[str]] = {}
    patient_of = {f"{p.parent.parent.name}": p for p in data.glob("*/*/*/*.dcm")}
    assert patient_of
    for entry in split["files"]:
        sides.setdefault(entry["group"], set()).add(entry["split"])
    assert all(len(s) == 1 for s in sides.values())
    patients = sum(1 for _ in data.glob("*/*"))
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


def test_no_identifier_in_clear_in_the_run_folder_or_the_cache(dicom_run):
    data, run, cache = dicom_run
    identifiers = _identifiers(data)
    assert len(identifiers) > 100  # every slice's SOPInstanceUID, at least
    assert _files_holding(run, identifiers) == {}
    assert _files_holding(cache, identifiers) == {}


def test_predict_and_explain_answer_per_series(dicom_run, tmp_path, capsys):
    data, run, _ = dicom_run
    series = sorted(data.glob("COVID/*/*"))[:2]
    capsys.readouterr()
    assert main(["predict", str(run / "export"), *map(str, series)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, folder in zip(lines, series, strict=True):
        path, prob, label, slices = line.split("\t")
        assert 0 <= float(prob) <= 1 and label in ("COVID", "non-COVID")
        assert slices == f"{len(list(folder.glob('*.dcm')))} slices"
        # Named by its folder, with the PatientID and SeriesInstanceUID folders scrubbed.
        assert folder.name not in path and folder.parent.name not in path
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
    assert _files_holding(tmp_path, {uid, other_uid, name}) == {"deep/weights.pt": [uid],
                                                                "events": [name]}
