"""The report's figures: each function writes one PNG and returns its matplotlib Figure.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so nothing here
touches global plotting state or needs a display, and figures are freed when dropped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn import metrics

from data_utils.files import atomic_write

DPI = 120
METRIC_LABELS = {"val_auc": "val AUC", "val_loss": "val loss", "val_accuracy": "val accuracy"}


def _save(fig: Figure, path: Path) -> Figure:
    # Atomic like every other artefact: a report never links to half a PNG.
    with atomic_write(Path(path), "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return fig


def _binary(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y_true).astype(int).ravel(), np.asarray(prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} labels but prob has {p.size} scores")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("y_true needs both classes (0 and 1) to draw ROC/PR curves")
    return y, p


def operating_point(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """(FPR, TPR) of the rule `prob >= threshold`, the same rule roc_curve's points use."""
    y, p = _binary(y_true, prob)
    pred = p >= threshold
    return float(pred[y == 0].mean()), float(pred[y == 1].mean())


def plot_roc(y_true: np.ndarray, prob: np.ndarray, threshold: float, path: Path,
             title: str = "ROC curve (test split)") -> Figure:
    y, p = _binary(y_true, prob)
    # Keep every vertex so the operating point is exactly one of the plotted points.
    fpr, tpr, _ = metrics.roc_curve(y, p, drop_intermediate=False)
    op_fpr, op_tpr = operating_point(y, p, threshold)

    fig = Figure(figsize=(5.6, 5.4), layout="constrained")
    ax = fig.add_subplot()
    auc = metrics.roc_auc_score(y, p)
    ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"model (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance (AUC = 0.5)")
    ax.plot(op_fpr, op_tpr, "o", color="tab:red", ms=9, mec="black", zorder=3,
            label=f"threshold {threshold:.3g}: FPR {op_fpr:.2f}, TPR {op_tpr:.2f}")
    # Text goes below the point, into the empty area under a useful curve, and toward the
    # middle so a point at either edge keeps its label inside the axes.
    right = op_fpr < 0.7
    ax.annotate(f"t = {threshold:.3g}", (op_fpr, op_tpr), xytext=(14 if right else -14, -18),
                textcoords="offset points", ha="left" if right else "right", fontsize=10,
                color="tab:red", arrowprops={"arrowstyle": "-", "color": "tab:red"})
    return _save_unit_square(fig, path, title, "False positive rate (1 − specificity)",
                             "True positive rate (sensitivity)", "lower right")


def _save_unit_square(fig: Figure, path: Path, title: str, xlabel: str, ylabel: str,
                      legend: str) -> Figure:
    """Square axes from 0 to 1 on both sides, as a ROC curve or a reliability diagram needs."""
    ax = fig.axes[0]
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title=title, xlabel=xlabel,
           ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=9)
    return _save(fig, path)


def plot_reliability(calibration: dict, path: Path,
                     title: str = "Reliability diagram (test split)") -> Figure:
    """Fraction positive against mean predicted probability per bin (`results.metrics.
    calibration`'s bins); on the diagonal, a probability of 0.8 comes true 80% of the time."""
    bins = calibration["bins"]
    fig = Figure(figsize=(5.6, 5.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    sizes = np.array([b["n"] for b in bins], dtype=float)
    ax.scatter([b["mean_prob"] for b in bins], [b["fraction_positive"] for b in bins],
               s=20 + 200 * sizes / sizes.max(), color="tab:blue", edgecolor="black", zorder=3,
               label=f"model (Brier {calibration['brier']['value']:.3f}, "
                     f"ECE {calibration['ece']['value']:.3f})")
    ax.plot([b["mean_prob"] for b in bins], [b["fraction_positive"] for b in bins],
            color="tab:blue", lw=1)
    for b in bins:
        ax.annotate(str(b["n"]), (b["mean_prob"], b["fraction_positive"]), fontsize=8,
                    xytext=(6, -10), textcoords="offset points")
    return _save_unit_square(fig, path, title, "Mean predicted probability (bin of width 0.1)",
                             "Fraction positive", "lower right")


def plot_pr(y_true: np.ndarray, prob: np.ndarray, path: Path,
            title: str = "Precision–recall curve (test split)") -> Figure:
    y, p = _binary(y_true, prob)
    precision, recall, _ = metrics.precision_recall_curve(y, p)
    prevalence = float(y.mean())

    fig = Figure(figsize=(5.6, 5.4), layout="constrained")
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", color="tab:blue", lw=2,
            label=f"model (AP = {metrics.average_precision_score(y, p):.3f})")
    ax.axhline(prevalence, color="grey", ls="--", lw=1,
               label=f"no skill = prevalence ({prevalence:.2f})")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title=title,
           xlabel="Recall (sensitivity)", ylabel="Precision (positive predictive value)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, class_names: tuple[str, str], path: Path,
                   title: str = "Confusion matrix (test split)") -> Figure:
    cm = np.asarray(cm, dtype=int)
    if cm.shape != (2, 2) or len(class_names) != 2:
        raise ValueError(f"need a 2x2 matrix and 2 class names, got {cm.shape} and {class_names}")
    total = max(int(cm.sum()), 1)

    fig = Figure(figsize=(5.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    fig.colorbar(image, ax=ax, label="images", shrink=0.85)
    names = [["TN", "FP"], ["FN", "TP"]]
    for i in range(2):
        for j in range(2):
            # White on the darker half of the colour map, black on the lighter half.
            dark = cm[i, j] > 0.5 * cm.max()
            ax.text(j, i, f"{names[i][j]}\n{cm[i, j]}\n{100 * cm[i, j] / total:.1f}%",
                    ha="center", va="center", fontsize=13,
                    color="white" if dark else "black")
    ax.set_xticks([0, 1], labels=list(class_names))
    ax.set_yticks([0, 1], labels=list(class_names), rotation=90, va="center")
    ax.set(xlabel="Predicted class", ylabel="True class",
           title=f"{title}\n{cm.sum()} images; % = share of all images")
    return _save(fig, path)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in history if r.get(key) is not None]
    return [r["epoch"] for r in rows], [float(r[key]) for r in rows]


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> Figure:
    if not histories:
        raise ValueError("no training histories to plot")
    cmap = "tab10" if len(histories) <= 10 else "tab20"
    palette = colormaps[cmap].colors
    fig = Figure(figsize=(11, 4.4 + 0.25 * math.ceil(len(histories) / 3)), layout="constrained")
    ax_auc, ax_loss = fig.subplots(1, 2)
    handles = []
    for i, (label, history) in enumerate(histories.items()):
        color = palette[i % len(palette)]
        ax_auc.plot(*_series(history, "val_auc"), color=color, marker="o", ms=3)
        ax_loss.plot(*_series(history, "val_loss"), color=color, marker="o", ms=3)
        ax_loss.plot(*_series(history, "train_loss"), color=color, ls="--", alpha=0.8)
        handles.append(Line2D([], [], color=color, lw=2, label=label))
    ax_auc.set(title="Validation ROC AUC per epoch", xlabel="epoch", ylabel="val AUC")
    ax_loss.set(title="Loss per epoch", xlabel="epoch", ylabel="loss (BCE)")
    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.legend(handles=[Line2D([], [], color="black", label="val"),
                            Line2D([], [], color="black", ls="--", label="train")],
                   loc="upper right", fontsize=9)
    # Trial legend below both panels, where it cannot cover a curve.
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
               fontsize=9, title="trial", frameon=False)
    n = len(histories)
    fig.suptitle(f"Training curves of the top {n} trials" if n > 1 else "Training curves")
    return _save(fig, path)


