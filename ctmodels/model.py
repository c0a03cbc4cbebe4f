"""A network as ctscan trains, scores and ships it: its description (everything but the weights),
the input normalisation, probabilities from uint8 slices, and the one loader of weights files.

A checkpoint and an exported model.pt both hold {"description": ModelDescription.to_dict(), ...}
with the weights, so every place that rebuilds a network rebuilds the same one.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctmodels.resnet import WeightsError, build_model

# Intensity normalisation applied after scaling uint8 to [0, 1]. Mean/std of the padded 224 px
# sarscov2-ct-sample slices (0.471 / 0.365 measured, rounded); fixed constants so a checkpoint's
# inputs never depend on which split computed them.
NORM_MEAN = 0.47
NORM_STD = 0.36
# The precision setting of a run; resolve_precision turns it into "bf16" or "fp32".
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelDescription:
    """How to build a network and how to feed it: uint8 slices decoded to image_size x
    image_size by `resize`, scaled to [0, 1], then (x - mean) / std."""

    arch: str = "resnet18"
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    activation: str = "relu"
    image_size: int = 224
    resize: str = "pad"
    mean: float = NORM_MEAN
    std: float = NORM_STD

    def build(self, weights: str = "none") -> nn.Module:
        return build_model(self.arch, self.head, self.dropout, self.activation, weights)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "head": list(self.head)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "") -> ModelDescription:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise WeightsError(f"{source}: not a model description ({values!r:.80})")
        return cls(**{**values, "head": tuple(values.get("head", ()))})


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [B, H, W] -> float32 [B, 1, H, W]: scaled to [0, 1], then (x - mean) / std, with
    the mean and std of the model description the images are fed to."""
    return torch.mul(images.unsqueeze(1), 1.0 / (255.0 * std)).add_(-mean / std)


