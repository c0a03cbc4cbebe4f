"""How often does each 95% interval hold the population value? The percentile bootstrap that
ctscan gave every metric before issue 33, beside the intervals score() gives now, on simulated
test splits whose population is known.

Test splits of 20, 60 and 250 units, labels Bernoulli(1/2) (a split of one class is drawn
again). Independent: a unit is one observation (a patient at patient level) with a binormal
score N(d y, 1). Clustered: a unit is a patient of 1 + Poisson(--slices - 1) slices of its
label, scored d y + u + e with u ~ N(0, icc) shared by the patient's slices and e ~ N(0, 1 - icc)
its own, scored with groups = patients. Either way a slice's score is N(d y, 1), so the
population values at the threshold are known: sensitivity Phi(d - c), specificity Phi(c), ROC
AUC Phi(d / sqrt 2), and PR AUC, Brier and ECE by integration. The probabilities are those of an
overconfident model, expit(T (d s - d^2 / 2)) with T = 1.5 (so ECE's population value is not 0);
the threshold is the one of population sensitivity --sensitivity, where a percentile interval
for a sensitivity near 1 collapses.

"old": results.metrics.bootstrap_ci, the percentile bootstrap (groups resampled when clustered)
with --resamples resamples, fewer than ctscan's 1000 so that this runs in minutes (its tails are
then a little noisier). "new": proportion_ci and auc_ci, which score() now gives accuracy,
precision, recall, specificity and ROC AUC; F1, PR AUC, Brier and ECE keep the bootstrap's. With
2000 splits a coverage near 0.95 is known to ±0.01 (two standard errors).

    python bench/interval_coverage.py [--replicates 2000] [--resamples 200] [--icc 0.3 0.8]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from results.metrics import (
    CALIBRATION,
    CALIBRATION_BINS,
    METRICS,
    PROPORTIONS,
    auc_ci,
    bootstrap_ci,
    proportion_ci,
)

SIZES = (20, 60, 250)
NEW = (*PROPORTIONS, "roc_auc")
OVERCONFIDENCE = 1.5


def population(d: float, cut: float) -> dict[str, float]:
    """Each metric's population value for slices of either class with probability 1/2, at the
    score threshold `cut`: the value the estimate of a split of unbounded size tends to."""
    sens, spec = norm.cdf(d - cut), norm.cdf(cut)
    s = np.linspace(-10, d + 10, 400001)
    step = s[1] - s[0]
    f0, f1 = norm.pdf(s), norm.pdf(s - d)  # score densities of negatives and positives
    prob = expit(OVERCONFIDENCE * (d * s - d * d / 2))
    above_pos, above_neg = norm.sf(s - d), norm.sf(s)
    gap = 0.5 * (f1 * (1 - prob) - f0 * prob) * step  # E[(y - p) ds]: ECE sums it per bin
    bins = np.minimum((prob * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    return {
        "accuracy": (sens + spec) / 2,
        "precision": sens / (sens + 1 - spec),
        "recall": sens,
        "specificity": spec,
        "f1": 2 * sens / (1 + sens + 1 - spec),
        "roc_auc": norm.cdf(d / np.sqrt(2)),
        "pr_auc": np.sum(above_pos / (above_pos + above_neg) * f1) * step,
        "brier": np.sum(0.5 * (f1 * (1 - prob) ** 2 + f0 * prob ** 2)) * step,
        "ece": np.abs(np.bincount(bins, gap, CALIBRATION_BINS)).sum(),
    }


def split(units: int, icc: float | None, d: float, slices: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(labels, scores, groups) of one test split; groups None for independent units."""
    while True:
        label = rng.integers(0, 2, units)
        if 0 < label.sum() < units:
            break
    if icc is None:
        return label, rng.normal(d * label, 1.0), None
    groups = np.repeat(np.arange(units), 1 + rng.poisson(slices - 1, units))
    shared = rng.normal(0, np.sqrt(icc), units)[groups]
    return label[groups], d * label[groups] + shared + rng.normal(0, np.sqrt(1 - icc),
                                                                  len(groups)), groups


