"""Binary classification metrics with bootstrap confidence intervals (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")
CALIBRATION = ("brier", "ece")
CALIBRATION_BINS = 10  # equal-width probability bins of the reliability diagram and of ECE


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


def calibration(y: np.ndarray, prob: np.ndarray) -> dict:
    """Brier score, expected calibration error, and the reliability diagram's bins (mean
    predicted probability vs fraction positive, for each non-empty bin)."""
    bins = _bins(prob)
    count = np.bincount(bins, minlength=CALIBRATION_BINS)
    prob_sum = np.bincount(bins, prob, CALIBRATION_BINS)
    positives = np.bincount(bins, y.astype(float), CALIBRATION_BINS)
    return {
        "brier": float(brier_score_loss(y, prob, pos_label=1)),
        "ece": float(np.abs(positives - prob_sum).sum() / len(y)),
        "bins": [{"low": b / CALIBRATION_BINS, "high": (b + 1) / CALIBRATION_BINS,
                  "n": int(count[b]), "mean_prob": float(prob_sum[b] / count[b]),
                  "fraction_positive": float(positives[b] / count[b])}
                 for b in np.flatnonzero(count)],
    }


def _bins(prob: np.ndarray) -> np.ndarray:
    return np.minimum((prob * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)


def bootstrap_ci(y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int = 1000,
                 seed: int = 0, groups: np.ndarray | None = None) -> dict[str, list[float]]:
    """95% percentile intervals of METRICS and CALIBRATION from `resamples` seeded resamples.

    Without `groups` the images are resampled (with replacement); with them whole groups are,
    so slices of one patient come and go together and the interval reflects how many patients,
    not slices, were tested. Every metric is counted from per-group sums for all resamples at
    once (calling scikit-learn 5000 times costs minutes); the counts equal binary_metrics' on
    each resample (tested). Resamples drawing a single class leave the AUCs undefined and are
    left out of those two; "resamples_dropped" says how many.
    """
    resampled = _Resamples(len(y), resamples, seed, groups)
    total = resampled.total
    positive, predicted = y == 1, prob >= threshold
    tp, fp = total(predicted & positive), total(predicted & ~positive)
    fn, n = total(~predicted & positive), total(np.ones(len(y)))
    tn = n - tp - fp - fn
    bins = _bins(prob)
    gap = sum(np.abs(total((bins == b) * (y - prob))) for b in range(CALIBRATION_BINS))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {
            "accuracy": (tp + tn) / n,
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),  # zero_division=0
            "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "specificity": tn / (tn + fp),
            "f1": np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            "brier": total((prob - y) ** 2) / n,
            "ece": gap / n,
        }
    ranked = resampled.ranking_scores(y, prob)
    both = ~np.isnan(ranked["roc_auc"])
    values.update({m: ranked[m][both] if both.any() else np.array([np.nan]) for m in ranked})
    return {**{m: _interval(values[m]) for m in METRICS + CALIBRATION},
            "resamples_dropped": int(resamples - both.sum())}


# The differences a paired comparison reports: chosen minus compared.
PAIRED = ("roc_auc", "accuracy", "brier")


def paired_bootstrap(y: np.ndarray, prob_a: np.ndarray, threshold_a: float, prob_b: np.ndarray,
                     threshold_b: float, resamples: int = 1000, seed: int = 0,
                     groups: np.ndarray | None = None) -> dict:
    """Model a minus model b on the same slices: {metric: {"value", "ci95"}} for PAIRED, and
    "resamples_dropped". Both are scored on the same resamples (drawn as bootstrap_ci draws them
    with this seed and groups), so the interval is that of the difference itself: narrower than
    two separate intervals would suggest whenever the models err on the same slices."""
    resampled = _Resamples(len(y), resamples, seed, groups)
    n = resampled.total(np.ones(len(y)))

    def correct(prob: np.ndarray, threshold: float) -> np.ndarray:
        return (prob >= threshold) == (y == 1)

    auc_a_minus_b = (resampled.ranking_scores(y, prob_a)["roc_auc"]
                     - resampled.ranking_scores(y, prob_b)["roc_auc"])
    everyone = np.ones((1, len(y)))  # the data's own difference, computed as the resamples'
    auc_value = (ranking_scores(y, prob_a, everyone)["roc_auc"]
                 - ranking_scores(y, prob_b, everyone)["roc_auc"])[0]
    both = ~np.isnan(auc_a_minus_b)
    a_minus_b = {
        "roc_auc": (auc_value, auc_a_minus_b[both] if both.any() else [np.nan]),
        "accuracy": (np.mean(correct(prob_a, threshold_a)) - np.mean(correct(prob_b, threshold_b)),
                     resampled.total(correct(prob_a, threshold_a).astype(float)
                                     - correct(prob_b, threshold_b)) / n),
        "brier": (np.mean((prob_a - y) ** 2) - np.mean((prob_b - y) ** 2),
                  resampled.total((prob_a - y) ** 2 - (prob_b - y) ** 2) / n),
    }
    return {**{m: {"value": float(value), "ci95": _interval(np.asarray(draws))}
               for m, (value, draws) in a_minus_b.items()},
            "resamples_dropped": int(resamples - both.sum())}


def _interval(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.nanpercentile(values, [2.5, 97.5])]


class _Resamples:
    """`resamples` seeded bootstrap draws of n rows, or of whole groups when `groups` is given;
    the same seed and groups draw the same resamples, so two models can be scored on them."""

    def __init__(self, n: int, resamples: int, seed: int, groups: np.ndarray | None):
        self.groups = np.arange(n) if groups is None else np.unique(groups, return_inverse=True)[1]
        n_groups = self.groups.max() + 1
        draws = np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups))
        # times[r, g]: how often resample r drew group g; a resample's sums are times @ sums.
        self.times = np.zeros((resamples, n_groups))
        np.add.at(self.times, (np.arange(resamples)[:, None], draws), 1)

    def total(self, values: np.ndarray) -> np.ndarray:
        """Each resample's sum of `values` (one per row)."""
        return self.times @ np.bincount(self.groups, values.astype(float), self.times.shape[1])

    def ranking_scores(self, y: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
        """Each resample's ROC AUC and average precision (ranking_scores), in chunks of
        resamples that bound the memory."""
        chunks = max(1, len(self.times) * len(self.groups) // 2**22)
        scores = [ranking_scores(y, prob, times[:, self.groups])
                  for times in np.array_split(self.times, chunks)]
        return {m: np.concatenate([s[m] for s in scores]) for m in RANKING}


RANKING = ("roc_auc", "pr_auc")


def ranking_scores(y: np.ndarray, prob: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """ROC AUC and average precision of each draw of the rows, counts[draw, row] being how often
    the draw holds the row; NaN for a draw of one class. They equal scikit-learn's roc_auc_score
    and average_precision_score on each draw's rows (tested), but come from how often each
    distinct score was drawn among positives and negatives, for all draws at once: calling
    scikit-learn per resample took 2 ms a pair, seconds for each interval at the default 1000
    resamples. The data's own scores (every row once) are computed here too, so that an interval
    reaching the estimate holds it to the last bit."""
    _, at = np.unique(prob, return_inverse=True)  # each row's distinct score, ascending
    offsets = np.arange(len(counts))[:, None] * (at.max() + 1)

    def drawn(rows: np.ndarray) -> np.ndarray:  # [draw, distinct score]: how often drawn
        return np.bincount((offsets + at[rows]).ravel(), counts[:, rows].ravel(),
                           offsets.size * (at.max() + 1)).reshape(len(counts), -1)

    pos, neg = drawn(y == 1), drawn(y != 1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    # Mann-Whitney: a positive outranks the negatives below it and ties half of those level.
    below = np.cumsum(neg, 1) - neg
    # Thresholds from the top score down: the precision at each, by the recall it adds.
    tp, fp = np.cumsum(pos[:, ::-1], 1), np.cumsum(neg[:, ::-1], 1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos * (below + neg / 2)).sum(1) / (n_pos * n_neg)
        ap = (pos[:, ::-1] * precision).sum(1) / n_pos
    one_class = (n_pos == 0) | (n_neg == 0)
    auc[one_class] = ap[one_class] = np.nan
    return {"roc_auc": auc, "pr_auc": ap}


def score(y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int = 1000,
          seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """{"metrics": {name: {"value", "ci95"}}, "confusion_matrix": [[tn, fp], [fn, tp]],
    "calibration": {"brier", "ece": {"value", "ci95"}, "bins": [...]}, "resamples_dropped": how
    many resamples drew one class only and were left out of the AUCs' intervals}."""
    values = {**binary_metrics(y, prob, threshold),
              **{m: v[0] for m, v in ranking_scores(y, prob, np.ones((1, len(y)))).items()}}
    intervals = bootstrap_ci(y, prob, threshold, resamples, seed, groups)
    dropped = intervals.pop("resamples_dropped")
    calibrated = calibration(y, prob)
    cm = confusion_matrix(y, (prob >= threshold).astype(int), labels=[0, 1])
    return {
        "metrics": {m: {"value": float(values[m]), "ci95": intervals[m]} for m in METRICS},
        "confusion_matrix": cm.tolist(),
        "calibration": {**{m: {"value": calibrated[m], "ci95": intervals[m]}
                           for m in CALIBRATION}, "bins": calibrated["bins"]},
        "resamples_dropped": dropped,
    }


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these labels."""
    fpr, tpr, thresholds = roc_curve(y, prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf
