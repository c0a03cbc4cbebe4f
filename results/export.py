"""Ship a trained model: state_dict, a plain-torch TorchScript file, its config and a model card.

Everything a user needs to rebuild the model or just run it lives in one folder:

    model.pt               state_dict for `ctmodels.build_model` (loaded with weights_only=True)
    model.torchscript.pt   uint8 [B, S, S] -> positive-class logits [B]; needs only torch
    config.json/.yaml      architecture, preprocessing, threshold, classes, training config
    model_card.md          intended use, data, metrics, limitations, how to load
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import io
import math
import platform
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml
from torch import nn

from ctmodels import build_model
from data_utils.augment import NORM_MEAN, NORM_STD
from data_utils.files import atomic_write, write_json
from data_utils.split import GROUPING_MEANING
from results.model_folder import FILES, ModelFolderError, read_config
from tuning.config import TrainConfig

FORMAT = "ctscan-model"
FORMAT_VERSION = 1
class UInt8Classifier(nn.Module):
    """Takes decoded grayscale slices as uint8 [B, S, S]; returns positive-class logits [B].

    Normalises exactly like `data_utils.augment.normalize` (x * scale + offset, with
    scale = 1 / (255 std) and offset = -mean / std), so a user needs no ctscan code.
    """

    def __init__(self, model: nn.Module, mean: float = NORM_MEAN, std: float = NORM_STD):
        super().__init__()
        self.model = model
        self.scale = 1.0 / (255.0 * std)
        self.offset = -mean / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A float image in 0..1 would run silently and give garbage; refuse it instead.
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError("expected a uint8 tensor [B, S, S] of decoded grayscale slices")
        x = torch.mul(images.unsqueeze(1), self.scale).add_(self.offset)
        return self.model(x).squeeze(1)


def export_model(
    out_dir: Path,
    model: nn.Module,
    config: TrainConfig,
    class_names: tuple[str, str],
    threshold: float,
    extra: dict,
) -> Path:
    """Write the model folder (each file atomically) and return its path.

    class_names is (negative, positive), as in `data_utils.sources.Source`. `extra` (searched
    hyperparameters, test_metrics, data fingerprints, trial id...) is added to the config files
    and used by the model card; its keys may not shadow the ones written here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A CPU, eval-mode copy in the default memory layout (training on CUDA uses channels_last):
    # the caller's model is untouched and the files load anywhere without a GPU.
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    meta = _plain(export_config(config, class_names, threshold, extra))

    with atomic_write(out_dir / FILES["state_dict"]) as f:
        torch.save(model.state_dict(), f)
    uint8_model = UInt8Classifier(model).eval()
    with atomic_write(out_dir / FILES["torchscript"]) as f:
        _save_torchscript(uint8_model, f)
    with atomic_write(out_dir / FILES["onnx"]) as f:
        _save_onnx(uint8_model, config.image_size, f)
    write_json(out_dir / FILES["config_json"], meta)
    with atomic_write(out_dir / FILES["config_yaml"], "w") as f:
        yaml.safe_dump(meta, f, sort_keys=False)
    with atomic_write(out_dir / FILES["model_card"], "w") as f:
        f.write(model_card(meta))
    return out_dir


def export_config(config: TrainConfig, class_names: tuple[str, str], threshold: float,
                  extra: dict) -> dict[str, Any]:
    """The content of config.json: everything needed to rebuild, feed and judge the model."""
    negative, positive = class_names
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": config.arch,
        "head": list(config.head),
        "dropout": config.dropout,
        "activation": config.activation,
        "image_size": config.image_size,
        "resize": config.resize,
        "input": {
            "dtype": "uint8",
            "shape": "[B, S, S] with S = image_size",
            "decode": "8-bit luminance (alpha dropped), then fit into S x S by `resize`: "
                      "pad = keep aspect ratio and pad with 0, stretch = plain resize; bilinear",
        },
        "normalization": {
            "scale": "uint8 pixels / 255 first",
            "mean": NORM_MEAN,
            "std": NORM_STD,
            "formula": "x = (pixels / 255 - mean) / std, as float [B, 1, S, S]",
        },
        "output": "one logit per image for the positive class; probability = sigmoid(logit)",
        "threshold": float(threshold),
        "class_names": [negative, positive],
        "positive_class": positive,
        "negative_class": negative,
        "files": dict(FILES),
        "train_config": dataclasses.asdict(config),
        "versions": package_versions(),
    }
    clash = sorted(set(meta) & set(extra))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the exported model's own fields")
    return {**meta, **extra}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "ctscan"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # e.g. run from a source tree
            versions[name] = None
    return versions


