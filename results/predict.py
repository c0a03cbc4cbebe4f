"""Classify image files with an exported model, preprocessed exactly as in training.

With torch installed the folder's state_dict runs; without it, its ONNX file runs on
onnxruntime, so this module imports torch only through `load_predictor`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_utils.decode import decode_failure, decode_image
from data_utils.files import atomic_write
from data_utils.sources import IMAGE_SUFFIXES, image_files
from results.model_folder import load_predictor, read_config


def expand_paths(paths: list[Path]) -> list[Path]:
    """Folders become their image files (recursively, sorted); files are kept as given.

    A file named explicitly is kept whatever its suffix, so its decode error says what is wrong
    with it; a missing path stays in and becomes an error row too.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += image_files(path)
        else:
            out.append(path)
    return out


def decode_batches(files: list[Path], config: dict, batch_size: int
                   ) -> Iterator[list[tuple[Path, np.ndarray | None, str | None]]]:
    """(path, uint8 [S, S] pixels or None, error or None) per file, batch_size files at a time."""
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                pixels = decode_image(path.read_bytes(), config["image_size"],
                                      config["resize"]).pixels
                batch.append((path, pixels, None))
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
                batch.append((path, None, decode_failure(e)))
        yield batch


def predict_paths(
    model_dir: Path,
    paths: list[Path],
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict]:
    """One row per image: {"path", "prob", "label", "error"}; unreadable files get an error row.

    Rows follow the input order, folders expanded in place; a folder without any image file
    gets an error row of its own at the end, so it is not silently skipped.
    """
    config = read_config(model_dir)
    predict = load_predictor(model_dir)
    negative, positive = config["class_names"]
    threshold = config["threshold"]
    rows: list[dict] = []
    empty: list[dict] = []
    files: list[Path] = []
    for path in map(Path, paths):
        found = expand_paths([path])
        if not found:  # only a folder expands to nothing
            suffixes = " ".join(sorted(IMAGE_SUFFIXES))
            empty.append(_row(path, error=f"no image files ({suffixes}) in this folder"))
        files += found
    # A bar only when there is something to wait for; a handful of files prints no noise.
    with tqdm(total=len(files), unit="img", disable=not progress or len(files) <= batch_size,
              desc="predict") as bar:
        for batch in decode_batches(files, config, batch_size):
            ok = [pixels for _, pixels, _ in batch if pixels is not None]
            probs = iter(predict(np.stack(ok)).tolist() if ok else [])
            for path, pixels, error in batch:
                if pixels is None:
                    rows.append(_row(path, error=error))
                else:
                    prob = next(probs)
                    rows.append(_row(path, prob, positive if prob >= threshold else negative))
            bar.update(len(batch))
    return rows + empty


def _row(path: Path, prob: float | None = None, label: str | None = None,
         error: str | None = None) -> dict:
    return {"path": str(path), "prob": prob, "label": label, "error": error}


def write_predictions_csv(rows: list[dict], path: Path, positive_class: str) -> None:
    """CSV with columns path, prob_<positive_class>, label, error (empty where not applicable)."""
    with atomic_write(Path(path), "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", f"prob_{positive_class}", "label", "error"])
        for r in rows:
            prob = "" if r["prob"] is None else repr(r["prob"])  # repr: round-trips exactly
            writer.writerow([r["path"], prob, r["label"] or "", r["error"] or ""])
