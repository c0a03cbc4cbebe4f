"""Does the sensitivity a val threshold promises hold on new patients? Youden's threshold by the
rule ctscan used before issue 33 and by the midpoint rule, on many simulated val splits.

A val split of n slices (half of them positive, rounded down) has binormal scores, negatives
N(0, 1) and positives N(d, 1), given as the probability a calibrated model would give,
expit(d s - d^2 / 2). Each rule picks its threshold on the split. At that threshold the
population sensitivity is known exactly, Phi(d - s_t): it is what test splits of any size show
on average, the "test sensitivity" below. The bias is the test sensitivity minus the val
sensitivity at the same threshold (mean over splits, ± its standard error): how much of what
val promised is lost on new patients (negative: lost). Specificity likewise; choosing the
threshold on val flatters both (optimism), and a rule that favours neither loses about as
much of one as of the other. The test Youden's J stands beside the best a threshold can reach,
2 Phi(d / 2) - 1.

    python bench/threshold_bias.py [--replicates 20000] [--separation 2.0]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
from scipy.special import logit
from scipy.stats import norm
from sklearn.metrics import roc_curve

from results.metrics import youden_threshold

SIZES = (20, 63, 250)  # 63: the val split of the SARS-CoV-2 CT-scan demo run


def youden_before_issue_33(y: np.ndarray, prob: np.ndarray) -> float:
    """results.metrics.youden_threshold as it was before issue 33, copied: the threshold is the
    lowest score the best cut calls positive, and of tied cuts the first (the highest)."""
    fpr, tpr, thresholds = roc_curve(y, prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf


RULES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "old rule": youden_before_issue_33,
    "midpoint rule": youden_threshold,
}


def simulate(rule: Callable, n: int, d: float, replicates: int, seed: int) -> dict:
    """Per split: val and test (population) sensitivity and specificity at the rule's
    threshold."""
    rng = np.random.default_rng(seed)
    positives = n // 2
    y = np.r_[np.zeros(n - positives, int), np.ones(positives, int)]
    rows = []
    for _ in range(replicates):
        s = rng.normal(d * y, 1.0)
        prob = 1 / (1 + np.exp(-(d * s - d * d / 2)))
        threshold = rule(y, prob)
        cut = (logit(threshold) + d * d / 2) / d  # the threshold on the score scale
        rows.append((np.mean(prob[y == 1] >= threshold), norm.cdf(d - cut),
                     np.mean(prob[y == 0] < threshold), norm.cdf(cut)))
    val_sens, test_sens, val_spec, test_spec = np.array(rows).T
    return {"val sens": val_sens, "test sens": test_sens, "val spec": val_spec,
            "test spec": test_spec}


def _mean_se(values: np.ndarray) -> str:
    return f"{values.mean():+.4f} ± {values.std() / np.sqrt(len(values)):.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicates", type=int, default=20000,
                   help="val splits per size and rule (default: 20000)")
    p.add_argument("--separation", type=float, default=2.0,
                   help="d, the positives' mean score (default: 2.0, AUC 0.92)")
    args = p.parse_args()
    d = args.separation
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.replicates} "
          f"val splits per size and rule, the same splits for both rules; binormal d = {d} "
          f"(AUC {norm.cdf(d / np.sqrt(2)):.3f}); best test J {2 * norm.cdf(d / 2) - 1:.4f} "
          f"(sensitivity = specificity = {norm.cdf(d / 2):.4f})")
    print("bias = test (population) value at the chosen threshold - val value at it")
    print("sens - spec: sensitivity's bias minus specificity's, how much more of the loss falls "
          "on sensitivity")
    print(f"{'val n':>5} {'rule':14} {'val sens':>8} {'test sens':>9} {'sens bias':>17} "
          f"{'val spec':>8} {'test spec':>9} {'spec bias':>17} {'sens - spec':>17} "
          f"{'test J':>7}")
    bias = {}
    for n in SIZES:
        for name, rule in RULES.items():
            r = simulate(rule, n, d, args.replicates, seed=n)
            sens_bias, spec_bias = r["test sens"] - r["val sens"], r["test spec"] - r["val spec"]
            bias[n, name] = sens_bias.mean()
            print(f"{n:5d} {name:14} {r['val sens'].mean():8.4f} {r['test sens'].mean():9.4f} "
                  f"{_mean_se(sens_bias):>17} {r['val spec'].mean():8.4f} "
                  f"{r['test spec'].mean():9.4f} {_mean_se(spec_bias):>17} "
                  f"{_mean_se(sens_bias - spec_bias):>17} "
                  f"{(r['test sens'] + r['test spec'] - 1).mean():7.4f}")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"test sensitivity bias, old rule: {bias[63, 'old rule']:+.4f}; midpoint rule: "
          f"{bias[63, 'midpoint rule']:+.4f}")


if __name__ == "__main__":
    main()
