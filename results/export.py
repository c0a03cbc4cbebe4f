"""Ship a trained model: its weights with their description, a TorchScript and an ONNX file,
its config; the model card is written from that config (results.model_card).

Everything a user needs to rebuild the model or just run it lives in one folder:

    model.pt               {"members": [{"description", "model": state_dict, "weight"}]}: one
                           network, or the weighted ensemble of several (`ctmodels.load_model`)
    model.torchscript.pt   uint8 [B, S, S] -> positive-class logits [B]; needs only torch
    model.onnx             the same for onnxruntime; needs no torch
    config.json/.yaml      members, preprocessing, threshold, classes, training configs
    model_card.md          intended use, data, metrics, limitations, how to load
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml
from torch import nn

from ctmodels import Ensemble, UInt8Classifier
from data_utils.files import atomic_write, write_json
from results.model_card import model_card
from results.model_folder import FILES, package_versions
from tuning.config import TrainConfig

FORMAT = "ctscan-model"
FORMAT_VERSION = 2  # 2: model.pt holds described members; config.json lists them


def export_model(
    out_dir: Path,
    members: Sequence[tuple[nn.Module, TrainConfig]],
    class_names: tuple[str, str],
    threshold: float,
    extra: dict,
    member_extra: Sequence[dict] = (),
    temperature: float = 1.0,
    patient: dict | None = None,
    weights: Sequence[float] | None = None,
    member_temperatures: Sequence[float] | None = None,
) -> Path:
    """Write the model folder (each file atomically) and return its path. `members` is one
    (network, its training config) pair, or several for an ensemble (the mean probability of
    the members, each calibrated by its `member_temperatures` entry, weighted by `weights` when
    given, as ensemble selection chose them); the output logit is divided by `temperature`
    (calibration fitted on val). `patient`
    ({"aggregate", "threshold"}, chosen on val patients) is how to call a whole patient or CT
    series from its slices' probabilities, when the evaluation had patients.

    class_names is (negative, positive), as in `data_utils.sources.Source`. `extra` (searched
    hyperparameters, test_metrics, data fingerprints, trial id...) is added to the config files
    and used by the model card, `member_extra[i]` (e.g. the trial id) to member i's entry;
    neither may shadow the keys written here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # CPU, eval-mode copies in the default memory layout (training on CUDA uses channels_last):
    # the caller's models are untouched and the files load anywhere without a GPU.
    networks = [copy.deepcopy(m).to("cpu", memory_format=torch.contiguous_format).eval()
                for m, _ in members]
    descriptions = [config.description() for _, config in members]
    temperatures = list(member_temperatures or [1.0] * len(networks))
    model = (networks[0] if len(networks) == 1 and temperature == 1.0 == temperatures[0]
             else Ensemble(networks, temperature, weights, temperatures))
    weights = getattr(model, "weights", [1.0])  # normalised by Ensemble
    meta = _plain(export_config([c for _, c in members], class_names, threshold, extra,
                                member_extra, temperature, patient, weights, temperatures))

    with atomic_write(out_dir / FILES["state_dict"]) as f:
        torch.save({"members": [{"description": d.to_dict(), "model": n.state_dict(),
                                 "weight": w, "temperature": float(t)}
                                for d, n, w, t in zip(descriptions, networks, weights,
                                                      temperatures, strict=True)],
                    "temperature": float(temperature)}, f)
    uint8_model = UInt8Classifier(model, descriptions[0]).eval()
    with atomic_write(out_dir / FILES["torchscript"]) as f:
        _save_torchscript(uint8_model, f)
    with atomic_write(out_dir / FILES["onnx"]) as f:
        _save_onnx(uint8_model, descriptions[0].image_size, f)
    write_json(out_dir / FILES["config_json"], meta)
    with atomic_write(out_dir / FILES["config_yaml"], "w") as f:
        yaml.safe_dump(meta, f, sort_keys=False)
    with atomic_write(out_dir / FILES["model_card"], "w") as f:
        f.write(model_card(meta))
    return out_dir


def export_config(configs: Sequence[TrainConfig], class_names: tuple[str, str],
                  threshold: float, extra: dict, member_extra: Sequence[dict] = (),
                  temperature: float = 1.0, patient: dict | None = None,
                  weights: Sequence[float] | None = None,
                  member_temperatures: Sequence[float] | None = None) -> dict[str, Any]:
    """The content of config.json: everything needed to rebuild, feed and judge the model;
    "patient" ({"aggregate", "threshold"}) only when `patient` is given. Each member's
    "weight" is its share of the mean probability (equal when `weights` is None), and its
    "temperature" what its logit is divided by first (1 when not given)."""
    negative, positive = class_names
    first = configs[0].description()
    weights = weights or [1.0] * len(configs)
    temperatures = member_temperatures or [1.0] * len(configs)
    members = [{**config.description().to_dict(), **(member_extra[i] if member_extra else {}),
                "weight": weights[i] / sum(weights), "temperature": float(temperatures[i]),
                "train_config": dataclasses.asdict(config)}
               for i, config in enumerate(configs)]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "members": members,
        "image_size": first.image_size,
        "resize": first.resize,
        "input": {
            "dtype": "uint8",
            "shape": "[B, S, S] with S = image_size",
            "decode": "8-bit luminance (alpha dropped), then fit into S x S by `resize`: "
                      "pad = keep aspect ratio and pad with 0, stretch = plain resize; bilinear",
        },
        "normalization": {
            "scale": "uint8 pixels / 255 first",
            "mean": first.mean,
            "std": first.std,
            "formula": "x = (pixels / 255 - mean) / std, as float [B, 1, S, S]",
        },
        "output": "one logit per image for the positive class (of the members' mean "
                  "probability, each member's logit first divided by its own temperature, "
                  "weighted by their weights, divided by the temperature); "
                  "probability = sigmoid(logit)",
        "temperature": float(temperature),
        "threshold": float(threshold),
        "class_names": [negative, positive],
        "positive_class": positive,
        "negative_class": negative,
        "files": dict(FILES),
        "versions": package_versions(),
    }
    if patient is not None:
        meta["patient"] = {"aggregate": patient["aggregate"],
                           "threshold": float(patient["threshold"])}
    clash = sorted(set(meta) & set(extra))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the exported model's own fields")
    return {**meta, **extra}


def _save_torchscript(module: nn.Module, f: IO[bytes]) -> None:
    # TorchScript is deprecated in recent torch (FutureWarning) but is still the one format that
    # runs with `torch.jit.load` alone. Scripted, not traced: no input shape is baked in and the
    # uint8 check in forward survives.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), f)


def _save_onnx(module: nn.Module, image_size: int, f: IO[bytes]) -> None:
    """The dynamo exporter (torch.export), with the batch dimension left free. Its own graph
    optimiser is skipped (a third of the export's time): onnxruntime optimises the graph
    itself whenever it loads it."""
    example = torch.zeros(2, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # It prints its progress and warns about its own internals; neither concerns a user.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, optimize=False,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    f.write(program.model_proto.SerializeToString())


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy: numpy scalars and arrays, tuples and Paths become plain values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
