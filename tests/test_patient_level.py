"""Patient-level results: slices aggregated per patient, the aggregate and threshold chosen on
val patients, test patients bootstrapped as single observations, and where they are reported."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import smooth_image
from PIL import Image
from test_plots_report import LEADERBOARD, METRICS, PLOTS

import results.evaluate as evaluate_module
from data_utils.cache import load_dataset
from data_utils.files import write_json
from data_utils.sources import DataError
from data_utils.split import split_dataset
from results.aggregate import aggregate_by_group
from results.evaluate import (
    choose_patient_level,
    evaluate_run,
    per_patient,
    score_patients,
    val_then_test,
    write_patient_predictions,
)
from results.export import export_config
from results.metrics import METRICS as METRIC_KEYS
from results.model_card import model_card
from results.report import write_report
from tuning.config import make_config
from tuning.records import SearchOptions, prepare_run


def test_aggregates_of_known_numbers():
    # Group 7: eight slices (top quarter = 2), group 3: one slice, group 9: five slices (a
    # quarter rounds down to 1), interleaved and unsorted.
    groups = np.array([7, 9, 7, 3, 7, 9, 7, 9, 7, 9, 7, 9, 7, 7])
    prob = np.array([.1, .2, .9, .5, .2, .4, .3, .9, .4, .1, .8, .3, .0, .1])
    ids, mean = aggregate_by_group(prob, groups, "mean")
    assert ids.tolist() == [3, 7, 9]
    np.testing.assert_allclose(mean, [.5, 2.8 / 8, 1.9 / 5])
    np.testing.assert_allclose(aggregate_by_group(prob, groups, "max")[1], [.5, .9, .9])
    np.testing.assert_allclose(aggregate_by_group(prob, groups, "top25")[1], [.5, .85, .9])
    # Twelve slices: the top three.
    ids, top = aggregate_by_group(np.arange(12) / 12, np.full(12, 4), "top25")
    assert ids.tolist() == [4] and top == pytest.approx((9 + 10 + 11) / 36)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate_by_group(prob, groups, "median")


def test_a_patients_label_is_its_slices_and_mixed_labels_are_refused():
    patients = per_patient(np.array([1, 0, 1, 0]), np.array([.9, .2, .7, .1]),
                           np.array([5, 2, 5, 2]), "mean")
    assert patients["patient"].tolist() == [2, 5] and patients["label"].tolist() == [0, 1]
    assert patients["slices"].tolist() == [2, 2]
    with pytest.raises(DataError, match=r"patient group\(s\) \[5\] carry both labels"):
        per_patient(np.array([1, 0, 0, 0]), np.array([.9, .2, .7, .1]), np.array([5, 2, 5, 2]),
                    "mean")


def _val_where_top25_wins(patients: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eight slices a patient. A positive patient has a lesion on two slices (0.9) and six clear
    ones (0.1); a negative patient one odd slice (0.95) and seven moderate ones (0.35). The mean
    ranks the negatives higher (0.43 vs 0.3), so does the maximum (0.95 vs 0.9); only the top
    quarter (0.9 vs 0.65) separates them."""
    y, prob, groups = [], [], []
    for g in range(patients):
        label = g % 2
        slices = [.9, .9] + [.1] * 6 if label else [.95] + [.35] * 7
        y += [label] * 8
        prob += [p + 0.001 * g for p in slices]  # distinct patients, same ranks
        groups += [100 + g] * 8
    return np.array(y), np.array(prob), np.array(groups)


def test_the_aggregate_is_the_mean_fixed_in_advance_unless_a_choice_is_asked_for():
    y, prob, groups = _val_where_top25_wins()
    fixed = choose_patient_level(y, prob, groups)
    assert (fixed["aggregate"], fixed["chosen_by"]) == ("mean", "fixed")
    assert "slice_count_auc" not in fixed
    assert choose_patient_level(y, prob, groups, aggregate="max")["aggregate"] == "max"


def test_a_chosen_aggregate_is_the_best_on_val_then_its_threshold():
    y, prob, groups = _val_where_top25_wins()
    choice = choose_patient_level(y, prob, groups, aggregate="choose")
    assert (choice["aggregate"], choice["chosen_by"]) == ("top25", "val_auc")
    assert choice["val_auc_by_aggregate"] == {"mean": 0.0, "top25": 1.0, "max": 0.0}
    assert choice["threshold"]["method"] == "youden"
    patients = per_patient(y, prob, groups, "top25")
    called = patients["prob"] >= choice["threshold"]["value"]
    assert called.tolist() == patients["label"].astype(bool).tolist()  # it separates them
    fixed = choose_patient_level(y, prob, groups, threshold=0.5, aggregate="choose")
    assert fixed["aggregate"] == "top25" and fixed["threshold"] == {"method": "fixed",
                                                                    "value": 0.5}


