"""Classify image files with an exported model, preprocessed exactly as in training.

With torch installed the folder's state_dict runs; without it, its ONNX file runs on
onnxruntime, so this module imports torch only through `load_predictor`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_utils.decode import decode_failure
from data_utils.files import atomic_write
from data_utils.identity import load_key
from data_utils.sources import IMAGE_SUFFIXES, Sample, image_files, unlabelled_slices
from data_utils.volumes import (
    DEFAULT_WINDOW,
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    decode_frames,
    slice_at,
)
from results.aggregate import aggregate_by_group
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


def decode_batches(samples: list[Sample], config: dict, batch_size: int
                   ) -> Iterator[list[tuple[Sample, np.ndarray | None, str | None]]]:
    """(sample, uint8 [S, S] pixels or None, error or None) per slice, batch_size at a time.
    Each file is read and decoded once: a volume's slices follow each other."""
    window = tuple(config.get("data", {}).get("window", DEFAULT_WINDOW))
    batch: list = []
    decoded: tuple[Path | None, list | str] = (None, [])
    for sample in samples:
        if decoded[0] != sample.path:
            try:
                decoded = (sample.path, decode_frames(sample.path.name, sample.path.read_bytes(),
                                                      config["image_size"], config["resize"],
                                                      window))
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
                decoded = (sample.path, decode_failure(e))
        frames = decoded[1]
        item = frames if isinstance(frames, str) else slice_at(frames, sample.frame)
        if isinstance(item, str):
            batch.append((sample, None, item))
        else:
            batch.append((sample, item.pixels, None))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_paths(
    model_dir: Path,
    paths: list[Path],
    batch_size: int = 64,
    progress: bool = True,
    per_slice: bool = False,
    show_paths: bool = False,
) -> list[dict]:
    """One row per image, and one per DICOM series or NIfTI volume with the probability its
    slices aggregate to (as evaluation chose on val, when the model was scored per patient):
    {"path", "prob", "label", "error", "slices"}. With per_slice, a series' slices get rows of
    their own after its row. Unreadable files get an error row.

    Rows follow the input order, folders expanded in place; a folder without any image file
    gets an error row of its own at the end, so it is not silently skipped. DICOM and NIfTI
    files are named by stand-ins (data_utils.identity) unless show_paths.
    """
    config = read_config(model_dir)
    predict = load_predictor(model_dir)
    negative, positive = config["class_names"]
    threshold = config["threshold"]
    patient = config.get("patient") or {"aggregate": "mean", "threshold": threshold}
    empty: list[dict] = []
    files: list[Path] = []
    for path in map(Path, paths):
        found = expand_paths([path])
        if not found:  # only a folder expands to nothing
            suffixes = " ".join(sorted(IMAGE_SUFFIXES | {*DICOM_SUFFIXES, *NIFTI_SUFFIXES}))
            empty.append(_row(path, error=f"no image files ({suffixes}) in this folder"))
        files += found
    samples, skipped = unlabelled_slices(files, load_key(),
                                         config.get("data", {}).get("slices", "all"), show_paths)
    slice_rows: list[tuple[Sample, dict]] = []
    # A bar only when there is something to wait for; a handful of files prints no noise.
    with tqdm(total=len(samples), unit="img", disable=not progress or len(samples) <= batch_size,
              desc="predict") as bar:
        for batch in decode_batches(samples, config, batch_size):
            ok = [pixels for _, pixels, _ in batch if pixels is not None]
            probs = iter(predict(np.stack(ok)).tolist() if ok else [])
            for sample, pixels, error in batch:
                if pixels is None:
                    slice_rows.append((sample, _row(sample.rel, error=error)))
                else:
                    prob = next(probs)
                    label = positive if prob >= threshold else negative
                    slice_rows.append((sample, _row(sample.rel, prob, label)))
            bar.update(len(batch))
    rows = _by_series(slice_rows, patient, (negative, positive), per_slice)
    return rows + [_row(s.path, error=s.reason) for s in skipped] + empty


def _by_series(slice_rows: list[tuple[Sample, dict]], patient: dict,
               class_names: tuple[str, str], per_slice: bool) -> list[dict]:
    """A 2-D image's row as it is; the slices of one series become one row where its first
    slice was, named by the folder (DICOM) or file (NIfTI) holding them, then, with per_slice
    (or when none could be read), their own rows."""
    members: dict[object, list[dict]] = {}  # in order of first appearance
    for i, (sample, row) in enumerate(slice_rows):
        members.setdefault(sample.series or i, []).append(row)  # a 2-D image: its own entry
    out = []
    for key, slices in members.items():
        if not isinstance(key, str):
            out += slices
            continue
        paths = [r["path"].rpartition("#")[0] or r["path"] for r in slices]
        name = os.path.commonpath(paths) if len(set(paths)) > 1 else paths[0]
        scored = [r["prob"] for r in slices if r["error"] is None]
        if scored:
            _, [prob] = aggregate_by_group(np.array(scored), np.zeros(len(scored)),
                                           patient["aggregate"])
            label = class_names[int(prob >= patient["threshold"])]
            out.append(_row(name, float(prob), label, slices=len(scored)))
        else:
            out.append(_row(name, error=f"none of its {len(slices)} slices could be read "
                                        f"(first: {slices[0]['error']})", slices=0))
        if per_slice or not scored:
            out += slices
    return out


def _row(path: Path | str, prob: float | None = None, label: str | None = None,
         error: str | None = None, slices: int | None = None) -> dict:
    return {"path": str(path), "prob": prob, "label": label, "error": error, "slices": slices}


def write_predictions_csv(rows: list[dict], path: Path, positive_class: str) -> None:
    """CSV with columns path, prob_<positive_class>, label, error, slices (a series' row: how
    many slices its probability aggregates); empty where not applicable."""
    with atomic_write(Path(path), "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", f"prob_{positive_class}", "label", "error", "slices"])
        for r in rows:
            prob = "" if r["prob"] is None else repr(r["prob"])  # repr: round-trips exactly
            slices = "" if r.get("slices") is None else r["slices"]
            writer.writerow([r["path"], prob, r["label"] or "", r["error"] or "", slices])
