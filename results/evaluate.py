"""`ctscan evaluate RUN_DIR`: score the search's winner once on the held-out test split.

This is the only code that reads test images. The threshold is chosen on the validation split
first and then applied unchanged to the test split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.metrics import log_loss, roc_auc_score

from ctmodels import ModelDescription, load_model, predict_proba
from data_utils import runfolder
from data_utils.cache import CTDataset
from data_utils.errors import RunFolderError
from data_utils.files import write_json
from data_utils.sources import DataError
from data_utils.split import PERSON_UNITS, load_data_options, recorded_unit, slice_key
from results.aggregate import AGGREGATES, CHOOSE_AGGREGATE, aggregate_by_group
from results.metrics import paired_bootstrap, score, sensitivity_threshold, youden_threshold
from results.wording import COMPARED_BEST, COMPARED_RUNNER_UP, source_of_files
from tuning.config import make_config
from tuning.records import SearchOptions, load_options

# What evaluation reads of best.json and split.json.
BEST_KEYS = ("trial_id", "checkpoint", "config", "searched", "trials", "trials_stopped_early",
             "errored_trials", "time_budget_s", "budget_reached")
SPLIT_KEYS = ("files", "group_by", "counts", "seed")
TEST_PATIENTS = "test_patients.json"  # beside test_predictions.json in results/


def _read_json(run_dir: str, name: str, keys: tuple[str, ...]) -> tuple[dict, str]:
    """A run file's content, checked to hold `keys`, and its text (hashed into metrics.json for
    split.json)."""
    location = runfolder.join(run_dir, name)
    text = runfolder.read_text(location)
    if text is None:
        raise RunFolderError(f"{location}: not found; is {run_dir} a finished ctscan search?")
    return runfolder.require_keys(runfolder.parse_json(text, location), keys, location), text


def recorded_rows(ds: CTDataset, split_json: dict, name: str) -> np.ndarray:
    """Rows of `ds` holding split `name` of split.json, found by content (sha256, frame): every
    slice must still be there, byte-identical, wherever its file now lies."""
    rows_of: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(zip(ds.sha256, ds.frames, strict=True)):
        rows_of.setdefault(key, []).append(i)
    rows = []
    for entry in split_json["files"]:  # byte-identical copies: one row each, as recorded
        if entry["split"] != name:
            continue
        row = (rows_of.get(slice_key(entry)) or [None]).pop(0)
        if row is None:
            raise DataError(f"{ds.root}: {name} slice {entry['path']} of split.json is missing, "
                            "changed or no longer readable")
        rows.append(row)
    return np.array(rows, dtype=np.int64)


def recorded_groups(split_json: dict, name: str) -> np.ndarray:
    """The split's group of each row of `recorded_rows(..., name)`: the unit the bootstrap
    resamples, so that slices kept together by the split also count as one observation."""
    return np.array([e["group"] for e in split_json["files"] if e["split"] == name])


Member = tuple[torch.nn.Module, ModelDescription]  # a network and how to feed it


def load_checkpoint_model(checkpoint: str) -> Member:
    """The trial's network from its checkpoint (a local path or a storage URI), with its
    description."""
    with runfolder.local_path(checkpoint) as local:
        return load_model(local)


SENSITIVITY_RULE = "sensitivity:"  # --threshold sensitivity:0.95, a rule fixed in advance


def choose_threshold(y_val: np.ndarray, prob_val: np.ndarray, rule: float | str | None) -> dict:
    """The decision threshold by `rule`: a number, fixed; "sensitivity:S", the highest
    threshold that reaches sensitivity S on val (a target set before the data are seen); or
    None, Youden's J on val (results.metrics places both between adjacent val scores)."""
    if isinstance(rule, (int, float)):
        return {"method": "fixed", "value": float(rule)}
    if len(np.unique(y_val)) < 2:
        raise DataError("the validation split holds one class only, so no threshold can be "
                        "chosen on it; give one with --threshold, or split with more data")
    if isinstance(rule, str) and rule.startswith(SENSITIVITY_RULE):
        target = float(rule.removeprefix(SENSITIVITY_RULE))
        return {"method": "sensitivity", "target": target,
                "value": sensitivity_threshold(y_val, prob_val, target)}
    return {"method": "youden", "value": youden_threshold(y_val, prob_val)}