def test_a_choice_reports_what_slice_count_alone_reaches():
    """Uninformative slices, but positive patients have more of them: the maximum grows with
    the count and wins the choice, and the slice count's own AUC (1.0 here) shows why."""
    rng = np.random.default_rng(3)
    sizes = np.where(np.arange(40) % 2, 12, 3)  # positives: 12 slices, negatives: 3
    y = np.repeat(np.arange(40) % 2, sizes)
    groups = np.repeat(np.arange(40), sizes)
    prob = rng.random(len(y))  # says nothing about the label
    choice = choose_patient_level(y, prob, groups, aggregate="choose")
    assert choice["aggregate"] == "max" and choice["val_auc_by_aggregate"]["max"] > 0.7
    assert choice["slice_count_auc"] == {"val": 1.0}
    assert choose_patient_level(y, prob, groups)["val_auc_by_aggregate"]["mean"] < 0.75


def test_ties_go_to_the_mean():
    # One slice a patient: every aggregate is the slice itself.
    y = np.array([0, 1, 0, 1, 1, 0])
    prob = np.array([.2, .7, .6, .4, .9, .1])
    choice = choose_patient_level(y, prob, np.arange(6) * 3, aggregate="choose")
    assert choice["aggregate"] == "mean" and len(set(choice["val_auc_by_aggregate"].values())) == 1
    # Several slices, every aggregate separating the patients perfectly.
    y, prob, groups = np.repeat([0, 1, 0, 1], 4), np.repeat([.1, .8, .2, .9], 4), np.repeat(
        [1, 2, 3, 4], 4)
    assert choose_patient_level(y, prob, groups, aggregate="choose")["aggregate"] == "mean"


def _test_patients(patients: int = 40, seed: int = 1) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, patients)
    labels = np.arange(patients) % 2
    groups = np.repeat(np.arange(patients) * 7, sizes)
    y = np.repeat(labels, sizes)
    # Patients differ more than the slices of one patient do: the classes overlap per patient.
    patient_mean = np.repeat(0.4 + 0.15 * labels + rng.normal(0, 0.15, patients), sizes)
    return y, np.clip(rng.normal(patient_mean, 0.1), 0, 1), groups


def test_patient_bootstrap_intervals_bracket_the_estimates_and_count_patients_not_slices():
    y, prob, groups = _test_patients()
    choice = {"aggregate": "mean", "threshold": {"method": "youden", "value": 0.5}}
    entry, patients = score_patients(choice, y, prob, groups, resamples=300, seed=3)
    assert (entry["n"], entry["positives"], entry["negatives"]) == (40, 20, 20)
    assert sum(map(sum, entry["confusion_matrix"])) == 40
    assert set(entry["metrics"]) == set(METRIC_KEYS)
    for name, m in entry["metrics"].items():
        low, high = m["ci95"]
        assert low <= m["value"] <= high, name
        assert high > low, name  # 40 patients leave real uncertainty
    # Each patient is one observation: repeating every slice of every patient three times
    # changes neither the estimates nor the intervals.
    tripled, _ = score_patients(choice, np.repeat(y, 3), np.repeat(prob, 3),
                                np.repeat(groups, 3), resamples=300, seed=3)
    assert tripled["confusion_matrix"] == entry["confusion_matrix"] and tripled["n"] == 40
    for name, m in entry["metrics"].items():  # equal but for rounding of the patients' means
        assert tripled["metrics"][name]["value"] == pytest.approx(m["value"]), name
        assert tripled["metrics"][name]["ci95"] == pytest.approx(m["ci95"]), name
    assert patients["patient"].tolist() == list(range(0, 280, 7))


def test_the_patient_choice_is_made_on_val_before_any_test_probability(monkeypatch):
    """val_then_test chooses the aggregate and threshold from val rows only, before it asks the
    model about a single test row."""
    y_val, prob_val, val_groups = _val_where_top25_wins()
    y_test, prob_test, _ = _test_patients()
    labels = np.concatenate([y_val, y_test])
    probs = np.concatenate([prob_val, prob_test])
    val_rows = np.arange(len(y_val))
    test_rows = np.arange(len(y_val), len(labels))
    events = []
    monkeypatch.setattr(evaluate_module, "_proba", lambda member, ds, rows: events.append(
        "test" if rows[0] in test_rows else "val") or probs[rows])
    real = evaluate_module.choose_patient_level
    monkeypatch.setattr(evaluate_module, "choose_patient_level", lambda *a: events.append(
        "patient choice") or real(*a))
    scored = val_then_test(["model"], types.SimpleNamespace(labels=labels), val_rows, test_rows,
                           val_patients=val_groups, aggregate="choose")
    assert events == ["val", "patient choice", "test"]
    assert scored["patient"]["aggregate"] == "top25"
    assert val_then_test(["model"], types.SimpleNamespace(labels=labels), val_rows,
                         test_rows)["patient"] is None


