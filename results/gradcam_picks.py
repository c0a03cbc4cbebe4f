"""Which test slices the report's Grad-CAM grid shows.

Confident right calls show where the model looks when it is right and hide where it goes wrong,
and neighbouring slices of one patient look alike. So the grid takes the most confident mistakes
first, missed positives and false alarms in turn, for up to half of its places; then the most
confident right calls, positive and negative in turn; each from a group of the split (a patient,
where the split has them) not yet shown while there is one.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logit


def pick_slices(y: np.ndarray, prob: np.ndarray, threshold: float, groups: np.ndarray,
                count: int) -> list[int]:
    """Indices into the test arrays (`y`, `prob`, `groups`: the split's group of each slice) of
    up to `count` slices, mistakes first, in the order the grid shows them."""
    y, prob, groups = np.asarray(y), np.asarray(prob, dtype=float), np.asarray(groups)
    called = prob >= threshold
    # How sure the call was: its distance from the threshold on the logit scale, where 0.999
    # and 0.99 differ as much as 0.9 and 0.5 do.
    sureness = np.abs(logit(np.clip(prob, 1e-7, 1 - 1e-7))
                      - logit(np.clip(threshold, 1e-7, 1 - 1e-7)))

    def queue(mask: np.ndarray) -> list[int]:
        found = np.flatnonzero(mask)
        return found[np.argsort(-sureness[found], kind="stable")].tolist()

    mistakes = [queue((y == 1) & ~called), queue((y == 0) & called)]
    right = [queue((y == 1) & called), queue((y == 0) & ~called)]
    picks: list[int] = []
    shown: set = set()
    for kinds, quota in ((mistakes, math.ceil(count / 2)), (right, count), (mistakes, count)):
        while len(picks) < quota and any(kinds):
            for waiting in kinds:
                if len(picks) < quota and waiting:
                    pick = next((i for i in waiting if groups[i] not in shown), waiting[0])
                    waiting.remove(pick)
                    shown.add(groups[pick])
                    picks.append(pick)
    return picks