ENSEMBLE_ROUNDS = 20  # Caruana's bag size: a member's weight is a multiple of 1/20 at least


def _log_loss(y: np.ndarray, prob: np.ndarray) -> float:
    # Clipped as the logits are (_logit): one confident mistake must not make it infinite.
    return float(log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1]))


def caruana_weights(y: np.ndarray, member_probs: Sequence[np.ndarray],
                    rounds: int = ENSEMBLE_ROUNDS,
                    calibrated: bool = False) -> tuple[np.ndarray, float]:
    """Ensemble selection (Caruana et al., ICML 2004) as auto-sklearn and AutoGluon run it:
    greedy forward selection with replacement. Each round adds to a bag the member whose
    addition gives the bag's mean probability the lowest log-loss (the better-ranked member on
    a tie); the bag kept is that of the round with the lowest log-loss, the earliest on a tie.
    Returns (each member's share of that bag, summing to 1; its log-loss).

    Log-loss, not AUC: a proper score rewards probabilities that are right, so it still tells
    models apart where every AUC is near 1, and it is what the mean of probabilities, unlike a
    ranking, can improve. `calibrated`: each bag's mean is scored after its own temperature
    (fit_temperature), as the exported ensemble's is: a mean of calibrated members is less
    confident than the evidence it pools, and scored as it is, it would undervalue members
    that err differently."""
    probs = np.asarray(member_probs, dtype=np.float64)
    counts, total = np.zeros(len(probs)), np.zeros(probs.shape[1])
    best_loss, best_counts = np.inf, counts

    def bag_loss(mean: np.ndarray) -> float:
        if not calibrated:
            return _log_loss(y, mean)
        return _log_loss(y, combine([mean], [1], fit_temperature(y, mean)[0]))

    for size in range(1, rounds + 1):
        losses = [bag_loss((total + p) / size) for p in probs]
        pick = int(np.argmin(losses))  # the first of equals: the better-ranked trial
        counts[pick] += 1
        total += probs[pick]
        if losses[pick] < best_loss:
            best_loss, best_counts = losses[pick], counts.copy()
    return best_counts / best_counts.sum(), best_loss


