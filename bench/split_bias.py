"""Is the test split a fair sample of patients? Two split rules on patients of very unequal size.

One synthetic data set (patients with log-normal slice counts, two labels) is split with many
seeds by the rule ctscan 0.3 used (whole patients dealt largest first to the split furthest
below its slice share) and by the rule it uses now (data_utils.split.assign_groups: patients
shuffled within their label and counted out by the ratios). For each rule: test patients' mean
slices per patient over the whole data set's (1.00 when size does not decide who is tested;
mean over seeds, ± its standard error), the test share of patients and of slices, how often
the largest and the smallest quarter of patients are tested, and how much of the split a new
seed moves (consecutive seeds), against the 1 - sum(ratio^2) that independent draws move.

    python bench/split_bias.py [--patients 120] [--seeds 1000] [--sigma 1.0]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

from data_utils.split import DEFAULT_RATIOS, SPLITS, assign_groups

TEST = SPLITS.index("test")


def ctscan_0_3_largest_first(sizes: np.ndarray, stratum: np.ndarray,
                             ratios: tuple[float, float, float], rng: np.random.Generator
                             ) -> np.ndarray:
    """The rule ctscan 0.3's split_dataset used, copied as it was: within each label, groups
    largest first (random among equals), each to the split furthest below its slice share."""
    split_of_group = np.full(len(sizes), -1, np.int8)
    for label in (0, 1):
        members = np.flatnonzero(stratum == label)
        members = rng.permutation(members)
        members = members[np.argsort(-sizes[members], kind="stable")]
        target = np.asarray(ratios) * sizes[members].sum()
        filled = np.zeros(3)
        for g in members:
            k = int(np.argmax(target - filled))
            filled[k] += sizes[g]
            split_of_group[g] = k
    return split_of_group


RULES: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "old (ctscan 0.3)": lambda sizes, stratum, rng: ctscan_0_3_largest_first(
        sizes, stratum, DEFAULT_RATIOS, rng),
    "new (assign_groups)": lambda sizes, stratum, rng: assign_groups(stratum, DEFAULT_RATIOS, rng),
}


def simulate(rule: Callable, sizes: np.ndarray, stratum: np.ndarray, seeds: int) -> dict:
    """Per-seed figures of one rule (arrays over seeds), and how often the size quartiles are
    tested."""
    splits = np.array([rule(sizes, stratum, np.random.default_rng(s)) for s in range(seeds)])
    test = splits == TEST
    test_slices = test @ sizes
    moved = splits[1:] != splits[:-1]
    big, small = sizes >= np.quantile(sizes, 0.75), sizes <= np.quantile(sizes, 0.25)
    return {"mean ratio": test_slices / test.sum(1) / sizes.mean(),
            "patients": test.mean(1), "slices": test_slices / sizes.sum(),
            "moved patients": moved.mean(1), "moved slices": moved @ sizes / sizes.sum(),
            "big tested": test[:, big].mean(), "small tested": test[:, small].mean()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patients", type=int, default=120, help="patients (default: 120)")
    p.add_argument("--seeds", type=int, default=1000, help="split seeds per rule (default: 1000)")
    p.add_argument("--sigma", type=float, default=1.0,
                   help="sd of log slices per patient (default: 1.0; median 12 slices)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    sizes = np.maximum(1, np.round(rng.lognormal(np.log(12), args.sigma, args.patients))
                       ).astype(int)
    label = rng.integers(0, 2, args.patients)
    independent = 1 - sum(r * r for r in DEFAULT_RATIOS)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.patients} "
          f"patients ({np.bincount(label).tolist()} per label), slices per patient: median "
          f"{np.median(sizes):.0f}, mean {sizes.mean():.1f}, max {sizes.max()}; "
          f"{args.seeds} split seeds; ratios {DEFAULT_RATIOS}")
    print(f"{'rule':20} {'test/overall':>13} {'test share of':>23} {'tested, quarter':>17} "
          f"{'moved by a new seed':>21}")
    print(f"{'':20} {'slices/patient':>13} {'patients':>9} {'slices (sd)':>13} "
          f"{'largest':>8} {'smallest':>8} {'patients':>10} {'slices':>10}")
    results = {}
    for name, rule in RULES.items():
        r = results[name] = simulate(rule, sizes, label, args.seeds)
        ratio = r["mean ratio"]
        print(f"{name:20} {ratio.mean():6.2f} ± {ratio.std() / np.sqrt(len(ratio)):.2f}"
              f" {r['patients'].mean():9.3f} {r['slices'].mean():5.3f} ({r['slices'].std():.3f})"
              f" {r['big tested']:8.3f} {r['small tested']:8.3f}"
              f" {r['moved patients'].mean():10.3f} {r['moved slices'].mean():10.3f}")
    print(f"independent draws move 1 - sum(ratio^2) = {independent:.3f} of patients and of "
          "slices; a fair rule tests each quarter at the test share")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    old, new = results.values()
    print(f"new rule: test/overall mean slices per patient {new['mean ratio'].mean():.2f} "
          f"(target 1.00), test share of patients {new['patients'].mean():.2f} (target "
          f"{DEFAULT_RATIOS[2]:.2f}); old rule: {old['mean ratio'].mean():.2f}, "
          f"{old['patients'].mean():.2f}")


if __name__ == "__main__":
    main()
