"""A patient's (or a CT series') probability from its slices' probabilities.

Numpy only: `ctscan predict` uses it and starts without scikit-learn, scipy or torch.
"""

from __future__ import annotations

import numpy as np

# How a patient's slice probabilities become one, in order of preference on a tie: the mean is
# the least noisy, the maximum the noisiest (one odd slice decides it).
AGGREGATES = ("mean", "top25", "max")
CHOOSE_AGGREGATE = "choose"  # instead of one of AGGREGATES: the best on val (results.evaluate)


def aggregate_by_group(prob: np.ndarray, groups: np.ndarray, method: str
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(group ids, ascending; each group's probability): the mean, the maximum, or ("top25")
    the mean of the top quarter of its slices, rounded down but at least one slice, so a
    lesion seen on a few slices of a long series is not averaged away."""
    if method not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {method!r}")
    ids, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    prob = np.asarray(prob, dtype=np.float64)
    if method == "mean":
        return ids, np.bincount(inverse, prob) / sizes
    # Slices sorted by group, then by probability, highest first: each group's top k slices
    # are the first k of its run.
    order = np.lexsort((-prob, inverse))
    starts = np.cumsum(sizes) - sizes
    rank = np.arange(len(prob)) - np.repeat(starts, sizes)
    k = np.ones_like(sizes) if method == "max" else np.maximum(sizes // 4, 1)
    top = rank < np.repeat(k, sizes)
    return ids, np.bincount(inverse[order][top], prob[order][top], len(ids)) / k