def val_halves(y: np.ndarray, groups: np.ndarray, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """Two halves of the val rows for cross-fitting, each group (slices the split keeps
    together) wholly in one, with the positive groups dealt out alternately after a seeded
    shuffle and then the negative ones; None when a half would lack a class."""
    ids, inverse = np.unique(groups, return_inverse=True)
    positive = np.bincount(inverse, y, len(ids)) > 0
    order = np.random.default_rng(seed).permutation(len(ids))
    order = order[np.argsort(~positive[order], kind="stable")]
    half = np.empty(len(ids), dtype=int)
    half[order] = np.arange(len(ids)) % 2
    halves = np.flatnonzero(half[inverse] == 0), np.flatnonzero(half[inverse] == 1)
    return None if any(len(np.unique(y[h])) < 2 for h in halves) else halves


def cross_fitted(y: np.ndarray, member_probs: Sequence[np.ndarray],
                 halves: tuple[np.ndarray, np.ndarray], calibrated: bool = False) -> np.ndarray:
    """Each val row's probability under the ensemble selected on the other half (and, when
    `calibrated`, given its temperature there): what selection on val would give on data it
    did not select on."""
    probs = np.asarray(member_probs, dtype=np.float64)
    out = np.empty(len(y))
    for fit, held in (halves, halves[::-1]):
        weights, _ = caruana_weights(y[fit], probs[:, fit], calibrated=calibrated)
        temperature = fit_temperature(y[fit], weights @ probs[:, fit])[0] if calibrated else 1.0
        out[held] = combine([weights @ probs[:, held]], [1], temperature)
    return out


def calibrated_members(y_val: np.ndarray, member_probs: Sequence[np.ndarray],
                       halves: tuple[np.ndarray, np.ndarray] | None) -> list[np.ndarray]:
    """Each member's val probabilities calibrated by fit_temperature, cross-fitted: each half's
    with the temperature fitted on the other half (on the whole of val when it has no halves),
    so a member is judged on rows its calibration did not see."""
    if halves is None:
        return [combine([p], [1], fit_temperature(y_val, p)[0]) for p in member_probs]
    out = [np.empty(len(y_val)) for _ in member_probs]
    for fit, held in (halves, halves[::-1]):
        for p, o in zip(member_probs, out, strict=True):
            o[held] = combine([p[held]], [1], fit_temperature(y_val[fit], p[fit])[0])
    return out


def choose_ensemble(y_val: np.ndarray, member_probs: Sequence[np.ndarray],
                    val_groups: np.ndarray | None = None) -> dict:
    """The weights of the candidates (best trial first), chosen on val by caruana_weights on
    the members' calibrated probabilities (calibrated_members): {"weights": one per candidate,
    "member_temperatures": each candidate's, fitted on all of val, applied in an ensemble of two
    or more (all 1 when one is kept), "chosen": "ensemble" or "single", "why", "val_log_loss"
    ({"ensemble", "single"}, calibrated), "cross_fitted_log_loss": selection run on each half
    of val (`val_groups` kept whole) and scored on the other (None when not measured)}.

    Calibrated first, because log-loss judges calibration as much as ranking: an overconfident
    member that ranks best would otherwise lose to a weak one whose probabilities were kept
    from 0 and 1 (label smoothing), and the mean of probabilities on different scales is
    dominated by the most confident member. Temperatures do not change a member's ranking, so
    after calibration selection weighs what each member knows; and each bag's mean is scored
    after its own temperature (caruana_weights' `calibrated`), which the exported ensemble gets
    too (ensemble_temperature). bench/ensemble_selection.py compares this with selection on raw
    probabilities.

    What keeps selection from fitting val: it picks among the top K trials only, in weights of
    1/ENSEMBLE_ROUNDS, keeping the bag of its best round; and the cross-fitted log-loss shows
    what its gain on val is worth on rows it did not select on. Acting on that figure (taking
    the ensemble only when it wins there) was measured in bench/ensemble_selection.py: it gave
    up more test log-loss where ensembles help than it saved where they do not, so it is
    reported, not acted on."""
    groups = np.arange(len(y_val)) if val_groups is None else val_groups
    halves = val_halves(y_val, groups)
    calibrated = calibrated_members(y_val, member_probs, halves)
    weights, loss = caruana_weights(y_val, calibrated, calibrated=True)
    single_loss = _log_loss(y_val, calibrated[0])
    used = np.flatnonzero(weights)
    temperatures = ([fit_temperature(y_val, p)[0] for p in member_probs] if len(used) > 1
                    else [1.0] * len(member_probs))
    return {
        "method": "caruana", "metric": "log_loss", "rounds": ENSEMBLE_ROUNDS,
        "calibrated_members": True,
        "weights": weights.tolist(), "member_temperatures": temperatures,
        "chosen": "ensemble" if len(used) > 1 else "single",
        "why": (f"ensemble selection gave weight to {len(used)} of the {len(weights)} trials"
                if len(used) > 1 else "ensemble selection kept the best trial alone"
                if used[0] == 0 else f"ensemble selection kept the trial ranked {used[0] + 1} "
                "alone, whose calibrated probabilities had a lower log-loss than the best "
                "trial's"),
        "val_log_loss": {"ensemble": loss, "single": single_loss},
        "cross_fitted_log_loss": (None if halves is None or weights[0] == 1 else _log_loss(
            y_val, cross_fitted(y_val, calibrated, halves, calibrated=True))),
    }


LOG_T_BOUND = 3.0  # the temperature is searched in [e^-3, e^3], about [0.05, 20]
# The prior on log T: normal, centred on T = 1 (no change), sd 1: T in [0.14, 7.1] at 95%, which
# holds the temperatures Guo et al. (2017) report for ResNets (1.1 to 3) and the larger ones of
# a trial trained to be overconfident. Beside the likelihood of a few hundred val slices it
# weighs little; on 63 it narrows the scatter of T (tests/test_model_choice.py), and where val
# says nothing it keeps T = 1. (sd 0.5 narrowed it more but held a 6-times overconfident trial
# near T = 2.7: bench/ensemble_selection.py, val 63.)
LOG_T_PRIOR_SD = 1.0
TEMPERATURE_RESAMPLES = 200  # bootstrap refits of the temperature, for its interval


def fit_temperature(y_val: np.ndarray, prob_val: np.ndarray) -> tuple[float, str | None]:
    """(T, None), T the temperature of sigmoid(logit(p) / T) (Guo et al. 2017, for one logit):
    T > 1 softens overconfident probabilities, T < 1 sharpens them.

    T is fitted as Platt (1999) fitted his sigmoid: to the regularised targets (N+ + 1)/(N+ + 2)
    for positives and 1/(N- + 2) for negatives rather than 1 and 0, so a val split the model
    separates perfectly still has a finite best T, and a small one cannot make the exported
    model certain of everything; with a normal prior on log T (LOG_T_PRIOR_SD), which draws T
    towards 1 when val is small or says little (a maximum a posteriori fit). (1.0, why) is left
    as a check: a fit at the bound of its search is no optimum, and is not applied."""
    logits = _logit(prob_val)
    positives = int(np.sum(y_val == 1))
    negatives = len(y_val) - positives
    target = np.where(y_val == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))

    def loss(log_t: float) -> float:
        z = logits / np.exp(log_t)
        # The targets' cross-entropy, summed: -t log sigmoid(z) - (1 - t) log sigmoid(-z).
        fit = np.sum(target * np.logaddexp(0, -z) + (1 - target) * np.logaddexp(0, z))
        return float(fit + 0.5 * (log_t / LOG_T_PRIOR_SD) ** 2)

    log_t = minimize_scalar(loss, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded").x
    if abs(log_t) > LOG_T_BOUND - 0.01:
        return 1.0, (f"the fitted temperature ran to the bound of its search "
                     f"({np.exp(log_t):.3g}), not to an optimum on the validation split")
    return float(np.exp(log_t)), None


def ensemble_temperature(y_val: np.ndarray, member_val: Sequence[np.ndarray],
                         weights: Sequence[float], member_temperatures: Sequence[float]) -> float:
    """The temperature of a mean of calibrated members (1 for one member, which its own
    temperature, if any, already calibrates): averaging members that are each calibrated gives
    a mean less confident than the evidence it pools, so the mean gets a temperature of its own
    (below 1 where the members disagree in their errors)."""
    if sum(w > 0 for w in weights) < 2:
        return 1.0
    temperature, why = fit_temperature(y_val, combine(member_val, weights, 1.0,
                                                      member_temperatures))
    return 1.0 if why else temperature


def temperature_interval(y_val: np.ndarray, prob_val: np.ndarray, groups: np.ndarray,
                         resamples: int = TEMPERATURE_RESAMPLES, seed: int = 0) -> list[float]:
    """95% percentile interval of fit_temperature over bootstrap resamples of the val groups
    (slices the split keeps together come and go together): how well val pins T down."""
    ids, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    rng = np.random.default_rng(seed)
    fitted = []
    for _ in range(resamples):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(ids), len(ids))])
        if len(np.unique(y_val[rows])) == 2:
            fitted.append(fit_temperature(y_val[rows], prob_val[rows])[0])
    return [float(v) for v in np.percentile(fitted, [2.5, 97.5])] if fitted else [np.nan] * 2


