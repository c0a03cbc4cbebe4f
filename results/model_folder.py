"""An exported model folder as a user receives it: its files, its config, and probabilities from
it with torch or, where torch is absent, with onnxruntime alone.

Nothing here imports torch at module level, so `ctscan predict` runs on a machine that has only
onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit

from data_utils.errors import UserError, first_line

if TYPE_CHECKING:  # torch is imported only where a function needs it
    from torch import nn

    from ctmodels import ModelDescription

FILES = {
    "state_dict": "model.pt",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "config_json": "config.json",
    "config_yaml": "config.yaml",
    "model_card": "model_card.md",
}
# What loading needs; checked so a hand-edited config fails with a readable message.
REQUIRED_KEYS = ("members", "image_size", "resize", "threshold", "class_names")
# uint8 slices [B, S, S] -> probabilities [B]
Predictor = Callable[[np.ndarray], np.ndarray]


class ModelFolderError(UserError):
    """A model folder that is missing, incomplete, or not one `ctscan export` wrote."""


def read_config(model_dir: Path) -> dict:
    """An exported model's config.json; errors name the missing folder, file or keys."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"{model_dir}: no such model folder")
    path = model_dir / FILES["config_json"]
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; is {model_dir} an exported model?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise ModelFolderError(f"{path}: not a ctscan model config ({first_line(e)})") from e
    missing = [k for k in REQUIRED_KEYS if k not in meta] if isinstance(meta, dict) else ["all"]
    if missing:
        raise ModelFolderError(f"{path}: missing keys {missing}")
    return meta


def package_versions() -> dict[str, str | None]:
    """The versions config.json records (and the ledger, of ctscan); here, not in export, so that
    what runs without torch (predict on onnxruntime) can call it."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "onnxruntime", "ctscan"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # e.g. run from a source tree
            versions[name] = None
    return versions


def load_exported(model_dir: Path) -> tuple[nn.Module, ModelDescription, dict]:
    """Rebuild an exported model (eval mode) and return it with the description of its input and
    its config dict. Needs torch."""
    from ctmodels import load_model

    model_dir = Path(model_dir)
    meta = read_config(model_dir)
    weights = model_dir / FILES["state_dict"]
    if not weights.is_file():
        raise ModelFolderError(f"{weights}: missing; is {model_dir} an exported model?")
    model, description = load_model(weights)
    return model, description, meta


def load_predictor(model_dir: Path) -> Predictor:
    """Probabilities from the folder's state_dict with torch, else from its ONNX file."""
    try:
        import torch
    except ImportError:
        return onnx_predictor(model_dir)
    from ctmodels import predict_proba

    model, description, _ = load_exported(model_dir)
    return lambda images: predict_proba(model, torch.from_numpy(images), description).numpy()


def onnx_predictor(model_dir: Path) -> Predictor:
    """The ONNX file run by onnxruntime on the CPU: uint8 [B, S, S] in, logits out."""
    path = Path(model_dir) / FILES["onnx"]
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; without torch, predict needs the ONNX file "
                               "that `ctscan export` writes")
    try:
        import onnxruntime
    except ImportError as e:
        raise ModelFolderError("neither torch nor onnxruntime is installed; "
                               "pip install onnxruntime to run model.onnx") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(images: np.ndarray) -> np.ndarray:
        logits = session.run(None, {name: np.ascontiguousarray(images, dtype=np.uint8)})[0]
        return expit(logits.astype(np.float64))

    return predict
