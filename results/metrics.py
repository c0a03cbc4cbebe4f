"""Binary classification metrics with bootstrap confidence intervals (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric of METRICS; AUCs are nan when only one class is present."""
    pred = (prob >= threshold).astype(int)
    tn, fp, _, _ = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    return {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": f1_score(y, pred, zero_division=0),
        "roc_auc": roc_auc_score(y, prob) if both else float("nan"),
        "pr_auc": average_precision_score(y, prob) if both else float("nan"),
    }


def bootstrap_ci(y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int = 1000,
                 seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals from `resamples` seeded resamples of the images (with replacement).

    The threshold metrics are counted for all resamples at once (calling scikit-learn 5000
    times costs minutes); they equal binary_metrics' on each resample (tested). Resamples
    drawing a single class leave the AUCs undefined and are left out of those two.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y), size=(resamples, len(y)))
    positive, predicted = y[draws] == 1, prob[draws] >= threshold
    tp = (predicted & positive).sum(1)
    fp = (predicted & ~positive).sum(1)
    fn = (~predicted & positive).sum(1)
    tn = len(y) - tp - fp - fn
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {
            "accuracy": (tp + tn) / len(y),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),  # zero_division=0
            "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "specificity": tn / (tn + fp),
            "f1": np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }
    both = [i for i in draws if 0 < y[i].sum() < len(i)]
    values["roc_auc"] = np.array([roc_auc_score(y[i], prob[i]) for i in both] or [np.nan])
    values["pr_auc"] = np.array([average_precision_score(y[i], prob[i]) for i in both]
                                or [np.nan])
    return {m: [float(v) for v in np.nanpercentile(values[m], [2.5, 97.5])] for m in METRICS}


def score(y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int = 1000,
          seed: int = 0) -> dict:
    """{"metrics": {name: {"value", "ci95"}}, "confusion_matrix": [[tn, fp], [fn, tp]]}."""
    values = binary_metrics(y, prob, threshold)
    intervals = bootstrap_ci(y, prob, threshold, resamples, seed)
    cm = confusion_matrix(y, (prob >= threshold).astype(int), labels=[0, 1])
    return {
        "metrics": {m: {"value": float(values[m]), "ci95": intervals[m]} for m in METRICS},
        "confusion_matrix": cm.tolist(),
    }


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these labels."""
    fpr, tpr, thresholds = roc_curve(y, prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf
