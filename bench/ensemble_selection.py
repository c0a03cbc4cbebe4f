"""Does ensemble selection on val hold up on data it never saw? Simulated trials, known truth.

Each replicate draws labels from a true logit and K "trials" that see it through noise, each on
its own scale (a trial trained to be overconfident has logits too large, one trained with label
smoothing too small), ranks them by val AUC as a search does, and scores on a large fresh test
set, against the best trial alone:
- today's rule (ctscan 0.3): Caruana selection on the members' raw val probabilities;
- the new rule (results.evaluate.choose_ensemble): each member first calibrated by its own
  temperature (cross-fitted on val halves), Caruana selection on those, the exported mean of
  calibrated members, and that mean's own temperature (ensemble_temperature: a mean of
  calibrated members is less confident than it should be).
Kinds of search: trials that err independently (an ensemble should help), near copies (it
cannot), one good trial among noisy or useless ones (anything selection adds fits val's noise),
and two where the trials' scales differ: a strong but overconfident trial among weak ones kept
from 0 and 1, and every trial overconfident.

    python bench/ensemble_selection.py [--replicates 50] [--val 500 63]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score

from results.evaluate import caruana_weights, choose_ensemble, combine, ensemble_temperature

# name: (sd of the noise all trials share, each trial's own noise sd, each trial's logit scale)
SCENARIOS = {
    "independent errors": (0.0, [1.5, 1.5, 1.6, 1.7, 1.8], [1] * 5),
    "near copies": (1.2, [0.1] * 5, [1] * 5),
    "one good, four noisy": (0.0, [1.0, 3.0, 3.0, 4.0, 4.0], [1] * 5),
    "one good, four useless": (0.0, [1.0, 10.0, 10.0, 10.0, 10.0], [1] * 5),
    "strong overconfident, weak smoothed": (0.0, [0.7, 2.5, 2.5, 3.0, 3.0],
                                            [6, 0.3, 0.3, 0.3, 0.3]),
    "all overconfident": (0.0, [1.5, 1.5, 1.6, 1.7, 1.8], [4, 3, 4, 3, 4]),
}
OVERCONFIDENT = "strong overconfident, weak smoothed"


def trials(n: int, shared: float, own: list[float], scales: list[float],
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    truth = rng.normal(0, 2.5, n)
    y = (rng.random(n) < expit(truth)).astype(int)
    common = rng.normal(0, shared, n)
    return y, np.array([expit(scale * (truth + common + rng.normal(0, sd, n)))
                        for sd, scale in zip(own, scales, strict=True)])


def scores(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """(log-loss, ROC AUC)."""
    return np.array([log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1]),
                     roc_auc_score(y, prob)])


def simulate(n_val: int, n_test: int, shared: float, own: list[float], scales: list[float],
             replicates: int) -> dict[str, np.ndarray]:
    """Per replicate, each rule's test (log-loss, AUC) minus the best trial's."""
    rng = np.random.default_rng(0)
    gaps = {"today": [], "new": []}
    for _ in range(replicates):
        y, probs = trials(n_val + n_test, shared, own, scales, rng)
        val, test = slice(0, n_val), slice(n_val, None)
        order = np.argsort([-roc_auc_score(y[val], q[val]) for q in probs], kind="stable")
        probs = probs[order]  # ranked by val AUC, as trials.json ranks them
        single = scores(y[test], probs[0, test])
        today, _ = caruana_weights(y[val], probs[:, val])
        choice = choose_ensemble(y[val], list(probs[:, val]))
        weights, temperatures = choice["weights"], choice["member_temperatures"]
        temperature = ensemble_temperature(y[val], list(probs[:, val]), weights, temperatures)
        tested = list(probs[:, test])
        gaps["today"].append(scores(y[test], combine(tested, today.tolist())) - single)
        gaps["new"].append(scores(y[test], combine(tested, weights, temperature,
                                                   temperatures)) - single)
    return {rule: np.array(g) for rule, g in gaps.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicates", type=int, default=50, help="searches simulated per kind")
    p.add_argument("--val", type=int, nargs="+", default=[500, 63],
                   help="val sizes (default: the full data set's 20%%, and the sample's)")
    p.add_argument("--test", type=int, default=10000, help="fresh slices scoring each choice")
    args = p.parse_args()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.replicates} "
          f"replicates of each search, 5 trials each, test {args.test}")
    print("test log-loss and ROC AUC minus the best trial's (mean over replicates; log-loss < 0 "
          "and AUC > 0 are better); new - today with its standard error over replicates")
    worst, overconfident = (-np.inf, ""), None
    for n_val in args.val:
        print(f"\nval {n_val} slices")
        print(f"{'search':37} {'today: log-loss':>15} {'AUC':>8} {'new: log-loss':>14} "
              f"{'AUC':>8}   new - today log-loss")
        for name, (shared, own, scales) in SCENARIOS.items():
            gaps = simulate(n_val, args.test, shared, own, scales, args.replicates)
            diff = gaps["new"][:, 0] - gaps["today"][:, 0]
            se = diff.std(ddof=1) / np.sqrt(len(diff))
            today, new = gaps["today"].mean(0), gaps["new"].mean(0)
            print(f"{name:37} {today[0]:+15.4f} {today[1]:+8.4f} {new[0]:+14.4f} "
                  f"{new[1]:+8.4f}   {diff.mean():+.4f} ± {se:.4f}")
            if diff.mean() - se > worst[0]:
                worst = (diff.mean() - se, f"{name}, val {n_val}: {diff.mean():+.4f} ± {se:.4f}")
            if name == OVERCONFIDENT and n_val == args.val[-1]:
                overconfident = f"{diff.mean():+.4f} ± {se:.4f}"
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"new rule minus today's test log-loss, the least favourable (mean - se): "
          f"{worst[1]}; {OVERCONFIDENT}, val {args.val[-1]}: {overconfident}")


if __name__ == "__main__":
    main()