class Ensemble(nn.Module):
    """Several networks as one: the logit of their weighted mean probability (one member: its
    logit), divided by a temperature fitted on validation data (1: uncalibrated). Each member's
    logit is first divided by its own temperature (`member_temperatures`, 1 when not given), so
    the mean is of calibrated probabilities, as ensemble selection weighed them. The weights
    (equal when not given) are those ensemble selection chose on validation data; they are
    normalised to sum to 1."""

    def __init__(self, members: list[nn.Module], temperature: float = 1.0,
                 weights: list[float] | None = None,
                 member_temperatures: list[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperature = float(temperature)
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or min(weights) <= 0:
            raise ValueError(f"{len(members)} members need as many positive weights, got "
                             f"{weights}")
        self.weights = [w / sum(weights) for w in weights]  # a list: TorchScript keeps floats
        temperatures = ([1.0] * len(members) if member_temperatures is None
                        else [float(t) for t in member_temperatures])
        if len(temperatures) != len(members) or min(temperatures) <= 0:
            raise ValueError(f"{len(members)} members need as many positive temperatures, got "
                             f"{temperatures}")
        self.member_temperatures = temperatures

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            logits = self.members[0](x) / self.member_temperatures[0]
        else:
            prob = torch.zeros(())
            for i, member in enumerate(self.members):  # TorchScript can't zip a ModuleList
                logit = member(x).float() / self.member_temperatures[i]
                prob = prob + self.weights[i] * torch.sigmoid(logit)
            logits = torch.logit(prob, eps=1e-7)
        return logits / self.temperature


class UInt8Classifier(nn.Module):
    """Takes decoded grayscale slices as uint8 [B, S, S]; returns positive-class logits [B], so
    a user of the TorchScript or ONNX file needs no ctscan code."""

    def __init__(self, model: nn.Module, description: ModelDescription):
        super().__init__()
        self.model = model
        self.mean, self.std = description.mean, description.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A float image in 0..1 would run silently and give garbage; refuse it instead.
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError("expected a uint8 tensor [B, S, S] of decoded grayscale slices")
        return self.model(normalize(images, self.mean, self.std)).squeeze(1)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (x86 AVX512-BF16 or AMX), through torch's own
    CPU check when this torch has it, else the flags in /proc/cpuinfo."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags")
             for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """What the setting `precision` (auto | fp32 | bf16) runs as on `device`: "bf16" (autocast;
    weights, optimizer and loss stay fp32) or "fp32". auto is bf16 on CUDA and on CPUs with bf16
    instructions (AVX512-BF16 or AMX), where it trains faster (bench/cpu_precision.py), and fp32
    on other CPUs and devices. An explicit bf16 is honoured everywhere: on a CPU without those
    instructions it is emulated, slower but correct."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in at a resolved precision ("bf16" or "fp32"). bf16 needs
    no loss scaling (fp16 would); the classifier head runs in fp32 inside it (resnet.Fp32Head)."""
    if precision == "bf16":
        return torch.autocast(device.type, torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"autocast takes a resolved precision, bf16 or fp32, got {precision!r}")


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, description: ModelDescription,
                  precision: str = "fp32", batch_size: int = 256,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Probability of the positive class for a uint8 [N, S, S] tensor (its `rows` only, when
    given: gathered a chunk at a time), normalised as `description` says, on the model's device;
    no augmentation. The images may be elsewhere (the host): each chunk is copied over as uint8.

    `precision` as in resolve_precision; fp32 by default, as the exported TorchScript and ONNX
    files run. The logits are fp32 either way (the head runs in fp32). The model is switched to
    channels_last in place (the same weights; faster convolutions on CPU and GPU alike)."""
    model.eval()
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    model.to(memory_format=torch.channels_last)
    out = []
    chunks = (images.split(batch_size) if rows is None else
              (images.index_select(0, part) for part in rows.split(batch_size)))
    for chunk in chunks:
        x = normalize(chunk.to(device), description.mean, description.std)
        with autocast(device, precision):
            out.append(model(x.contiguous(memory_format=torch.channels_last)).squeeze(1).float())
    return torch.sigmoid(torch.cat(out))


def load_model(path: Path) -> tuple[nn.Module, ModelDescription]:
    """The network in a training checkpoint ({"model": state_dict, "description": ...}) or an
    exported model.pt ({"members": [such entries, each with its "weight"], "temperature": T}, an
    Ensemble when several or calibrated), in eval mode on the CPU, with the description of its
    input. Loaded with weights_only=True: a file cannot run code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, pickle with code, not torch at all
        raise WeightsError(f"{path}: not a ctscan checkpoint or model (truncated or corrupt, or "
                           f"not a torch file; {type(e).__name__})") from e
    entries = saved.get("members", [saved]) if isinstance(saved, dict) else [None]
    if not all(isinstance(e, dict) and "description" in e and "model" in e for e in entries):
        raise WeightsError(f"{path}: holds no model description; it was written by another "
                           "program or by ctscan 0.1, whose files this version cannot rebuild")
    members, inputs = [], set()
    for entry in entries:
        description = ModelDescription.from_dict(entry["description"], str(path))
        member = description.build()
        try:
            member.load_state_dict(entry["model"])
        except RuntimeError as e:
            raise WeightsError(f"{path}: weights do not fit {description.arch} with head "
                               f"{list(description.head)} ({str(e).splitlines()[0]})") from e
        members.append(member)
        inputs.add((description.image_size, description.resize, description.mean,
                    description.std))
    if len(inputs) > 1:
        raise WeightsError(f"{path}: its members expect different inputs {sorted(inputs)}")
    temperature = float(saved.get("temperature", 1.0))
    temperatures = [float(e.get("temperature", 1.0)) for e in entries]  # none before 0.4
    model = (members[0] if len(members) == 1 and temperature == 1.0 == temperatures[0]
             else Ensemble(members, temperature, [e.get("weight", 1.0) for e in entries],
                           temperatures))
    return model.eval(), ModelDescription.from_dict(entries[0]["description"], str(path))


def check_weights(description: ModelDescription, weights: str, archs: set[str] = frozenset()
                  ) -> None:
    """Initial weights must load before anything is written: the network is built with them once
    for each of `archs` (default: the description's own), which also fetches ImageNet weights
    into torch's cache."""
    if weights == "none":
        return
    for arch in sorted(archs or {description.arch}):
        dataclasses.replace(description, arch=arch).build(weights)