def combine(member_probs: Sequence[np.ndarray | None], weights: Sequence[float],
            temperature: float = 1.0,
            member_temperatures: Sequence[float] | None = None) -> np.ndarray:
    """The members' weighted mean probability, each member's logit first divided by its
    temperature (1 when not given), the mean's logit divided by `temperature`: what
    `ctmodels.Ensemble` outputs, from probabilities already computed. Members of weight 0 are
    left out (their probabilities may be None)."""
    used = [i for i, w in enumerate(weights) if w > 0]
    scale = member_temperatures or [1.0] * len(weights)
    if len(used) == 1 and temperature == 1.0 == scale[used[0]]:
        return member_probs[used[0]]
    calibrated = [member_probs[i] if scale[i] == 1.0 else expit(_logit(member_probs[i]) / scale[i])
                  for i in used]
    mean = np.average(calibrated, axis=0, weights=[weights[i] for i in used])
    return expit(_logit(mean) / temperature)


def _logit(prob: np.ndarray) -> np.ndarray:
    # Clipped as torch.logit(eps=1e-7) in ctmodels.Ensemble: a probability of exactly 0 or 1
    # would give an infinite logit.
    return logit(np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7))


def _proba(member: Member, ds: CTDataset, rows: np.ndarray) -> np.ndarray:
    model, description = member
    return predict_proba(model, torch.from_numpy(ds.images[rows]), description).numpy()


