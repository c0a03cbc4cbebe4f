"""Does ensemble selection on val hold up on data it never saw? Simulated trials, known truth.

Each replicate draws labels from a true logit and K "trials" that see it through noise, ranks
them by val AUC as a search does, and compares on a large fresh test set the test log-loss of:
the best trial alone; the old rule (average the top k, k by val AUC); Caruana selection on val
(what ctscan exports); and Caruana guarded by cross-fitting (taken only when selection run on
one half of val beats the best trial on the other half; the guard considered and rejected).
Four kinds of search: trials that err independently (an ensemble should help), trials that
are near copies of one another (it cannot), one good trial among noisy ones, and one good trial
among useless ones (where anything selection adds only fits val's noise).

    python bench/ensemble_selection.py [--replicates 50] [--val 500 63]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score

from results.evaluate import choose_ensemble

# name: (sd of the noise all trials share, sd of each trial's own noise on the true logit)
SCENARIOS = {
    "independent errors": (0.0, [1.5, 1.5, 1.6, 1.7, 1.8]),
    "near copies": (1.2, [0.1, 0.1, 0.1, 0.1, 0.1]),
    "one good, four noisy": (0.0, [1.0, 3.0, 3.0, 4.0, 4.0]),
    "one good, four useless": (0.0, [1.0, 10.0, 10.0, 10.0, 10.0]),
}


def trials(n: int, shared: float, own: list[float], rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    truth = rng.normal(0, 2.5, n)
    y = (rng.random(n) < expit(truth)).astype(int)
    common = rng.normal(0, shared, n)
    return y, np.array([expit(truth + common + rng.normal(0, sd, n)) for sd in own])


def top_k_by_val_auc(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    aucs = [roc_auc_score(y, probs[:k].mean(0)) for k in range(1, len(probs) + 1)]
    k = aucs.index(max(aucs)) + 1
    return np.r_[np.ones(k) / k, np.zeros(len(probs) - k)]


def loss(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    return log_loss(y, np.clip(weights @ probs, 1e-7, 1 - 1e-7), labels=[0, 1])


def simulate(n_val: int, n_test: int, shared: float, own: list[float], replicates: int
             ) -> dict:
    """Each method's test log-loss minus the best trial's, per replicate, and how many times
    the guard let the ensemble through."""
    rng = np.random.default_rng(0)
    gaps = {"top-k by AUC": [], "Caruana": [], "guarded": [], "taken": 0}
    for _ in range(replicates):
        y, probs = trials(n_val + n_test, shared, own, rng)
        val, test = slice(0, n_val), slice(n_val, None)
        order = np.argsort([-roc_auc_score(y[val], q[val]) for q in probs], kind="stable")
        probs = probs[order]  # ranked by val AUC, as trials.json ranks them
        best_alone = np.eye(len(probs))[0]
        single = loss(y[test], probs[:, test], best_alone)
        choice = choose_ensemble(y[val], list(probs[:, val]))
        held_out = choice["cross_fitted_log_loss"]
        guarded = (np.array(choice["weights"]) if held_out is not None
                   and held_out < choice["val_log_loss"]["single"] else best_alone)
        gaps["taken"] += guarded[0] < 1
        for method, weights in (("top-k by AUC", top_k_by_val_auc(y[val], probs[:, val])),
                                ("Caruana", np.array(choice["weights"])),
                                ("guarded", guarded)):
            gaps[method].append(loss(y[test], probs[:, test], weights) - single)
    return gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicates", type=int, default=50, help="searches simulated per kind")
    p.add_argument("--val", type=int, nargs="+", default=[500, 63],
                   help="val sizes (default: the full data set's 20%%, and the sample's)")
    p.add_argument("--test", type=int, default=10000, help="fresh slices scoring each choice")
    args = p.parse_args()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.replicates} "
          f"replicates of each search, 5 trials each, test {args.test}")
    print("test log-loss minus the best trial's (mean over replicates; < 0 is better), and how "
          "often each beat the best trial on test")
    worst = 0.0
    for n_val in args.val:
        print(f"\nval {n_val} slices")
        print(f"{'search':22} {'top-k by AUC':>16} {'Caruana (ctscan)':>17} "
              f"{'guarded Caruana':>17}   guard let through")
        for name, (shared, own) in SCENARIOS.items():
            gaps = simulate(n_val, args.test, shared, own, args.replicates)
            cells = [f"{np.mean(g):+.4f} ({np.mean(np.array(g) < 0):4.0%})"
                     for g in gaps.values() if isinstance(g, list)]
            print(f"{name:22} {cells[0]:>16} {cells[1]:>17} {cells[2]:>17}   "
                  f"{gaps['taken']}/{args.replicates}")
            worst = max(worst, np.mean(gaps["Caruana"]))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"Caruana selection, worst mean test log-loss change against the best trial: "
          f"{worst:+.4f}")


if __name__ == "__main__":
    main()
