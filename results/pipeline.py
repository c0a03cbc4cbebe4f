"""After a search: evaluate once on the test split, plot, explain, report and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_utils.files import write_json
from data_utils.sources import DataError
from results.evaluate import evaluate_run, load_checkpoint_model, write_predictions
from results.explain import explain_paths
from results.export import export_model
from results.plots import (
    figures_to_tensorboard,
    plot_confusion,
    plot_hparam_scatter,
    plot_pr,
    plot_roc,
    plot_training_curves,
)
from results.report import write_report
from tuning.config import make_config
from tuning.search import read_text


def local_dir(run_dir: str) -> Path:
    """Where results go: inside a local run, or under ./runs/NAME for a run on s3:// or gs://."""
    if "://" not in run_dir:
        return Path(run_dir)
    return Path("runs") / run_dir.rstrip("/").split("/")[-1]


def _trial_label(trial: dict) -> str:
    p = trial["params"]
    lr = f" lr={p['lr']:.1e}" if "lr" in p else ""
    return f"{trial['trial_id']} {p.get('arch', '')}{lr}".strip()


def report_run(run_dir: str, threshold: float | None = None, resamples: int = 1000,
               seed: int = 0, cache_dir: Path | None = None, gradcams: int = 4) -> Path:
    """Everything `ctscan evaluate` writes; returns the results folder."""
    metrics, arrays = evaluate_run(run_dir, threshold, resamples, seed, cache_dir)
    out = local_dir(run_dir) / "results"
    write_json(out / "metrics.json", metrics)
    write_predictions(out / "test_predictions.json", arrays)

    trials = json.loads(read_text(f"{run_dir}/trials.json") or "[]")
    scored = [t for t in trials if t["history"]]
    y, prob, value = arrays["y_test"], arrays["prob_test"], metrics["threshold"]["value"]
    figures = {
        "roc": plot_roc(y, prob, value, out / "roc.png"),
        "pr": plot_pr(y, prob, out / "pr.png"),
        "confusion": plot_confusion(np.array(metrics["test"]["confusion_matrix"]),
                                    tuple(metrics["class_names"]), out / "confusion.png"),
        "training_curves": plot_training_curves(
            {_trial_label(t): t["history"] for t in scored[:5]}, out / "training_curves.png"),
        "hparams": plot_hparam_scatter(
            [{**t["params"], "val_auc": t["val_auc"], "trial_id": t["trial_id"]} for t in scored],
            list(metrics["searched"]), out / "hparams.png"),
    }
    figures_to_tensorboard({f"results/{k}": f for k, f in figures.items()}, out / "tensorboard")

    export_dir = local_dir(run_dir) / "export"
    export_run(run_dir, export_dir, metrics, arrays["model"])
    # A few test slices of each class, so the report shows where the model looked.
    picks = [i for label in (1, 0) for i in np.flatnonzero(y == label)[: gradcams // 2]]
    shown = explain_paths(export_dir, [arrays["test_files"][i] for i in picks], out / "gradcam")

    leaderboard = [{"trial_id": t["trial_id"], "val_auc": t["val_auc"], "epochs": t["epochs"],
                    "status": t["status"], **t["params"]} for t in scored]
    write_report(out / "report.md", metrics, leaderboard, {k: f"{k}.png" for k in figures},
                 [str(p.relative_to(out)) for p in shown])
    return out


def export_run(run_dir: str, out: Path, metrics: dict | None = None, model=None) -> Path:
    """`ctscan export`: the winner's state_dict, TorchScript, config and model card."""
    if metrics is None:
        text = (local_dir(run_dir) / "results" / "metrics.json")
        if not text.exists():
            raise DataError(f"{text}: not found; run `ctscan evaluate {run_dir}` first")
        metrics = json.loads(text.read_text())
    config = make_config(metrics["config"])
    if model is None:
        model = load_checkpoint_model(metrics["checkpoint"], config)
    extra = {
        "trial_id": metrics["trial_id"],
        "searched": metrics["searched"],
        "test_metrics": metrics["test"]["metrics"],
        "threshold_method": metrics["threshold"]["method"],
        "data": metrics["data"],
    }
    return export_model(out, model, config, tuple(metrics["class_names"]),
                        metrics["threshold"]["value"], extra)