def load_exported(model_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild an exported model (eval mode) and return it with its config dict."""
    model_dir = Path(model_dir)
    meta = read_config(model_dir)
    if not (model_dir / FILES["state_dict"]).is_file():
        raise ModelFolderError(f"{model_dir / FILES['state_dict']}: missing; is {model_dir} "
                               "an exported model?")
    try:
        model = build_model(meta["arch"], meta["head"], meta["dropout"], meta["activation"],
                            weights=str(model_dir / FILES["state_dict"]))
    except ValueError as e:  # an arch or activation this version does not know
        raise ModelFolderError(f"{model_dir / FILES['config_json']}: {e}") from e
    return model.eval(), meta


def _save_torchscript(module: nn.Module, f: IO[bytes]) -> None:
    # TorchScript is deprecated in recent torch (FutureWarning) but is still the one format that
    # runs with `torch.jit.load` alone. Scripted, not traced: no input shape is baked in and the
    # uint8 check in forward survives.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), f)


def _save_onnx(module: nn.Module, image_size: int, f: IO[bytes]) -> None:
    """The dynamo exporter (torch.export), with the batch dimension left free."""
    example = torch.zeros(2, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # It prints its progress and warns about its own internals; neither concerns a user.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                    output_names=["logits"],
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


def model_card(meta: dict) -> str:
    """Markdown model card built from the exported config, so the two never disagree."""
    data = meta.get("data", {})
    size = meta["image_size"]
    lines = [
        f"# ctscan model: {meta['arch']} ({meta['positive_class']} vs {meta['negative_class']})",
        "",
        "## Intended use",
        "",
        "Research on classifying single CT slices as "
        f"{meta['positive_class']} or {meta['negative_class']}. **Not for diagnosis**: this is "
        "not a medical device and must not be used to make or support clinical decisions.",
        "",
        "## Model",
        "",
        f"- Architecture: {meta['arch']} (torchvision), 1-channel input, head {meta['head']}, "
        f"dropout {_fmt(meta['dropout'])}, activation {meta['activation']}",
        f"- Input: one grayscale slice, {size} x {size} px ({meta['resize']} resize), uint8; "
        f"normalised as (pixels / 255 - {meta['normalization']['mean']}) / "
        f"{meta['normalization']['std']}",
        f"- Output: one logit for `{meta['positive_class']}`; probability = sigmoid(logit)",
        f"- Decision threshold: probability >= {meta['threshold']:.4g} -> "
        f"`{meta['positive_class']}`, else `{meta['negative_class']}`",
    ]
    if "trial_id" in meta:
        lines.append(f"- Selected trial: {meta['trial_id']}")
    if meta.get("searched"):
        searched = ", ".join(f"{k}={_fmt(v)}" for k, v in meta["searched"].items())
        lines.append(f"- Searched hyperparameters: {searched}")
    lines += ["", "## Data", ""]
    lines += _bullets(data) if data else ["- Not recorded in this export."]
    lines += [
        f"- Grouping: {GROUPING_MEANING.get(data.get('group_by'), 'not recorded')}",
        "",
        "## Test metrics",
        "",
    ]
    metrics = meta.get("test_metrics") or {}
    if metrics:
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        for name, m in metrics.items():
            value, ci = (m.get("value"), m.get("ci95")) if isinstance(m, dict) else (m, None)
            interval = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
            lines.append(f"| {name} | {_fmt(value)} | {interval} |")
        lines += ["", "Intervals are bootstrap 95% CIs over test slices."]
    else:
        lines.append("Not recorded in this export.")
    lines += [
        "",
        "## Limitations",
        "",
        "- Single-centre data: the SARS-CoV-2 CT-scan dataset comes from hospitals in São Paulo, "
        "Brazil; scanners, protocols and populations elsewhere may differ and performance may "
        "drop without warning.",
        "- Slice-level, not patient-level: the model labels one slice at a time; it does not "
        "diagnose a patient or a scan.",
        "- Not a medical device: not validated clinically or approved by any regulator.",
        "- Bootstrap CIs over slices are optimistic when one patient contributes several test "
        "slices, because those slices are not independent.",
        "",
        "## How to load",
        "",
        "With plain torch (no ctscan), from uint8 slices decoded to grayscale and resized to "
        f"{size} x {size} as above:",
        "",
        "```python",
        "import torch",
        f"model = torch.jit.load({FILES['torchscript']!r})",
        f"prob = torch.sigmoid(model(images))  # images: torch.uint8 [B, {size}, {size}]",
        "```",
        "",
        "With ctscan, from the state_dict (loaded with `weights_only=True`); feed it "
        "`data_utils.augment.normalize(images)`:",
        "",
        "```python",
        "from ctmodels import build_model",
        f"model = build_model({meta['arch']!r}, {meta['head']}, {meta['dropout']}, "
        f"{meta['activation']!r}, weights={FILES['state_dict']!r}).eval()",
        "```",
        "",
        "or `model, config = results.export.load_exported(MODEL_DIR)`.",
        "",
    ]
    return "\n".join(lines)


def _bullets(d: dict, indent: str = "") -> list[str]:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"{indent}- {k}:", *_bullets(v, indent + "  ")]
        elif isinstance(v, list) and any(isinstance(x, dict | list) for x in v):
            # e.g. the skipped files: a card lists how many, config.json keeps them all
            lines.append(f"{indent}- {k}: {len(v)} (listed in {FILES['config_json']})")
        else:
            lines.append(f"{indent}- {k}: {_fmt(v)}")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
