"""`ctscan evaluate RUN_DIR`: score the search's winner once on the held-out test split.

This is the only code that reads test images. The threshold is chosen on the validation split
first and then applied unchanged to the test split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctmodels import build_model
from data_utils import runfolder
from data_utils.cache import CTDataset, load_dataset
from data_utils.files import write_json
from data_utils.sources import DataError
from results.metrics import score, youden_threshold
from tuning.config import make_config
from tuning.train import predict_proba


def _read_json(run_dir: str, name: str) -> tuple[Any, str]:
    """A run file's content and its text (hashed into metrics.json for split.json)."""
    location = runfolder.join(run_dir, name)
    text = runfolder.read_text(location)
    if text is None:
        raise DataError(f"{location}: not found; is {run_dir} a finished ctscan search?")
    return runfolder.parse_json(text, location), text


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


def load_checkpoint_model(checkpoint: str, config) -> torch.nn.Module:
    """The trial's weights from its checkpoint (a local path or a storage URI)."""
    with runfolder.local_path(checkpoint) as local:
        state = torch.load(local, map_location="cpu", weights_only=True)
    model = build_model(config.arch, config.head, config.dropout, config.activation)
    model.load_state_dict(state["model"])
    return model.eval()


def choose_threshold(y_val: np.ndarray, prob_val: np.ndarray, fixed: float | None) -> dict:
    if fixed is not None:
        return {"method": "fixed", "value": float(fixed)}
    return {"method": "youden", "value": youden_threshold(y_val, prob_val)}


def val_then_test(model: torch.nn.Module, ds: CTDataset, val_rows: np.ndarray,
                  test_rows: np.ndarray, threshold: float | None = None) -> dict:
    """Probabilities on val, the threshold chosen there, and only then those on test."""
    y_val = ds.labels[val_rows]
    prob_val = predict_proba(model, torch.from_numpy(ds.images[val_rows])).numpy()
    chosen = choose_threshold(y_val, prob_val, threshold)
    y_test = ds.labels[test_rows]
    prob_test = predict_proba(model, torch.from_numpy(ds.images[test_rows])).numpy()
    return {"threshold": chosen, "y_val": y_val, "prob_val": prob_val, "y_test": y_test,
            "prob_test": prob_test}


def evaluate_run(run_dir: str, threshold: float | None = None, resamples: int = 1000,
                 seed: int = 0, cache_dir: Path | None = None) -> tuple[dict, dict]:
    """Score the best trial; returns (metrics.json content, arrays for plots and export)."""
    search, _ = _read_json(run_dir, runfolder.SEARCH)
    best, _ = _read_json(run_dir, runfolder.BEST)
    split_json, split_text = _read_json(run_dir, runfolder.SPLIT)
    config = make_config(best["config"])
    ds = load_dataset(Path(search["data"]), config.image_size, config.resize, cache_dir,
                      search["split"].get("positive_class"))
    val_rows = recorded_rows(ds, split_json, "val")
    test_rows = recorded_rows(ds, split_json, "test")
    model = load_checkpoint_model(best["checkpoint"], config)
    scored = val_then_test(model, ds, val_rows, test_rows, threshold)
    chosen, y_val, prob_val = scored["threshold"], scored["y_val"], scored["prob_val"]
    y_test, prob_test = scored["y_test"], scored["prob_test"]
    test_groups = recorded_groups(split_json, "test")

    metrics = {
        "trial_id": best["trial_id"],
        "checkpoint": best["checkpoint"],
        "class_names": list(ds.class_names),
        "positive_class": ds.positive_class,
        "threshold": chosen,
        "test": {
            "n": len(y_test), "positives": int(y_test.sum()),
            "negatives": int(len(y_test) - y_test.sum()),
            **score(y_test, prob_test, chosen["value"], resamples, seed, test_groups),
            "at_0.5": score(y_test, prob_test, 0.5, resamples, seed, test_groups),
        },
        "val": {"n": len(y_val), **score(y_val, prob_val, chosen["value"], resamples, seed,
                                         recorded_groups(split_json, "val"))},
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": split_json["group_by"],
                      "test_groups": len(np.unique(test_groups))},
        "data": {
            "path": str(ds.root), "images": len(ds),
            "skipped": [{"path": s.path, "reason": s.reason} for s in ds.skipped],
            "split_counts": split_json["counts"], "group_by": split_json["group_by"],
            "split_seed": split_json["seed"],
            "split_sha256": hashlib.sha256(split_text.encode()).hexdigest(),
        },
        "config": best["config"],
        "searched": best["searched"],
        "search": {k: best[k] for k in ("trials", "trials_stopped_early", "errored_trials",
                                        "time_budget_s", "budget_reached")},
    }
    arrays = {"model": model, "config": config, "y_test": y_test, "prob_test": prob_test,
              "test_paths": [ds.paths[i] for i in test_rows], "class_names": ds.class_names,
              "test_files": [ds.root / ds.paths[i] for i in test_rows]}
    return metrics, arrays


def write_predictions(path: Path, arrays: dict) -> None:
    rows = [{"path": p, "label": arrays["class_names"][y], "prob": float(q)}
            for p, y, q in zip(arrays["test_paths"], arrays["y_test"], arrays["prob_test"],
                               strict=True)]
    write_json(path, rows)