def _natural_key(label: str) -> list[tuple[int, int | str]]:
    # Numbers compare as numbers: resnet18 < resnet50 < resnet101 and [] < [256] < [512, 128].
    return [(0, int(tok)) if tok.isdigit() else (1, tok)
            for tok in re.findall(r"\d+|[^\d\W]+", label)]


def is_categorical(values: list) -> bool:
    if any(isinstance(v, (str, list, tuple, dict, bool)) or v is None for v in values):
        return True
    # A choice among a few integers (batch size, frozen epochs) reads better as columns.
    return all(float(v).is_integer() for v in values) and len(set(values)) <= 5


def category_label(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 32.0 from a JSON round trip is the batch size 32
    return str(value)


def _grid(n: int) -> tuple[int, int]:
    rows = math.ceil(n / 4)
    return rows, math.ceil(n / rows)


def plot_hparam_scatter(trials: list[dict], keys: list[str], path: Path,
                        metric: str = "val_auc") -> Figure:
    if not keys:
        raise ValueError("no hyperparameter keys to plot")
    scored = [t for t in trials if t.get(metric) is not None and not math.isnan(t[metric])]
    if not scored:
        raise ValueError(f"no trial has a {metric!r} score")
    best = max(scored, key=lambda t: t[metric])
    metric_label = METRIC_LABELS.get(metric, metric)
    rng = np.random.default_rng(0)  # jitter is seeded so the same run draws the same figure

    rows, cols = _grid(len(keys))
    # A floor on the width keeps the title and legend inside a one- or two-panel figure.
    fig = Figure(figsize=(max(3.3 * cols, 6.4), 2.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        ax.set_title(key, fontsize=11)
        points = [t for t in scored if key in t]
        if not points:
            ax.text(0.5, 0.5, "no trial has this key", ha="center", transform=ax.transAxes)
            continue
        values = [t[key] for t in points]
        y = np.array([t[metric] for t in points], dtype=float)
        if is_categorical(values):
            labels = [category_label(v) for v in values]
            categories = sorted(set(labels), key=_natural_key)
            x = np.array([categories.index(s) for s in labels], float)
            x += rng.uniform(-0.15, 0.15, len(x))
            # About 11 tick-label characters fit per inch of panel at this font size.
            crowded = sum(len(c) + 2 for c in categories) > 11 * fig.get_figwidth() / cols
            ax.set_xticks(range(len(categories)), labels=categories,
                          rotation=30 if crowded else 0, ha="right" if crowded else "center")
            ax.set_xlim(-0.5, len(categories) - 0.5)
        else:
            x = np.array(values, dtype=float)
            if len(x) and x.min() > 0 and x.max() / x.min() > 100:
                ax.set_xscale("log")
        ax.scatter(x, y, s=22, color="tab:blue", alpha=0.7, edgecolors="none")
        best_x = [xi for xi, t in zip(x, points, strict=True) if t is best]
        if best_x:
            ax.scatter(best_x, [best[metric]], s=150, marker="*", color="tab:red",
                       edgecolors="black", linewidths=0.6, zorder=3)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[: len(keys)][::cols]:
        ax.set_ylabel(f"best {metric_label}")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    best_id = f" {best['trial_id']}" if "trial_id" in best else ""
    best_label = f"best trial{best_id} ({metric_label} {best[metric]:.4f})"
    star = Line2D([], [], marker="*", color="tab:red", mec="black", ls="", ms=12, label=best_label)
    dot = Line2D([], [], marker="o", color="tab:blue", ls="", alpha=0.7, label="other trials")
    fig.legend(handles=[star, dot], loc="outside lower center", ncols=2, fontsize=9,
               frameon=False)
    fig.suptitle(f"Searched hyperparameters vs best {metric_label} ({len(scored)} trials)")
    return _save(fig, path)