def per_patient(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, aggregate: str
                ) -> dict[str, np.ndarray]:
    """{"patient": the split's group numbers, ascending, "label", "prob" (the `aggregate` of
    its slices'), "slices": how many}, one entry per patient. A patient's label is that of its
    slices, which must agree."""
    ids, patient_prob = aggregate_by_group(prob, groups, aggregate)
    inverse = np.unique(groups, return_inverse=True)[1]
    slices = np.bincount(inverse)
    positives = np.bincount(inverse, y)
    mixed = ids[(positives > 0) & (positives < slices)]
    if len(mixed):
        raise DataError(f"split.json: the slices of patient group(s) {mixed[:10].tolist()} "
                        "carry both labels; patient-level results need one label per patient")
    return {"patient": ids, "label": (positives > 0).astype(int), "prob": patient_prob,
            "slices": slices}


def choose_patient_level(y_val: np.ndarray, prob_val: np.ndarray, val_groups: np.ndarray,
                         threshold: float | None = None, aggregate: str = "mean") -> dict:
    """{"aggregate", "chosen_by", "val_auc_by_aggregate", "threshold"[, "slice_count_auc"]} for
    the val patients, then the patient threshold as the slice level chooses its own.

    The aggregate is fixed in advance (`aggregate`; the mean by default: the least noisy, and
    unlike the maximum or the top quarter it does not grow with a patient's number of slices),
    or with CHOOSE_AGGREGATE the one whose patient probabilities have the best val ROC AUC (the
    first of AGGREGATES on a tie). A choice can reward a confound: where slice counts differ by
    class, the maximum of more slices is higher whatever they show. So a choice also records
    the val ROC AUC that a patient's slice count alone reaches ("slice_count_auc"; evaluation
    adds the test one)."""
    patients = {m: per_patient(y_val, prob_val, val_groups, m) for m in AGGREGATES}
    aucs = {m: float(roc_auc_score(p["label"], p["prob"])) for m, p in patients.items()}
    choose = aggregate == CHOOSE_AGGREGATE
    # max keeps the first of equals
    picked = max(AGGREGATES, key=aucs.__getitem__) if choose else aggregate
    chosen = patients[picked]
    return {"aggregate": picked, "chosen_by": "val_auc" if choose else "fixed",
            "val_auc_by_aggregate": aucs,
            "threshold": choose_threshold(chosen["label"], chosen["prob"], threshold),
            **({"slice_count_auc": {"val": float(roc_auc_score(chosen["label"],
                                                               chosen["slices"]))}}
               if choose else {})}


