"""After a search: evaluate once on the test split, plot, explain, report and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_utils import runfolder
from data_utils.errors import RunFolderError
from data_utils.files import write_json
from results.evaluate import (
    TEST_PATIENTS,
    evaluate_run,
    load_checkpoint_model,
    write_patient_predictions,
    write_predictions,
)
from results.explain import explain_slices
from results.export import export_model
from results.gradcam_picks import pick_slices
from results.ledger import (
    EVALUATIONS,
    completed_entry,
    earlier_evaluations,
    model_state,
    opening_entry,
    record,
    scorings,
    test_split_ledgers,
    test_split_record,
)
from results.plots import (
    plot_confusion,
    plot_hparam_scatter,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from results.report import write_report
from results.report_html import write_report_html
from tuning.config import make_config
from tuning.monitor import log_report


def _trial_label(trial: dict) -> str:
    p = trial["params"]
    lr = f" lr={p['lr']:.1e}" if "lr" in p else ""
    return f"{trial['trial_id']} {p.get('arch', '')}{lr}".strip()


def report_run(run_dir: str, threshold: float | None = None, resamples: int = 1000,
               seed: int = 0, cache_dir: Path | None = None, gradcams: int = 8,
               ensemble: int = 5, calibrate: bool = False, aggregate: str = "mean") -> Path:
    """Everything `ctscan evaluate` writes into the run folder's results/ and export/; returns
    the local results folder (the run's own, or a copy of a bucket's under ./runs/NAME)."""
    # Every earlier look at this test split, in this run or any other; a damaged ledger stops
    # here, before the test split is read.
    split_json = runfolder.read_json(runfolder.join(run_dir, runfolder.SPLIT))
    split_ledgers = test_split_ledgers(split_json, cache_dir) if split_json else []
    earlier = earlier_evaluations(run_dir, split_ledgers)
    options = {"ensemble": ensemble, "calibrate": calibrate, "threshold": threshold,
               "bootstrap": resamples, "seed": seed, "patient_aggregate": aggregate}
    out = runfolder.local_copy_dir(run_dir) / runfolder.RESULTS
    # This evaluation goes on record (also in a bucket) once everything is fixed on val, before
    # the first test probability is computed: one refused on the way (a changed file, a missing
    # key) never looked.
    ledgers = list(dict.fromkeys([str(out / EVALUATIONS),
                                  runfolder.join(run_dir, runfolder.RESULTS, EVALUATIONS),
                                  *split_ledgers]))
    opening = opening_entry(options, runfolder.name_of(run_dir), model_state(run_dir))
    metrics, arrays = evaluate_run(run_dir, threshold, resamples, seed, cache_dir, ensemble,
                                   calibrate, aggregate,
                                   before_test=lambda: record(ledgers, [*earlier, opening]))
    earlier_scorings = scorings(earlier)
    metrics["evaluations"] = {
        "count": len(earlier_scorings) + 1, "options": options, "model": opening["model"],
        "run": opening["run"],
        "earlier": [{k: e[k] for k in ("time", "run", "options", "model", "test") if k in e}
                    for e in earlier_scorings],
        # predict's and explain's looks at test files (not scorings, but looks all the same)
        "other_looks": [{k: e.get(k) for k in ("time", "run", "kind", "files")}
                        for e in earlier if e not in earlier_scorings],
        **({"test_split": test_split_record(split_json, split_ledgers[0],
                                            runfolder.name_of(run_dir))}
           if split_json else {})}
    record(ledgers, [*earlier, completed_entry(opening, metrics)])
    write_json(out / runfolder.METRICS, metrics)
    write_predictions(out / runfolder.TEST_PREDICTIONS, arrays)
    if arrays["test_patients"] is not None:
        write_patient_predictions(out / TEST_PATIENTS, arrays)

    trials = runfolder.read_json(runfolder.join(run_dir, runfolder.TRIALS)) or []
    scored = [t for t in trials if t["history"]]
    y, prob, value = arrays["y_test"], arrays["prob_test"], metrics["threshold"]["value"]
    figures = {
        "roc": plot_roc(y, prob, value, out / "roc.png"),
        "pr": plot_pr(y, prob, out / "pr.png"),
        "reliability": plot_reliability(metrics["test"]["calibration"], out / "reliability.png"),
        "confusion": plot_confusion(np.array(metrics["test"]["confusion_matrix"]),
                                    tuple(metrics["class_names"]), out / "confusion.png"),
        "training_curves": plot_training_curves(
            {_trial_label(t): t["history"] for t in scored[:5]}, out / "training_curves.png"),
        "hparams": plot_hparam_scatter(
            [{**t["params"], "val_auc": t["val_auc"], "trial_id": t["trial_id"]} for t in scored],
            list(metrics["searched"]), out / "hparams.png"),
    }

    export_dir = runfolder.local_copy_dir(run_dir) / runfolder.EXPORT
    export_run(run_dir, export_dir, metrics, arrays["members"])
    # Where the model looked: its surest mistakes first, then right calls, from several
    # patients (the split's groups, in the order of the test arrays).
    groups = arrays["test_groups"]
    picks = pick_slices(y, prob, value, groups, gradcams)
    rows = arrays["test_rows"][picks]
    shown = explain_slices(export_dir, arrays["images"][rows],
                           [arrays["test_paths"][i] for i in picks], out / "gradcam")

    leaderboard = [{"trial_id": t["trial_id"], "val_auc": t["val_auc"], "epochs": t["epochs"],
                    "status": t["status"], **t["params"]} for t in trials]
    failures = [{k: t[k] for k in ("trial_id", "epochs", "error", "error_file")}
                for t in trials if "error" in t]
    write_report(out / runfolder.REPORT, metrics, leaderboard, {k: f"{k}.png" for k in figures},
                 [{"image": str(p.relative_to(out)), "name": arrays["test_paths"][i],
                   "label": int(y[i]), "prob": float(prob[i]), "group": int(groups[i])}
                  for p, i in zip(shown, picks, strict=True)], failures)
    write_report_html(out / runfolder.REPORT, out / runfolder.REPORT_HTML)
    # Each trial's run marked with its weight, status and epochs, and a run of the exported
    # model's report next to them, named for what it is (exported_model, exported_ensemble_of_K).
    log_report(run_dir, out, metrics, trials, figures, shown,
               (out / runfolder.REPORT).read_text(encoding="utf-8"))
    runfolder.publish(out, run_dir, runfolder.RESULTS)
    runfolder.publish(export_dir, run_dir, runfolder.EXPORT)
    return out


# What export reads of results/metrics.json.
METRICS_KEYS = ("trial_id", "checkpoint", "config", "searched", "test", "threshold",
                "class_names", "data")


def export_run(run_dir: str, out: Path, metrics: dict | None = None,
               members: list | None = None) -> Path:
    """`ctscan export`: the evaluated model (the best trial, or the ensemble evaluation chose):
    its weights, TorchScript, ONNX, config and model card."""
    if metrics is None:
        location = runfolder.join(run_dir, runfolder.RESULTS, runfolder.METRICS)
        metrics = runfolder.read_json(location)
        if metrics is None:
            raise RunFolderError(f"{location}: not found; run `ctscan evaluate {run_dir}` first")
        runfolder.require_keys(metrics, METRICS_KEYS, location)
    # Evaluations before ensembles existed recorded only the best trial.
    chosen = metrics.get("ensemble", {}).get("members") or [
        {k: metrics[k] for k in ("trial_id", "checkpoint", "config")}]
    if members is None:
        members = [load_checkpoint_model(runfolder.in_run(run_dir, m["checkpoint"]))
                   for m in chosen]
    extra = {
        "trial_id": metrics["trial_id"],
        "searched": metrics["searched"],
        "test_metrics": metrics["test"]["metrics"],
        "threshold_method": metrics["threshold"]["method"],
        **({"threshold_target_sensitivity": metrics["threshold"]["target"]}
           if "target" in metrics["threshold"] else {}),
        "data": metrics["data"],
        # How many times this run's test split has been scored, this evaluation included.
        "test_split_scored": metrics.get("evaluations", {}).get("count", 1),
        # So that predict and explain can tell (and record) a look at this test split's files.
        **({"test_split": metrics["evaluations"]["test_split"]}
           if "test_split" in metrics.get("evaluations", {}) else {}),
    }
    patient = metrics.get("patient")
    rule = None
    if patient:
        # How `ctscan predict` calls a whole CT series from its slices, and the card's numbers.
        rule = {"aggregate": patient["aggregate"], "threshold": patient["threshold"]["value"]}
        extra["patient_threshold_method"] = patient["threshold"]["method"]
        # Evaluations before 0.4 chose the aggregate on val.
        extra["patient_aggregate_chosen_by"] = patient.get("chosen_by", "val_auc")
        extra["patient_test"] = {k: patient["test"][k]
                                 for k in ("n", "positives", "negatives", "metrics")}
    return export_model(out, [(net, make_config(m["config"]))
                              for (net, _), m in zip(members, chosen, strict=True)],
                        tuple(metrics["class_names"]), metrics["threshold"]["value"], extra,
                        [{"trial_id": m["trial_id"], "precision": m.get("precision")}
                         for m in chosen],
                        metrics.get("temperature", 1.0), rule,
                        [m.get("weight", 1.0) for m in chosen],
                        [m.get("temperature", 1.0) for m in chosen])