def coverage(units: int, icc: float | None, args: argparse.Namespace, cut: float,
             truth: dict[str, float]) -> dict:
    """{"old": {metric: (covered, width) per split}, "new": ..., "auc methods": Counter}."""
    rng = np.random.default_rng(units + (0 if icc is None else int(icc * 100)))
    threshold = expit(OVERCONFIDENCE * (args.separation * cut - args.separation ** 2 / 2))
    found = {"old": {m: [] for m in METRICS + CALIBRATION}, "new": {m: [] for m in NEW},
             "auc methods": Counter()}
    for r in range(args.replicates):
        y, s, groups = split(units, icc, args.separation, args.slices, rng)
        prob = expit(OVERCONFIDENCE * (args.separation * s - args.separation ** 2 / 2))
        old = bootstrap_ci(y, prob, threshold, args.resamples, seed=r, groups=groups)
        new = proportion_ci(y, prob, threshold, groups)
        new["roc_auc"], method = auc_ci(y, prob, groups)
        found["auc methods"][method] += 1
        predicted = prob >= threshold
        # A metric counts where this split defines it (precision: something called positive).
        defined = {m: True for m in METRICS + CALIBRATION} | {"precision": predicted.any()}
        for kind, intervals in (("old", old), ("new", new)):
            for m in found[kind]:
                if defined[m]:
                    low, high = intervals[m]
                    found[kind][m].append((low <= truth[m] <= high, high - low))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicates", type=int, default=2000,
                   help="test splits per size and case (default: 2000)")
    p.add_argument("--resamples", type=int, default=200,
                   help="bootstrap resamples of the old intervals (default: 200)")
    p.add_argument("--separation", type=float, default=2.5,
                   help="d, the positives' mean score (default: 2.5, AUC 0.962)")
    p.add_argument("--sensitivity", type=float, default=0.95,
                   help="population sensitivity at the threshold (default: 0.95)")
    p.add_argument("--icc", type=float, nargs="*", default=[0.3, 0.8],
                   help="intraclass correlations of the clustered cases (default: 0.3 0.8)")
    p.add_argument("--slices", type=int, default=10, help="mean slices per patient (default: 10)")
    args = p.parse_args()
    cut = args.separation - norm.ppf(args.sensitivity)
    truth = population(args.separation, cut)
    started = time.perf_counter()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.replicates} "
          f"test splits per size and case; old: percentile bootstrap, {args.resamples} "
          f"resamples; d = {args.separation}")
    print("population: " + ", ".join(f"{m} {v:.4f}" for m, v in truth.items()))
    smallest = 1.0
    cases = [("independent units", None), *((f"patients of {args.slices} slices on average, "
                                             f"intraclass correlation {icc}", icc)
                                            for icc in args.icc)]
    for title, icc in cases:
        found = {n: coverage(n, icc, args, cut, truth) for n in SIZES}
        methods = ("wilson" if icc is None else "wilson_design_effect",
                   "delong" if icc is None else "obuchowski")
        print(f"\n{title}")
        print(f"{'':34}" + "".join(f"{f'{n} units':^28}" for n in SIZES))
        print(f"{'metric':12} {'new method':21}"
              + f"{'coverage':>14} {'mean width':>13}" * len(SIZES))
        print(f"{'':34}" + f"{'old':>7} {'new':>6} {'old':>6} {'new':>6}  " * len(SIZES))
        for m in METRICS + CALIBRATION:
            method = methods[m == "roc_auc"] if m in NEW else "bootstrap (unchanged)"
            cells = ""
            for n in SIZES:
                old = np.array(found[n]["old"][m])
                new = np.array(found[n]["new"][m]) if m in NEW else None
                if new is not None:
                    smallest = min(smallest, new[:, 0].mean())
                cells += (f"{old[:, 0].mean():7.3f} "
                          + (f"{new[:, 0].mean():6.3f}" if new is not None else f"{'-':>6}")
                          + f" {old[:, 1].mean():6.3f} "
                          + (f"{new[:, 1].mean():6.3f}" if new is not None else f"{'-':>6}")
                          + "  ")
            print(f"{m:12} {method:21}{cells.rstrip()}")
        fallback = [found[n]["auc methods"]["hanley_mcneil"] / args.replicates for n in SIZES]
        print(f"{'':12} ROC AUC splits separable or too few groups (hanley_mcneil): "
              + ", ".join(f"{f:.3f}" for f in fallback))
    print(f"\n{time.perf_counter() - started:.0f} s; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"smallest coverage: {smallest:.3f}")


if __name__ == "__main__":
    main()