def score_patients(choice: dict, y: np.ndarray, prob: np.ndarray, groups: np.ndarray,
                   resamples: int = 1000, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """The patient-level entry of one split ({"n", "positives", "negatives", **score}) at the
    aggregate and threshold of `choice`, and its per-patient arrays. Each patient is one
    observation, so the bootstrap resamples patients."""
    patients = per_patient(y, prob, groups, choice["aggregate"])
    labels = patients["label"]
    entry = {"n": len(labels), "positives": int(labels.sum()),
             "negatives": int(len(labels) - labels.sum()),
             **score(labels, patients["prob"], choice["threshold"]["value"], resamples, seed)}
    return entry, patients


def _compared_weights(choice: dict) -> tuple[list[float], str]:
    """The model the chosen one is compared with, and what it is: the search's best trial alone,
    or, when that is the chosen model, the runner-up trial alone. One trial, each time, so the
    comparison is with what a search without selection would have exported, never with a mean
    that selection was free to beat."""
    count = len(choice["weights"])
    best_alone = np.eye(count)[0].tolist()
    if choice["weights"] != best_alone:
        return best_alone, COMPARED_BEST
    return np.eye(count)[1].tolist(), COMPARED_RUNNER_UP


def _fixed_on_val(y_val: np.ndarray, member_val: list[np.ndarray], weights: Sequence[float],
                  calibrate: bool, threshold: float | None, groups: np.ndarray,
                  member_temperatures: Sequence[float] | None = None) -> dict:
    """One model fixed on val: its weights and member temperatures, temperature (and why none,
    and its interval over resamples of the val `groups`), val probabilities and threshold."""
    uncalibrated = combine(member_val, weights, 1.0, member_temperatures)
    if calibrate:
        temperature, not_calibrated = fit_temperature(y_val, uncalibrated)
    else:  # a mean of calibrated members gets its own temperature: ensemble_temperature
        temperature, not_calibrated = (ensemble_temperature(y_val, member_val, weights,
                                                            member_temperatures)
                                       if member_temperatures else 1.0), None
    prob_val = combine(member_val, weights, temperature, member_temperatures)
    return {"weights": list(weights), "member_temperatures": member_temperatures,
            "k": sum(w > 0 for w in weights),
            "temperature": temperature, "not_calibrated": not_calibrated, "prob_val": prob_val,
            "temperature_ci95": (temperature_interval(y_val, uncalibrated, groups)
                                 if temperature != 1.0 else None),
            "threshold": choose_threshold(y_val, prob_val, threshold)}


def val_then_test(members: list[Member], ds: CTDataset, val_rows: np.ndarray,
                  test_rows: np.ndarray, threshold: float | None = None,
                  calibrate: bool = False, val_patients: np.ndarray | None = None,
                  val_groups: np.ndarray | None = None, aggregate: str = "mean",
                  before_test: Callable[[], None] = lambda: None) -> dict:
    """Everything is chosen on val first: the weights of `members` (best trial first; see
    choose_ensemble, which keeps `val_groups` whole), the temperature, and the thresholds of
    that model and of the one it is compared with, each calibrated the same way; with
    `val_patients` (the patient of each val row) also the patient-level threshold, and the
    aggregate (`aggregate`, as choose_patient_level takes it).
    Only then, after `before_test` (which puts the look on record), are the test probabilities
    computed, of the members either model uses."""
    y_val = ds.labels[val_rows]
    member_val = [_proba(m, ds, val_rows) for m in members]
    choice = choose_ensemble(y_val, member_val, val_groups)
    groups = np.arange(len(y_val)) if val_groups is None else val_groups
    chosen = _fixed_on_val(y_val, member_val, choice["weights"], calibrate, threshold, groups,
                           choice["member_temperatures"])
    compared = None
    if len(members) > 1:
        weights, role = _compared_weights(choice)
        compared = {**_fixed_on_val(y_val, member_val, weights, calibrate, threshold, groups),
                    "role": role}
    patient = (None if val_patients is None
               else choose_patient_level(y_val, chosen["prob_val"], val_patients, threshold,
                                         aggregate))
    used = {i for model in (chosen, compared) if model
            for i, w in enumerate(model["weights"]) if w > 0}
    before_test()
    member_test = [_proba(m, ds, test_rows) if i in used else None
                   for i, m in enumerate(members)]
    for model in (chosen, compared):
        if model:
            model["prob_test"] = combine(member_test, model["weights"], model["temperature"],
                                         model["member_temperatures"])
    return {**chosen, "selection": choice, "y_val": y_val, "y_test": ds.labels[test_rows],
            "compared": compared, "patient": patient}


def kept_out(trial: dict) -> str | None:
    """Why a trial may not join an ensemble, or None: a trial no better than chance on val,
    whose weight could only come from fitting val's noise."""
    if not trial["val_auc"] > 0.5:  # also NaN: no val AUC at all
        return "no better than chance on val (AUC 0.5 or less)"
    return None


def ensemble_candidates(run_dir: str, options: SearchOptions, best: dict, size: int
                        ) -> tuple[list[dict], list[dict]]:
    """The best trial, then the next best by val AUC whose checkpoint is there and that is not
    `kept_out`: up to `size` {"trial_id", "checkpoint", "config", "precision", "val_auc",
    "epochs", "first_rung"} (precision: None in runs that did not record it; first_rung: ASHA
    stopped it at its first rung, after the grace period, which the report flags); and the
    trials kept out on the way, {"trial_id", "val_auc", "epochs", "reason"}. (A trial that
    failed on resuming may name a checkpoint Ray had already replaced.)"""
    trials = runfolder.read_json(runfolder.join(run_dir, runfolder.TRIALS)) or []

    def facts(trial: dict) -> dict:
        return {"val_auc": trial.get("val_auc"), "epochs": trial.get("epochs"),
                "first_rung": (trial.get("status") == "stopped early"
                               and trial.get("epochs", 0) <= options.grace_period)}

    record = next((t for t in trials if t["trial_id"] == best["trial_id"]), {})
    winner = {**{k: best[k] for k in ("trial_id", "checkpoint", "config")},
              "precision": best.get("precision"), **facts(record)}
    candidates, excluded = [winner], []
    for t in trials:
        if len(candidates) == size:
            break
        if (not t.get("checkpoint") or t["trial_id"] == best["trial_id"]
                or not runfolder.exists(runfolder.in_run(run_dir, t["checkpoint"]))):
            continue
        reason = kept_out(t)
        if reason:
            excluded.append({"trial_id": t["trial_id"], "val_auc": t["val_auc"],
                             "epochs": t["epochs"], "reason": reason})
            continue
        candidates.append({"trial_id": t["trial_id"], "checkpoint": t["checkpoint"],
                           "config": asdict(options.trial_config(t["params"])),
                           "precision": t.get("precision"), **facts(t)})
    return candidates, excluded


def evaluate_run(run_dir: str, threshold: float | None = None, resamples: int = 1000,
                 seed: int = 0, cache_dir: Path | None = None, ensemble: int = 5,
                 calibrate: bool = False, aggregate: str = "mean",
                 before_test: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
    """Score the chosen model (the best trial, or the ensemble of the top trials that val
    prefers) and the one it is compared with; returns (metrics.json content, arrays for plots
    and export). `before_test` is called once everything is fixed on val, just before the first
    test probability is computed."""
    options = load_options(run_dir)
    best, _ = _read_json(run_dir, runfolder.BEST, BEST_KEYS)
    split_json, split_text = _read_json(run_dir, runfolder.SPLIT, SPLIT_KEYS)
    config = make_config(best["config"])
    ds = load_data_options(Path(options.data), config.image_size, config.resize, options.split,
                           cache_dir, split_json, run_dir)
    val_rows = recorded_rows(ds, split_json, "val")
    test_rows = recorded_rows(ds, split_json, "test")
    candidates, excluded = ensemble_candidates(run_dir, options, best, ensemble)
    members = [load_checkpoint_model(runfolder.in_run(run_dir, c["checkpoint"]))
               for c in candidates]
    test_groups = recorded_groups(split_json, "test")
    val_groups = recorded_groups(split_json, "val")
    unit = recorded_unit(split_json)
    by_patient = unit in PERSON_UNITS  # then also scored per patient (or volume, study...)
    scored = val_then_test(members, ds, val_rows, test_rows, threshold, calibrate,
                           val_groups if by_patient else None, val_groups, aggregate,
                           before_test)
    temperature, weights = scored["temperature"], scored["weights"]
    chosen, y_val, prob_val = scored["threshold"], scored["y_val"], scored["prob_val"]
    y_test, prob_test = scored["y_test"], scored["prob_test"]
    patient, test_patients = {}, None
    if scored["patient"]:
        choice = scored["patient"]
        test_entry, test_patients = score_patients(choice, y_test, prob_test, test_groups,
                                                   resamples, seed)
        val_entry, _ = score_patients(choice, y_val, prob_val, val_groups, resamples, seed)
        if "slice_count_auc" in choice:  # what slice count alone reaches on the test patients
            choice["slice_count_auc"]["test"] = float(roc_auc_score(
                test_patients["label"], test_patients["slices"]))
        patient = {"patient": {**choice, "unit": unit, "test": test_entry, "val": val_entry}}

    def at(y: np.ndarray, prob: np.ndarray, value: float, groups: np.ndarray) -> dict:
        return score(y, prob, value, resamples, seed, groups)

    metrics = {
        "trial_id": best["trial_id"],
        "checkpoint": best["checkpoint"],
        "class_names": list(ds.class_names),
        "positive_class": ds.positive_class,
        "threshold": chosen,
        "test": {
            "n": len(y_test), "positives": int(y_test.sum()),
            "negatives": int(len(y_test) - y_test.sum()),
            **at(y_test, prob_test, chosen["value"], test_groups),
            "at_0.5": at(y_test, prob_test, 0.5, test_groups),
        },
        "val": {"n": len(y_val), **at(y_val, prob_val, chosen["value"], val_groups)},
        **patient,  # only when the split's groups are patients
        "ensemble": {"k": scored["k"], "candidates": len(candidates), "excluded": excluded,
                     "members": _weighted(candidates, weights,
                                          scored["selection"]["member_temperatures"]),
                     **{key: value for key, value in scored["selection"].items()
                        if key not in ("weights", "member_temperatures")}},
        "temperature": temperature,
        # How well val pins the temperature down: refitted on resamples of its groups.
        **({"temperature_ci95": scored["temperature_ci95"]}
           if scored["temperature_ci95"] else {}),
        # Asked for with --calibrate, then not applied: why (the report says it).
        **({"calibration_not_applied": scored["not_calibrated"]}
           if scored["not_calibrated"] else {}),
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": split_json["group_by"],
                      "groups_are": unit,
                      "test_groups": len(np.unique(test_groups))},
        "data": {
            "path": str(ds.root), "images": len(ds),
            # demo data, the SARS-CoV-2 CT-scan data set or unknown: what the report may say
            "source": source_of_files(e["path"] for e in split_json["files"]),
            "skipped": [{"path": s.path, "reason": s.reason} for s in ds.skipped],
            # How DICOM and NIfTI slices were read: predict reads them the same way.
            "window": list(ds.window), "slices": ds.slices,
            "split_counts": split_json["counts"], "group_by": split_json["group_by"],
            "unit": unit, "group_kinds": split_json.get("group_kinds"),
            "split_groups": split_json.get("groups"),
            "split_seed": split_json["seed"],
            "split_sha256": hashlib.sha256(split_text.encode()).hexdigest(),
        },
        "config": best["config"],
        "searched": best["searched"],
        "search": {key: best[key] for key in ("trials", "trials_stopped_early", "errored_trials",
                                              "trials_ended_by_budget", "time_budget_s",
                                              "budget_reached")
                   if key in best},  # runs before 0.3 count no trials ended by the budget
    }
    compared = scored["compared"]
    if compared:  # the model set beside the exported one (see _compared_weights)
        value = compared["threshold"]["value"]
        metrics["compared"] = {
            "role": compared["role"], "k": compared["k"], "threshold": compared["threshold"],
            "temperature": compared["temperature"],
            "members": [m["trial_id"] for m in _weighted(candidates, compared["weights"])],
            "weights": [w for w in compared["weights"] if w > 0],
            "test": at(y_test, compared["prob_test"], value, test_groups),
            "val": at(y_val, compared["prob_val"], value, val_groups),
            # Chosen minus compared on the same test resamples (the same as the intervals').
            "paired": paired_bootstrap(y_test, prob_test, chosen["value"], compared["prob_test"],
                                       value, resamples, seed, test_groups),
        }
    arrays = {"members": [m for m, w in zip(members, weights, strict=True) if w > 0],
              "y_test": y_test, "prob_test": prob_test,
              "test_paths": [ds.paths[i] for i in test_rows], "class_names": ds.class_names,
              "images": ds.images, "test_rows": test_rows, "test_groups": test_groups,
              "test_patients": test_patients}
    return metrics, arrays


def _weighted(candidates: list[dict], weights: Sequence[float],
              temperatures: Sequence[float] | None = None) -> list[dict]:
    """The candidates a model uses, each with its weight (and its temperature, when given)."""
    temperatures = temperatures or [None] * len(weights)
    return [{**c, "weight": w, **({"temperature": t} if t is not None else {})}
            for c, w, t in zip(candidates, weights, temperatures, strict=True) if w > 0]


def write_predictions(path: Path, arrays: dict) -> None:
    rows = [{"path": p, "label": arrays["class_names"][y], "prob": float(q)}
            for p, y, q in zip(arrays["test_paths"], arrays["y_test"], arrays["prob_test"],
                               strict=True)]
    write_json(path, rows)


def write_patient_predictions(path: Path, arrays: dict) -> None:
    """test_patients.json: one row per test patient, named only by the split's group number."""
    patients, names = arrays["test_patients"], arrays["class_names"]
    rows = [{"patient": int(g), "label": names[y], "prob": float(q), "slices": int(n)}
            for g, y, q, n in zip(patients["patient"], patients["label"], patients["prob"],
                                  patients["slices"], strict=True)]
    write_json(path, rows)
