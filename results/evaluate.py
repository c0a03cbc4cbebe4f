"""`ctscan evaluate RUN_DIR`: score the search's winner once on the held-out test split.

This is the only code that reads test images. The threshold is chosen on the validation split
first and then applied unchanged to the test split.
"""

from __future__ import annotations

import hashlib
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
from data_utils.split import PATIENT_GROUPING, load_data_options
from results.aggregate import AGGREGATES, aggregate_by_group
from results.metrics import score, youden_threshold
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
    """Rows of `ds` holding split `name` of split.json; every file must still be byte-identical."""
    row_of = {path: i for i, path in enumerate(ds.paths)}
    rows = []
    for entry in split_json["files"]:
        if entry["split"] != name:
            continue
        row = row_of.get(entry["path"])
        if row is None:
            raise DataError(f"{ds.root / entry['path']}: {name} file of split.json is missing "
                            "or no longer readable")
        if ds.sha256[row] != entry["sha256"]:
            raise DataError(f"{ds.root / entry['path']}: {name} file changed since the split "
                            "was made (sha256 differs)")
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


def choose_threshold(y_val: np.ndarray, prob_val: np.ndarray, fixed: float | None) -> dict:
    if fixed is not None:
        return {"method": "fixed", "value": float(fixed)}
    return {"method": "youden", "value": youden_threshold(y_val, prob_val)}


def choose_ensemble(y_val: np.ndarray, member_probs: list[np.ndarray]) -> tuple[int, list[float]]:
    """How many of the members (best first) to average: the k whose mean probability has the
    best val AUC, the smaller k on a tie; and the val AUC of every k."""
    aucs = [float(roc_auc_score(y_val, np.mean(member_probs[:k], axis=0)))
            for k in range(1, len(member_probs) + 1)]
    return aucs.index(max(aucs)) + 1, aucs


LOG_T_BOUND = 3.0  # the temperature is searched in [e^-3, e^3], about [0.05, 20]


