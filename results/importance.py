"""Which searched settings mattered: Optuna's fANOVA over the search's trials.

fANOVA (Hutter, Hoos & Leyton-Brown 2014) fits a random forest to the trials' settings and
validation AUCs, then splits the variance of the forest's prediction among the settings. A forest
fitted to a handful of trials mostly fits noise, so below MIN_TRIALS scored trials no importance
is estimated and the report says why. Optuna's own fANOVA is used, with a fixed seed, so the same
trials always give the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from results.plots import category_label, is_categorical

# Fewer scored trials than this, and the report says the estimate is not reliable rather than
# show it: with 10 to 20 trials, reseeding the forest reorders settings of similar importance.
MIN_TRIALS = 20
SEED = 0


def parameter_importance(trials: Sequence[dict], keys: Sequence[str],
                         metric: str = "val_auc") -> dict:
    """{"trials": how many trials have a score, "importance": {key: share of the variance,
    summing to 1, largest first} (empty below MIN_TRIALS), "left_out": the keys that some scored
    trial lacks (a setting of one optimizer only, in runs that recorded only the settings that
    act) or that never vary}. `trials` are {key: value, ..., metric: score}."""
    scored = [t for t in trials if t.get(metric) is not None and not math.isnan(t[metric])]
    varying = [k for k in keys if all(t.get(k) is not None for t in scored)
               and len({repr(t[k]) for t in scored}) > 1]
    result = {"trials": len(scored), "importance": {},
              "left_out": [k for k in keys if k not in varying]}
    if len(scored) < MIN_TRIALS or not varying:
        return result
    # Imported here: optuna takes a second to import, and only a report of a search needs it.
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import create_trial

    distributions = {}
    for key in varying:
        values = [t[key] for t in scored]
        if is_categorical(values):  # as the hyperparameter figure draws them
            distributions[key] = CategoricalDistribution(
                sorted({category_label(v) for v in values}))
        else:
            low, high = min(map(float, values)), max(map(float, values))
            distributions[key] = FloatDistribution(low, high, log=low > 0 and high / low > 100)

    def value(key: str, raw: object) -> object:
        return (category_label(raw) if isinstance(distributions[key], CategoricalDistribution)
                else float(raw))

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        study = optuna.create_study(direction="maximize")
        study.add_trials([create_trial(params={k: value(k, t[k]) for k in varying},
                                       distributions=distributions, value=float(t[metric]))
                          for t in scored])
        importance = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=SEED))
    finally:
        optuna.logging.set_verbosity(verbosity)
    result["importance"] = {k: float(v) for k, v in importance.items()}
    return result
