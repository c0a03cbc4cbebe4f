"""Binary classification metrics with confidence intervals (scikit-learn underneath), and the
decision thresholds chosen on validation."""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
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


Z95 = float(norm.ppf(0.975))
# The proportions of METRICS: (successes, trials) counted per slice by _counted.
PROPORTIONS = ("accuracy", "precision", "recall", "specificity")


def wilson_interval(successes: float, trials: float, z: float = Z95) -> list[float]:
    """Wilson's (1927) score interval of a proportion: the values p whose score test against
    successes / trials does not reject. Unlike a percentile bootstrap it neither collapses to a
    point at 0 or `trials` successes nor leaves [0, 1], and its coverage stays near nominal
    down to a few trials (Brown, Cai & DasGupta 2001); no trials give [0, 1]. Successes and
    trials may be effective (non-integer) counts."""
    spread = successes * (trials - successes) / trials if trials > 0 else 0.0
    centre = (successes + z * z / 2) / (trials + z * z)
    half = z * np.sqrt(spread + z * z / 4) / (trials + z * z)
    # At 0 or all successes the bound is the estimate itself, exactly (not to the last bit).
    return [0.0 if successes <= 0 else float(centre - half),
            1.0 if successes >= trials else float(centre + half)]


def _counted(y: np.ndarray, prob: np.ndarray, threshold: float
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each of PROPORTIONS as (success, trial) indicators per slice."""
    positive, predicted = y == 1, prob >= threshold
    return {"accuracy": (predicted == positive, np.ones(len(y), bool)),
            "precision": (predicted & positive, predicted),
            "recall": (predicted & positive, positive),
            "specificity": (~predicted & ~positive, ~positive)}


def proportion_ci(y: np.ndarray, prob: np.ndarray, threshold: float,
                  groups: np.ndarray | None = None) -> dict[str, list[float]]:
    """95% Wilson intervals of PROPORTIONS at `threshold`.

    Without `groups` each row is an independent observation (a patient, at patient level) and
    the interval is Wilson's on the counts. With them (slices of patients) the slices of a group
    are not independent and a Wilson interval on slice counts would undercover; it is taken at
    the effective counts of _effective_counts instead."""
    counted = _counted(y, prob, threshold)
    if groups is None:
        return {m: wilson_interval(float(x.sum()), float(n.sum()))
                for m, (x, n) in counted.items()}
    group = np.unique(groups, return_inverse=True)[1]
    return {m: wilson_interval(*_effective_counts(np.bincount(group, x), np.bincount(group, n)))
            for m, (x, n) in counted.items()}


def _effective_counts(successes: np.ndarray, trials: np.ndarray) -> tuple[float, float]:
    """(successes, trials) of a proportion pooled over groups (per-group counts), scaled to the
    number of independent observations they are worth: Kish's design effect of the ratio
    estimator, from the groups' linearised (cluster-robust) variance and truncated at 1, with
    Korn & Graubard's (1998) degrees-of-freedom correction n_eff * (z / t_df)^2, t_df _t95's.

    Satterthwaite's df rather than Korn & Graubard's groups - 1: when a few groups hold all the
    errors (sensitivity 0.95, errors in 2 of 30 patients) the variance rests on those few, and
    with groups - 1 the coverage of sensitivity fell to 0.87 (60 patients of 10 slices,
    intraclass correlation 0.8, simulated as bench/interval_coverage.py does). The effective
    number lies between Kish's effective number of groups (sum n_g)^2 / sum n_g^2, what the
    groups are worth if their slices are all alike, and the number of slices; at 0 or all
    successes (or residuals all 0) nothing measures the design effect and it is the former.
    """
    used = trials > 0
    successes, trials = successes[used], trials[used]
    total = trials.sum()
    if total == 0:
        return 0.0, 0.0
    rate = successes.sum() / total
    alike = total ** 2 / np.sum(trials ** 2)
    squares = (successes - rate * trials) ** 2
    if not squares.any():
        return rate * alike, alike
    groups = len(trials)
    design_effect = groups / (groups - 1) * squares.sum() / (total * rate * (1 - rate))
    effective = total / max(design_effect, 1.0) * (Z95 / _t95(squares)) ** 2
    effective = float(np.clip(effective, alike, total))
    return rate * effective, effective


def _t95(squares: np.ndarray) -> float:
    """The 97.5% t quantile for a variance summed from these groups' squared residuals, at
    Satterthwaite's (1946) df (sum s)^2 / sum s^2, scaled by (groups - 1) / groups so that equal
    residuals give Korn & Graubard's (1998) groups - 1 (as do residuals all 0)."""
    groups, total = len(squares), squares.sum()
    df = (total ** 2 / np.sum(squares ** 2) if total > 0 else groups) * (groups - 1) / groups
    return float(student_t.ppf(0.975, df))


def auc_ci(y: np.ndarray, prob: np.ndarray, groups: np.ndarray | None = None
           ) -> tuple[list[float], str]:
    """95% interval of ROC AUC and the method that made it.

    "delong": DeLong, DeLong & Clarke-Pearson's (1988) variance from the placements of each
    positive among the negatives and each negative among the positives. "obuchowski": with
    `groups`, Obuchowski's (1997) clustered form of it, the placements summed within each group,
    so slices of a patient are not counted as independent; a t quantile with Satterthwaite's df
    (as in _effective_counts) in place of z. Either is taken on the logit scale (Pepe 2003,
    5.2), which keeps the interval inside (0, 1) and reaches further down than up, as the AUC's
    sampling distribution does near 1. "hanley_mcneil": where that variance is 0 or undefined
    (a separable split, fewer than two groups of a class), Wilson's interval at the effective
    number of pairs that Hanley & McNeil's (1982) variance gives at this AUC in Newcombe's
    (2006) form, each class counted in Kish's effective number of groups (as _effective_counts
    does at 0 or all successes). [nan, nan] for one class.
    """
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int(len(y) - positive.sum())
    if not n_pos or not n_neg:
        return [float("nan")] * 2, "delong" if groups is None else "obuchowski"
    group = np.arange(len(y)) if groups is None else np.unique(groups, return_inverse=True)[1]
    pos_sorted, neg_sorted = np.sort(prob[positive]), np.sort(prob[~positive])
    # Placements, a tie counting half: the share of negatives below each positive, and of
    # positives above each negative. Their mean is the AUC.
    below = (np.searchsorted(neg_sorted, prob[positive], "left")
             + np.searchsorted(neg_sorted, prob[positive], "right")) / (2 * n_neg)
    above = (2 * n_pos - np.searchsorted(pos_sorted, prob[~positive], "left")
             - np.searchsorted(pos_sorted, prob[~positive], "right")) / (2 * n_pos)
    auc = float(below.mean())
    n_groups = group.max() + 1
    pos_sum = np.bincount(group[positive], below - auc, n_groups)
    neg_sum = np.bincount(group[~positive], above - auc, n_groups)
    pos_rows = np.bincount(group[positive], minlength=n_groups)
    neg_rows = np.bincount(group[~positive], minlength=n_groups)
    k_pos, k_neg = np.count_nonzero(pos_rows), np.count_nonzero(neg_rows)
    if k_pos > 1 and k_neg > 1 and 0 < auc < 1:
        # Obuchowski's S10 / m + S01 / n + 2 S11 / (mn); with one row per group, DeLong's.
        variance = (k_pos / (k_pos - 1) * np.sum(pos_sum ** 2) / n_pos ** 2
                    + k_neg / (k_neg - 1) * np.sum(neg_sum ** 2) / n_neg ** 2
                    + 2 * n_groups / (n_groups - 1) * np.sum(pos_sum * neg_sum) / (n_pos * n_neg))
        if variance > 0:
            quantile = Z95 if groups is None else _t95((pos_sum / n_pos + neg_sum / n_neg) ** 2)
            half = quantile * np.sqrt(variance) / (auc * (1 - auc))
            return ([float(expit(logit(auc) - half)), float(expit(logit(auc) + half))],
                    "delong" if groups is None else "obuchowski")
    m, n = n_pos ** 2 / np.sum(pos_rows ** 2), n_neg ** 2 / np.sum(neg_rows ** 2)
    pairs = m * n / (1 + ((m + n) / 2 - 1) * ((1 - auc) / (2 - auc) + auc / (1 + auc)))
    return wilson_interval(auc * pairs, pairs), "hanley_mcneil"


def score(y: np.ndarray, prob: np.ndarray, threshold: float, resamples: int = 1000,
          seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """{"metrics": {name: {"value", "ci95"}}, "confusion_matrix": [[tn, fp], [fn, tp]],
    "calibration": {"brier", "ece": {"value", "ci95"}, "bins": [...]}, "resamples_dropped": how
    many resamples drew one class only and were left out of PR AUC's interval, "intervals":
    {name: the method of its ci95}}.

    PROPORTIONS get Wilson intervals ("wilson"; "wilson_design_effect" with `groups`), ROC AUC
    auc_ci's; F1, PR AUC, Brier and ECE percentile intervals of bootstrap_ci ("bootstrap"),
    resampling groups when there are some. bench/interval_coverage.py measures their coverage.
    """
    values = {**binary_metrics(y, prob, threshold),
              **{m: v[0] for m, v in ranking_scores(y, prob, np.ones((1, len(y)))).items()}}
    intervals = bootstrap_ci(y, prob, threshold, resamples, seed, groups)
    dropped = intervals.pop("resamples_dropped")
    intervals.update(proportion_ci(y, prob, threshold, groups))
    intervals["roc_auc"], auc_method = auc_ci(y, prob, groups)
    methods = {**{m: "bootstrap" for m in METRICS + CALIBRATION},
               **{m: "wilson" if groups is None else "wilson_design_effect" for m in PROPORTIONS},
               "roc_auc": auc_method}
    calibrated = calibration(y, prob)
    cm = confusion_matrix(y, (prob >= threshold).astype(int), labels=[0, 1])
    return {
        "metrics": {m: {"value": float(values[m]), "ci95": intervals[m]} for m in METRICS},
        "confusion_matrix": cm.tolist(),
        "calibration": {**{m: {"value": calibrated[m], "ci95": intervals[m]}
                           for m in CALIBRATION}, "bins": calibrated["bins"]},
        "resamples_dropped": dropped,
        "intervals": methods,
    }


def _cuts(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct scores, highest first, and the true and false positives of the rule
    "positive when prob >= score" at each."""
    scores, at = np.unique(prob, return_inverse=True)
    positive = y == 1
    tp = np.cumsum(np.bincount(at, positive, len(scores))[::-1])
    fp = np.cumsum(np.bincount(at, ~positive, len(scores))[::-1])
    return scores[::-1], tp, fp


def _between(scores: np.ndarray, k: int) -> float:
    """A threshold that calls scores[k] (scores highest first) and those above it positive and
    the rest negative: midway to the next lower score, or to 0 (the lowest probability) below
    the lowest. On scores[k] itself, a positive of val's right at the cut, new positives scored
    a little lower would be missed: with 63 val slices sensitivity then lost 0.019 more than
    specificity on new data, at the midpoint neither more (bench/threshold_bias.py)."""
    upper = float(scores[k])
    lower = float(scores[k + 1]) if k + 1 < len(scores) else 0.0
    cut = (upper + lower) / 2
    return cut if cut > lower else upper  # adjacent floats: no number lies between


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold maximising Youden's (1950) J = sensitivity + specificity - 1 on these
    labels, placed midway between the lowest score it calls positive and the next lower score
    (0 below the lowest). Among cuts of equal J it takes the middle one in score order; of an
    even number, the lower of the middle two (the more sensitive). At least one slice is called
    positive."""
    scores, tp, fp = _cuts(y, prob)
    if not tp[-1] or not fp[-1]:
        raise ValueError("Youden's J needs both classes")
    j = tp * fp[-1] - fp * tp[-1]  # J * positives * negatives: integers, so ties are exact
    best = np.flatnonzero(j == j.max())
    return _between(scores, int(best[len(best) // 2]))


def sensitivity_threshold(y: np.ndarray, prob: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on these labels is at least `target` (in (0, 1]),
    a rule fixed before the data are seen, placed midway between adjacent scores as
    youden_threshold's."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity {target} is not in (0, 1]")
    scores, tp, _ = _cuts(y, prob)
    if not tp[-1]:
        raise ValueError("sensitivity needs positives")
    # The first cut, from the top, that reaches the target; the lowest reaches sensitivity 1.
    return _between(scores, int(np.argmax(tp / tp[-1] >= target)))