def _patient_entry() -> dict:
    y_val, prob_val, val_groups = _val_where_top25_wins()
    y, prob, groups = _test_patients()
    choice = choose_patient_level(y_val, prob_val, val_groups, aggregate="choose")
    choice["slice_count_auc"]["test"] = 0.625  # as evaluation adds it
    test, _ = score_patients(choice, y, prob, groups, resamples=100)
    val, _ = score_patients(choice, y_val, prob_val, val_groups, resamples=100)
    return {**choice, "test": test, "val": val}


def test_report_shows_patient_results_only_when_there_are_patients(tmp_path):
    write_report(tmp_path / "slices.md", METRICS, LEADERBOARD, PLOTS)
    slices = (tmp_path / "slices.md").read_text(encoding="utf-8")
    assert "Patient-level" not in slices and "patients (" not in slices
    assert "Slice-level, not patient-level" in slices

    metrics = copy.deepcopy(METRICS)
    metrics["patient"] = patient = _patient_entry()
    metrics["data"]["group_by"] = metrics["bootstrap"]["unit"] = "patient"
    write_report(tmp_path / "report.md", metrics, LEADERBOARD, PLOTS)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    section = text[text.index("## Patient-level results"):text.index("## How the model")]
    test = patient["test"]
    acc = test["metrics"]["accuracy"]
    assert (f"| Accuracy | {acc['value']:.3f} | {acc['ci95'][0]:.3f}–{acc['ci95'][1]:.3f} | "
            in section)
    assert "Validation (n=6 patients)" in section
    assert "The test split holds 40 patients (20 COVID, 20 non-COVID)" in section
    assert "mean of the highest quarter of its slices' probabilities" in section
    assert ("(mean 0.000, top-quarter mean 1.000, maximum 0.000; a tie goes to the first of "
            "these)") in section
    assert ("a patient's number of slices alone reaches a ROC AUC of 0.500 on the validation "
            "patients and 0.625 on the test patients") in section
    assert "chosen on the validation patients by Youden's J" in section
    (tn, fp), (fn, tp) = test["confusion_matrix"]
    assert f"| **true COVID** | {fn} (FN) | {tp} (TP) |" in section
    assert f"Of {fn + tp} COVID patients the model missed {fn}" in section
    assert "[Patient-level results](#patient-level-results)" in text  # from the summary
    limitations = text[text.index("## Limitations"):]
    assert "Patient level from this dataset's slices" in limitations
    assert "Slice-level, not patient-level" not in limitations
    # The slice-level results are unchanged, and come first.
    slice_results = slices[slices.index("## Test results"):slices.index("95% CIs")]
    assert text.index(slice_results) < text.index("## Patient-level results")


def test_export_config_and_model_card_carry_the_patient_rule():
    patient = _patient_entry()
    rule = {"aggregate": patient["aggregate"], "threshold": patient["threshold"]["value"]}
    extra = {"patient_threshold_method": "youden",
             "patient_test": {k: patient["test"][k]
                              for k in ("n", "positives", "negatives", "metrics")}}
    config = export_config([make_config({"image_size": 32})], ("non-COVID", "COVID"), 0.4,
                           extra, patient=rule)
    assert config["patient"] == {"aggregate": "top25", "threshold": rule["threshold"]}
    card = model_card(config)
    assert ("- Patient (or CT series) decision (`top25`): its probability is the mean of the "
            "highest quarter") in card
    assert "Youden's J on the same patients" in card
    assert "## Patient-level test metrics" in card and "On 40 test patients" in card
    plain = export_config([make_config({"image_size": 32})], ("non-COVID", "COVID"), 0.4, {})
    assert "patient" not in plain and "Patient" not in model_card(plain)


def test_export_run_passes_the_patient_rule(monkeypatch, tmp_path):
    import results.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "export_model", lambda *args: seen.update(args=args))
    metrics = {**copy.deepcopy(METRICS), "searched": {}, "patient": _patient_entry()}
    pipeline.export_run("unused", tmp_path, metrics, [(None, None)])
    *_, extra, _, _, rule, weights, temperatures = seen["args"]
    assert rule == {"aggregate": "top25", "threshold": metrics["patient"]["threshold"]["value"]}
    # Metrics with no weights and no member temperatures (evaluations before 0.4).
    assert extra["patient_test"]["n"] == 40 and weights == temperatures == [1.0]
    del metrics["patient"]
    pipeline.export_run("unused", tmp_path, metrics, [(None, None)])
    assert seen["args"][-3] is None and "patient_test" not in seen["args"][4]


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory) -> str:
    """A run folder as a search leaves it, of an untrained ResNet-18 on 24 patients of three
    slices each, split by the manifest's patient column (IDs `PAT-00NN`)."""
    tmp = tmp_path_factory.mktemp("patients")
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(24):
        label = "covid" if patient % 2 else "normal"
        for s in range(3):
            Image.fromarray(smooth_image(rng, 32)).save(data / f"p{patient}-{s}.png")
            rows.append(f"p{patient}-{s}.png,{label},PAT-{patient:04d}")
    (data / "m.csv").write_text("path,label,group\n" + "\n".join(rows))
    ds = load_dataset(data / "m.csv", image_size=32, progress=False)
    split = split_dataset(ds, (0.5, 0.25, 0.25), seed=0, group_by="manifest")
    (tmp / "space.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    options = SearchOptions(data=str(data / "m.csv"), storage_path=str(tmp / "runs"),
                            name="fake", search_space=str(tmp / "space.yaml"),
                            base_config={"image_size": 32},
                            split={"ratios": [0.5, 0.25, 0.25], "seed": 0,
                                   "group_by": "manifest"})
    prepare_run(options, ds, split)
    description = make_config({"image_size": 32}).description()
    torch.manual_seed(0)
    checkpoint = Path(options.run_dir) / "trial_x" / "best.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": description.build().state_dict(),
                "description": description.to_dict()}, checkpoint)
    write_json(Path(options.run_dir) / "best.json", {
        "trial_id": "x", "checkpoint": "trial_x/best.pt", "config": {"image_size": 32},
        "searched": {}, "trials": 1, "trials_stopped_early": 0, "errored_trials": 0,
        "time_budget_s": None, "budget_reached": False})
    return options.run_dir


@pytest.mark.parametrize(("group_by", "unit"), [
    ("manifest", None), ("patient", None), ("duplicates", None),  # records of ctscan 0.3
    ("patient", "patients"), ("patient", "volumes"), ("mixed", "groups")])
def test_evaluate_scores_patients_when_the_groups_are_patients(manifest_run, group_by, unit,
                                                               tmp_path):
    split_path = Path(manifest_run) / "split.json"
    split_json = json.loads(split_path.read_text())
    split_json["group_by"] = group_by  # the same groups, named patients or not
    if unit is None:
        split_json.pop("unit", None)
    else:
        split_json["unit"] = unit
    write_json(split_path, split_json)
    metrics, arrays = evaluate_run(manifest_run, resamples=20)
    if group_by == "duplicates" or unit == "groups":
        assert "patient" not in metrics and arrays["test_patients"] is None
        return
    patient = metrics["patient"]
    assert patient["unit"] == (unit or "patients")
    test_groups = {e["group"] for e in split_json["files"] if e["split"] == "test"}
    val_groups = {e["group"] for e in split_json["files"] if e["split"] == "val"}
    assert list(patient) == ["aggregate", "chosen_by", "val_auc_by_aggregate", "threshold",
                             "unit", "test", "val"]
    assert (patient["aggregate"], patient["chosen_by"]) == ("mean", "fixed")
    assert patient["test"]["n"] == len(test_groups) == 6 and patient["val"]["n"] == 6
    assert patient["test"]["positives"] + patient["test"]["negatives"] == 6
    write_patient_predictions(tmp_path / "test_patients.json", arrays)
    rows = json.loads((tmp_path / "test_patients.json").read_text())
    assert {r["patient"] for r in rows} == test_groups and not test_groups & val_groups
    assert all(type(r["patient"]) is int and r["slices"] == 3 for r in rows)
    assert {r["label"] for r in rows} == {"covid", "normal"}
    # Patients are only ever the split's group numbers, never the manifest's IDs.
    write_report(tmp_path / "report.md", metrics, [], {})
    for text in (json.dumps(metrics), (tmp_path / "test_patients.json").read_text(),
                 (tmp_path / "report.md").read_text(encoding="utf-8")):
        assert "PAT-" not in text
    heading = {"patients": "Patient", "volumes": "Volume"}[unit or "patients"]
    assert f"## {heading}-level results" in (tmp_path / "report.md").read_text(encoding="utf-8")
