import copy
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from results import plots
from results.report import write_report

CLASSES = ("non-COVID", "COVID")


def _scores(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    return y, np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)


def _trials(n: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"trial_id": f"t{i:02d}", "val_auc": float(rng.uniform(0.6, 0.95)),
             "dropout": float(rng.uniform(0, 0.5)), "lr": float(10 ** rng.uniform(-5, -2.5)),
             "head": [[], [256], [512, 128]][i % 3], "arch": ["resnet18", "resnet50"][i % 2]}
            for i in range(n)]


def _assert_png(path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
        assert image.width > 0 and image.height > 0


def test_each_plot_writes_a_png(tmp_path):
    y, prob = _scores()
    histories = {f"t{i} resnet18 lr=1e-04": [
        {"epoch": e, "val_auc": 0.6 + 0.03 * e + 0.01 * i, "val_loss": 0.7 - 0.02 * e,
         "train_loss": 0.7 - 0.04 * e} for e in range(1, 6 + i)] for i in range(3)}
    made = [
        plots.plot_roc(y, prob, 0.5, tmp_path / "roc.png"),
        plots.plot_pr(y, prob, tmp_path / "pr.png"),
        plots.plot_confusion(np.array([[80, 20], [10, 90]]), CLASSES, tmp_path / "cm.png"),
        plots.plot_training_curves(histories, tmp_path / "curves.png"),
    ]
    assert all(fig.axes for fig in made)
    for name in ("roc", "pr", "cm", "curves"):
        _assert_png(tmp_path / f"{name}.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "curves.png", "pr.png",
                                                          "roc.png"]  # no temp files left


def test_roc_operating_point_lies_on_the_curve(tmp_path):
    y, prob = _scores()
    fpr, tpr, _ = roc_curve(y, prob, drop_intermediate=False)
    vertices = set(zip(fpr.round(12), tpr.round(12), strict=True))
    # Inside the score range, between two scores, and beyond either end.
    for threshold in (0.42, float(np.sort(prob)[57] + 1e-9), 1.5, -0.1):
        point = plots.operating_point(y, prob, threshold)
        assert (round(point[0], 12), round(point[1], 12)) in vertices

    fig = plots.plot_roc(y, prob, 0.42, tmp_path / "roc.png")
    marker = [line for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert len(marker) == 1
    drawn = (float(marker[0].get_xdata()[0]), float(marker[0].get_ydata()[0]))
    assert drawn == plots.operating_point(y, prob, 0.42)
    assert "0.42" in marker[0].get_label()


def test_roc_refuses_a_single_class(tmp_path):
    with pytest.raises(ValueError, match="both classes"):
        plots.plot_roc(np.ones(5), np.linspace(0, 1, 5), 0.5, tmp_path / "roc.png")


def test_hparam_scatter_numeric_log_and_list_keys(tmp_path):
    trials = _trials()
    keys = ["dropout", "lr", "head", "arch"]
    fig = plots.plot_hparam_scatter(trials, keys, tmp_path / "hp.png")
    _assert_png(tmp_path / "hp.png")
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(axes) == keys
    assert axes["lr"].get_xscale() == "log"
    assert axes["dropout"].get_xscale() == "linear"
    assert [t.get_text() for t in axes["head"].get_xticklabels()] == ["[]", "[256]", "[512, 128]"]
    assert [t.get_text() for t in axes["arch"].get_xticklabels()] == ["resnet18", "resnet50"]
    best = max(trials, key=lambda t: t["val_auc"])
    star = [c for c in axes["dropout"].collections if c.get_offsets().shape[0] == 1]
    assert star and tuple(star[-1].get_offsets()[0]) == (best["dropout"], best["val_auc"])
    assert any(best["trial_id"] in text.get_text() for text in fig.legends[0].get_texts())


def test_hparam_grid_fits_one_to_twelve_keys(tmp_path):
    for n in range(1, 13):
        rows, cols = plots._grid(n)
        assert rows * cols >= n and cols <= 4 and rows * cols - n < cols
    # One panel, with a key that no trial has beside it, still draws.
    fig = plots.plot_hparam_scatter(_trials(4), ["lr", "momentum"], tmp_path / "hp.png")
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["lr", "momentum"]


def _metric(value: float, low: float, high: float) -> dict:
    return {"value": value, "ci95": [low, high]}


METRICS = {
    "trial_id": "a1b2c3",
    "checkpoint": "/runs/x/trial_a1b2c3/checkpoint_000004/last.pt",
    "class_names": ["non-COVID", "COVID"], "positive_class": "COVID",
    "threshold": {"method": "youden", "value": 0.42},
    "test": {
        "n": 250, "positives": 126, "negatives": 124,
        "metrics": {"accuracy": _metric(0.82, 0.77, 0.87), "precision": _metric(0.8, 0.73, 0.86),
                    "recall": _metric(0.85, 0.79, 0.91), "specificity": _metric(0.79, 0.72, 0.86),
                    "f1": _metric(0.824, 0.78, 0.87), "roc_auc": _metric(0.9, 0.86, 0.94),
                    "pr_auc": _metric(0.89, 0.84, 0.93)},
        "confusion_matrix": [[98, 26], [19, 107]],
        "at_0.5": {"metrics": {"accuracy": _metric(0.8, 0.75, 0.85),
                               "precision": _metric(0.84, 0.77, 0.9),
                               "recall": _metric(0.75, 0.68, 0.82),
                               "specificity": _metric(0.857, 0.8, 0.91),
                               "f1": _metric(0.79, 0.74, 0.84), "roc_auc": _metric(0.9, 0.86, 0.94),
                               "pr_auc": _metric(0.89, 0.84, 0.93)},
                   "confusion_matrix": [[106, 18], [32, 94]]},
    },
    "val": {"n": 500, "metrics": {"accuracy": _metric(0.84, 0.81, 0.87),
                                  "recall": _metric(0.87, 0.83, 0.91),
                                  "specificity": _metric(0.81, 0.76, 0.85),
                                  "roc_auc": _metric(0.92, 0.9, 0.94)}},
    "bootstrap": {"resamples": 1000, "seed": 0},
    "data": {"path": "/data/sarscov2", "images": 2481,
             "skipped": [{"path": "COVID/broken (7).png", "reason": "truncated PNG"}],
             "split_counts": {"train": {"non-COVID": 856, "COVID": 875},
                              "val": {"non-COVID": 250, "COVID": 250},
                              "test": {"non-COVID": 124, "COVID": 126}},
             "group_by": "duplicates", "split_seed": 0, "source": "sarscov2-ct-scan"},
    "config": {"arch": "resnet50", "lr": 0.0003, "head": [512, 128], "dropout": 0.2},
}
LEADERBOARD = [{"trial_id": f"t{i:02d}" if i else "a1b2c3", "val_auc": 0.95 - 0.01 * i,
                "epochs": 10 - i % 4, "status": "completed" if i < 3 else "stopped early",
                "arch": "resnet50", "lr": 3e-4 * (i + 1), "head": [512, 128]}
               for i in range(12)]
PLOTS = {name: f"{name}.png" for name in ("roc", "pr", "confusion", "training_curves", "hparams")}


def test_report_states_the_numbers_and_the_caveats(tmp_path):
    path = tmp_path / "report.md"
    write_report(path, METRICS, LEADERBOARD, PLOTS, ["gradcam/Covid (1)_gradcam.png"])
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# COVID CT classifier")
    assert "On 250 held-out test slices (126 COVID, 124 non-COVID)" in text
    assert "accuracy 0.820 (95% CI 0.770–0.870)" in text
    assert "| Accuracy | 0.820 | 0.770–0.870 | 0.840 |" in text
    assert "Youden" in text and "0.42" in text and "near-identical" in text
    assert "### At the conventional threshold 0.5" in text
    assert "| Sensitivity (recall) | 0.750 | 0.680–0.820 |" in text
    assert "| **true COVID** | 19 (FN) | 107 (TP) |" in text
    # Top 10 of 12 trials, the winner in bold, floats formatted for reading.
    assert "top 10 of 12 trials" in text
    # Settings share one cell that wraps between them, never inside one (a no-break space).
    assert ("| 1 | **a1b2c3** | 0.9500 | 10 | completed | 1.00 | arch=resnet50 · lr=3.0e-04 · "
            "head=\\[512,\u00a0128\\] |") in text
    assert "| 10 | t09 |" in text and "| 11 |" not in text
    for name in PLOTS:
        assert f"]({name}.png)" in text
    assert "](gradcam/Covid%20%281%29_gradcam.png) Covid \\(1\\)" in text
    assert "| **total** | 1230 | 1251 | 2481 |" in text
    assert "- COVID/broken \\(7\\).png: truncated PNG" in text
    assert "```yaml\narch: resnet50\nhead: [512, 128]\ndropout: 0.2\n" in text
    limitations = text[text.index("## Limitations"):]
    for phrase in ("São Paulo", "Slice-level", "Not a medical device", "not independent"):
        assert phrase in limitations
    # Every table has its header separator right under the header.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            assert set(lines[i + 1]) <= set("|-"), line
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # written atomically


def test_report_with_fixed_threshold_and_nothing_skipped(tmp_path):
    metrics = copy.deepcopy(METRICS)
    metrics["threshold"] = {"method": "fixed", "value": 0.5}
    metrics["data"]["skipped"] = []
    metrics["data"]["group_by"] = "none"
    metrics["test"]["metrics"]["roc_auc"]["ci95"] = [math.nan, math.nan]
    path = tmp_path / "report.md"
    path.write_text("old report")
    write_report(path, metrics, LEADERBOARD[:2], {"roc": "roc.png"})
    text = path.read_text(encoding="utf-8")
    assert "fixed threshold" in text and "likely optimistic" in text
    assert "conventional threshold 0.5" not in text  # it would repeat the headline table
    assert "Skipped files (could not be decoded): none" in text
    assert "| ROC AUC | 0.900 | n/a |" in text
    assert "](pr.png)" not in text and "Grad-CAM" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_report_shows_calibration_and_which_unit_the_intervals_resampled(tmp_path):
    from results.metrics import score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    prob = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    metrics = copy.deepcopy(METRICS)
    scored = score(y, prob, 0.5, resamples=100)
    metrics["test"]["calibration"] = scored["calibration"]
    metrics["test"]["intervals"] = scored["intervals"]
    metrics["bootstrap"] = {"resamples": 100, "seed": 0, "unit": "manifest", "test_groups": 31}
    fig = plots.plot_reliability(metrics["test"]["calibration"], tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    assert fig.axes[0].get_xlabel().startswith("Mean predicted probability")
    write_report(tmp_path / "report.md", metrics, LEADERBOARD, {**PLOTS, "reliability":
                                                                  "reliability.png"})
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    brier = metrics["test"]["calibration"]["brier"]
    assert f"| Brier score | {brier['value']:.3f} | {brier['ci95'][0]:.3f}–" in text
    assert "](reliability.png)" in text
    assert ("95% CIs: Wilson score intervals for accuracy, sensitivity (recall), specificity "
            "and precision (PPV); DeLong's interval on the logit scale for ROC AUC; percentile "
            "bootstrap (100 resamples, seed 0) for F1 score, PR AUC (average precision), Brier "
            "score and expected calibration error; all over patients: all slices of a patient "
            "are taken together") in text
    assert "(31 groups" in text
    assert "They count test patients, not slices" in text[text.index("## Limitations"):]
    assert "drew one class only" not in text  # none dropped here

    metrics["test"]["resamples_dropped"] = 7
    write_report(tmp_path / "report.md", metrics, LEADERBOARD, PLOTS)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "(7 resamples drew one class only and are left out of the PR AUC's interval)" in text
    # metrics.json from before the methods were recorded: every interval was bootstrapped.
    del metrics["test"]["intervals"]
    write_report(tmp_path / "report.md", metrics, LEADERBOARD, PLOTS)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "95% CIs: percentile bootstrap (100 resamples, seed 0) for accuracy," in text
    assert "(7 resamples drew one class only and are left out of the AUCs' intervals)" in text


def test_report_sets_the_exported_ensemble_beside_the_best_trial_with_paired_differences(
        tmp_path):
    metrics = copy.deepcopy(METRICS)
    config = {"arch": "resnet50", "lr": 0.0003, "epochs": 30}
    metrics["searched"] = {"arch": {"choice": ["resnet18", "resnet50"]}}
    metrics["ensemble"] = {
        "k": 2, "candidates": 3, "rounds": 20, "chosen": "ensemble",
        "val_log_loss": {"ensemble": 0.2012, "single": 0.2345},
        "cross_fitted_log_loss": 0.2101, "why": "ensemble selection gave weight to 2 of the 3",
        "members": [{"trial_id": "a1b2c3", "weight": 0.65, "precision": "bf16",
                     "checkpoint": "trial_a/checkpoint_000004/best.pt", "config": config},
                    {"trial_id": "t01", "weight": 0.35, "precision": "bf16",
                     "checkpoint": "trial_b/checkpoint_000002/best.pt",
                     "config": {**config, "arch": "resnet18", "lr": 0.001}}]}
    metrics["bootstrap"] = {"resamples": 1000, "seed": 0, "unit": "duplicates", "test_groups": 90}
    metrics["compared"] = {"k": 1, "members": ["a1b2c3"], "weights": [1.0],
                           "threshold": {"method": "youden", "value": 0.37},
                           "test": {"metrics": {"roc_auc": _metric(0.88, 0.84, 0.92),
                                                "accuracy": _metric(0.79, 0.74, 0.84)},
                                    "calibration": {"brier": {"value": 0.15}}},
                           "val": {"metrics": {"roc_auc": _metric(0.91, 0.9, 0.94)}},
                           "paired": {"roc_auc": _metric(0.02, -0.004, 0.041),
                                      "accuracy": _metric(0.03, 0.0, 0.06),
                                      "brier": _metric(-0.011, -0.02, -0.003),
                                      "resamples_dropped": 0}}
    write_report(tmp_path / "report.md", metrics, LEADERBOARD, PLOTS)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    section = text[text.index("## Exported model and the one it is compared"):
                   text.index("## Test results")]
    assert "It gave a1b2c3 0.65, t01 0.35 (log-loss 0.2012, against 0.2345" in section
    assert "scored on the other, selection gave a log-loss of 0.2101" in section
    assert ("| **ensemble of a1b2c3 (0.65), t01 (0.35)** (exported) | 0.42 | 0.920 | "
            "0.900 (95% CI 0.860–0.940) |") in section
    assert "| trial a1b2c3 alone | 0.37 | 0.910 | 0.880 (95% CI 0.840–0.920) |" in section
    assert "| ROC AUC | +0.020 | -0.004–0.041 |" in section
    assert "| Brier score | -0.011 | -0.020–-0.003 |" in section
    assert "same 1000 bootstrap resamples" in section
    assert "the weighted ensemble of 2 trials (a1b2c3 0.65, t01 0.35)" in text  # the summary
    members = text[text.index("### Exported members"):]
    assert "| trial | weight | val AUC | precision | settings |" in members
    # Searched or differing settings, in one cell.
    assert "| t01 | 0.35 | 0.9400 | bf16 | arch=resnet18 · lr=1.0e-03 |" in members
    assert "epochs: 30" in members  # shared, once
    assert "Winning configuration" not in text