def fit_temperature(y_val: np.ndarray, prob_val: np.ndarray) -> tuple[float, str | None]:
    """(T, None) with T the temperature minimising the val log-loss of sigmoid(logit(p) / T)
    (Guo et al. 2017, for one logit): T > 1 softens overconfident probabilities, T < 1 sharpens
    them. Or (1.0, why) when no temperature should be applied: on a perfectly separated val
    split the log-loss falls without end as T goes to 0, which would make the exported model
    certain of everything, and a T at the bound of its search is no minimum either."""
    logits = _logit(prob_val)
    positive, negative = logits[y_val == 1], logits[y_val == 0]
    if len(positive) and len(negative) and positive.min() > negative.max():
        return 1.0, ("the validation split is perfectly separated, so its log-loss keeps "
                     "falling as the temperature goes to 0")

    def loss(log_t: float) -> float:
        return log_loss(y_val, expit(logits / np.exp(log_t)), labels=[0, 1])

    log_t = minimize_scalar(loss, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded").x
    if abs(log_t) > LOG_T_BOUND - 0.01:
        return 1.0, (f"the fitted temperature ran to the bound of its search "
                     f"({np.exp(log_t):.3g}), not to a minimum of the validation log-loss")
    return float(np.exp(log_t)), None


def combine(member_probs: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """The members' mean probability, its logit divided by the temperature: what
    `ctmodels.Ensemble` outputs, from probabilities already computed."""
    if len(member_probs) == 1 and temperature == 1.0:
        return member_probs[0]
    return expit(_logit(np.mean(member_probs, axis=0)) / temperature)


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
                         threshold: float | None = None) -> dict:
    """{"aggregate", "val_auc_by_aggregate", "threshold"}, all chosen on the val patients: the
    aggregate whose patient probabilities have the best val ROC AUC (the first of AGGREGATES
    on a tie), then the patient threshold as the slice level chooses its own."""
    patients = {m: per_patient(y_val, prob_val, val_groups, m) for m in AGGREGATES}
    aucs = {m: float(roc_auc_score(p["label"], p["prob"])) for m, p in patients.items()}
    aggregate = max(AGGREGATES, key=aucs.__getitem__)  # max keeps the first of equals
    chosen = patients[aggregate]
    return {"aggregate": aggregate, "val_auc_by_aggregate": aucs,
            "threshold": choose_threshold(chosen["label"], chosen["prob"], threshold)}


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


def calibration(y_val: np.ndarray, member_val: list[np.ndarray], calibrate: bool
                ) -> tuple[float, str | None]:
    """The temperature of the members' mean probability, and why none is applied when asked
    for (None when it is, or when calibration was not asked for)."""
    return fit_temperature(y_val, combine(member_val)) if calibrate else (1.0, None)


def val_then_test(members: list[Member], ds: CTDataset, val_rows: np.ndarray,
                  test_rows: np.ndarray, threshold: float | None = None,
                  calibrate: bool = False, val_patients: np.ndarray | None = None) -> dict:
    """Everything is chosen on val first: how many of `members` (best first) to average, the
    temperature, and the thresholds of that model and of the one it is compared with (the single
    best trial, or when that is chosen the best ensemble of two or more); with `val_patients`
    (the patient of each val row) also the patient-level aggregate and threshold. Only then are
    the test probabilities computed, of both."""
    y_val = ds.labels[val_rows]
    member_val = [_proba(m, ds, val_rows) for m in members]
    k, aucs = choose_ensemble(y_val, member_val)
    temperature, not_calibrated = calibration(y_val, member_val[:k], calibrate)
    prob_val = combine(member_val[:k], temperature)
    chosen = choose_threshold(y_val, prob_val, threshold)
    compared = None
    if len(members) > 1:  # calibrated as the chosen model is, so the comparison is fair
        other_k = 1 if k > 1 else aucs.index(max(aucs[1:]), 1) + 1
        other_t, _ = calibration(y_val, member_val[:other_k], calibrate)
        other_val = combine(member_val[:other_k], other_t)
        compared = {"k": other_k, "prob_val": other_val, "temperature": other_t,
                    "threshold": choose_threshold(y_val, other_val, threshold)}
    patient = (None if val_patients is None
               else choose_patient_level(y_val, prob_val, val_patients, threshold))
    y_test = ds.labels[test_rows]
    needed = max(k, compared["k"]) if compared else k
    member_test = [_proba(m, ds, test_rows) for m in members[:needed]]
    if compared:
        compared["prob_test"] = combine(member_test[:compared["k"]], compared["temperature"])
    return {"k": k, "val_auc_by_k": aucs, "temperature": temperature,
            "not_calibrated": not_calibrated, "threshold": chosen,
            "y_val": y_val, "prob_val": prob_val, "y_test": y_test,
            "prob_test": combine(member_test[:k], temperature), "compared": compared,
            "patient": patient}


def ensemble_candidates(run_dir: str, options: SearchOptions, best: dict, size: int
                        ) -> list[dict]:
    """The best trial, then the next best by val AUC whose checkpoint is there: up to `size`
    {"trial_id", "checkpoint", "config", "precision"} (precision: None in runs that did not record
    it). (A trial that failed on resuming may name a checkpoint Ray had already replaced.)"""
    trials = runfolder.read_json(runfolder.join(run_dir, runfolder.TRIALS)) or []
    winner = {**{k: best[k] for k in ("trial_id", "checkpoint", "config")},
              "precision": best.get("precision")}
    candidates = [winner]
    for t in trials:
        if len(candidates) == size:
            break
        if (t.get("checkpoint") and t["trial_id"] != best["trial_id"]
                and runfolder.exists(runfolder.in_run(run_dir, t["checkpoint"]))):
            candidates.append({"trial_id": t["trial_id"], "checkpoint": t["checkpoint"],
                               "config": asdict(options.trial_config(t["params"])),
                               "precision": t.get("precision")})
    return candidates


def evaluate_run(run_dir: str, threshold: float | None = None, resamples: int = 1000,
                 seed: int = 0, cache_dir: Path | None = None, ensemble: int = 5,
                 calibrate: bool = False) -> tuple[dict, dict]:
    """Score the chosen model (the best trial, or the ensemble of the top trials that val
    prefers) and the one it is compared with; returns (metrics.json content, arrays for plots
    and export)."""
    options = load_options(run_dir)
    best, _ = _read_json(run_dir, runfolder.BEST, BEST_KEYS)
    split_json, split_text = _read_json(run_dir, runfolder.SPLIT, SPLIT_KEYS)
    config = make_config(best["config"])
    ds = load_data_options(Path(options.data), config.image_size, config.resize, options.split,
                           cache_dir)
    val_rows = recorded_rows(ds, split_json, "val")
    test_rows = recorded_rows(ds, split_json, "test")
    candidates = ensemble_candidates(run_dir, options, best, ensemble)
    members = [load_checkpoint_model(runfolder.in_run(run_dir, c["checkpoint"]))
               for c in candidates]
    test_groups = recorded_groups(split_json, "test")
    val_groups = recorded_groups(split_json, "val")
    by_patient = split_json["group_by"] in PATIENT_GROUPING  # then also scored per patient
    scored = val_then_test(members, ds, val_rows, test_rows, threshold, calibrate,
                           val_groups if by_patient else None)
    k, temperature = scored["k"], scored["temperature"]
    chosen, y_val, prob_val = scored["threshold"], scored["y_val"], scored["prob_val"]
    y_test, prob_test = scored["y_test"], scored["prob_test"]
    patient, test_patients = {}, None
    if scored["patient"]:
        choice = scored["patient"]
        test_entry, test_patients = score_patients(choice, y_test, prob_test, test_groups,
                                                   resamples, seed)
        val_entry, _ = score_patients(choice, y_val, prob_val, val_groups, resamples, seed)
        patient = {"patient": {**choice, "test": test_entry, "val": val_entry}}

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
        "ensemble": {"k": k, "candidates": len(candidates), "val_auc_by_k": scored["val_auc_by_k"],
                     "members": candidates[:k]},
        "temperature": temperature,
        # Asked for with --calibrate, then not applied: why (the report says it).
        **({"calibration_not_applied": scored["not_calibrated"]}
           if scored["not_calibrated"] else {}),
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": split_json["group_by"],
                      "test_groups": len(np.unique(test_groups))},
        "data": {
            "path": str(ds.root), "images": len(ds),
            "skipped": [{"path": s.path, "reason": s.reason} for s in ds.skipped],
            # How DICOM and NIfTI slices were read: predict reads them the same way.
            "window": list(ds.window), "slices": ds.slices,
            "split_counts": split_json["counts"], "group_by": split_json["group_by"],
            "split_seed": split_json["seed"],
            "split_sha256": hashlib.sha256(split_text.encode()).hexdigest(),
        },
        "config": best["config"],
        "searched": best["searched"],
        "search": {key: best[key] for key in ("trials", "trials_stopped_early", "errored_trials",
                                        "time_budget_s", "budget_reached")},
    }
    compared = scored["compared"]
    if compared:  # the single best trial beside the ensemble, whichever is exported
        value = compared["threshold"]["value"]
        metrics["compared"] = {
            "k": compared["k"], "threshold": compared["threshold"],
            "temperature": compared["temperature"],
            "members": [c["trial_id"] for c in candidates[:compared["k"]]],
            "test": at(y_test, compared["prob_test"], value, test_groups),
            "val": at(y_val, compared["prob_val"], value, val_groups),
        }
    arrays = {"members": members[:k], "y_test": y_test, "prob_test": prob_test,
              "test_paths": [ds.paths[i] for i in test_rows], "class_names": ds.class_names,
              "images": ds.images, "test_rows": test_rows,
              "test_patients": test_patients}
    return metrics, arrays


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
