"""ResNet backbones from torchvision for 1-channel CT slices, with a configurable binary head."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from data_utils.errors import UserError, first_line

# name -> (builder, ImageNet weights enum); adding an architecture is one line.
ARCHS: dict[str, tuple[Callable[..., models.ResNet], models.WeightsEnum]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2),
}
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class WeightsError(UserError):
    """Pretrained weights could not be obtained or do not fit the model."""


def build_model(
    arch: str = "resnet18",
    head: Sequence[int] = (),
    dropout: float = 0.0,
    activation: str = "relu",
    weights: str = "none",
) -> models.ResNet:
    """A ResNet taking [B, 1, H, W] and returning one logit per image (positive class).

    weights: "none" (random init), "imagenet" (torchvision's weights, downloaded into the
    standard TORCH_HOME cache) or a path to a state_dict (torchvision's RGB file or ours).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    builder, imagenet = ARCHS[arch]
    model = builder()  # random init; pretrained weights are loaded below so errors are ours
    rgb_conv = model.conv1
    model.conv1 = nn.Conv2d(1, rgb_conv.out_channels, rgb_conv.kernel_size, rgb_conv.stride,
                            rgb_conv.padding, bias=False)
    model.fc = _head(model.fc.in_features, head, dropout, ACTIVATIONS[activation])
    if weights == "imagenet":
        _load_backbone(model, _download(arch, imagenet), source=f"torchvision {imagenet}")
    elif weights != "none":
        load_weights_file(model, Path(weights))
    return model


class Fp32Head(nn.Sequential):
    """The classifier head, run in fp32 even inside bf16 autocast: the logits that the loss,
    val AUC, early stopping, the search and evaluation read carry fp32 precision, not bf16's
    8 bits, so no choice rests on rounded ties. An nn.Sequential still, so its state_dict keys
    (fc.0.weight...) are those of older checkpoints and exported models.

    Why the head and not an all-fp32 validation: on a 2-core AVX512-BF16 CPU, validation's
    forward pass ran 1.5-2x faster in bf16 with this head than wholly in fp32 (ResNet-18/34 at
    128 px, bench/cpu_precision.py), and the head in fp32 costs no measurable training time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript wants a constant autocast device; exports
            return self._layers(x.float())  # run in fp32 anyway
        with torch.autocast(x.device.type, enabled=False):
            return self._layers(x.float())

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def _head(features: int, hidden: Sequence[int], dropout: float,
          activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Dropout(dropout), nn.Linear(features, size), activation()]
        features = size
    return Fp32Head(*layers, nn.Dropout(dropout), nn.Linear(features, 1))


def _download(arch: str, weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - URLError, timeouts, bad hash: all mean "no weights"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(
            f"could not get ImageNet weights for {arch} ({first_line(e)}); on a machine with "
            f"internet download {weights.url} and copy it to {cache} (the folder follows "
            "$TORCH_HOME), or pass weights=PATH to a local state_dict, or weights=none"
        ) from e


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a torchvision RGB state_dict (backbone only) or a ctscan one (whole model)."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, pickle with code, not torch at all
        # torch's own message is a paragraph about weights_only; what the user needs is this:
        raise WeightsError(f"{path}: not a loadable state_dict (truncated or corrupt, not a "
                           f"torch file, or holds more than tensors; {type(e).__name__})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a ctscan training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state_dict of tensors")
    if state.get("conv1.weight", torch.empty(0)).shape[1:2] == (3,):
        _load_backbone(model, state, source=str(path))
    else:
        _load(model, state, source=str(path), skip_head=False)


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """ImageNet weights: sum conv1's RGB kernels into one channel; the new head stays random.

    Summing (not averaging) keeps activations the same scale for a gray image whose three
    channels would all have been equal.
    """
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    _load(model, state, source, skip_head=True)


def _load(model: nn.Module, state: dict[str, torch.Tensor], source: str, skip_head: bool) -> None:
    own = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong_shape:
        raise WeightsError(f"{source}: shapes do not match the model: {', '.join(wrong_shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (skip_head and k.startswith("fc."))]
    if missing or unexpected:
        raise WeightsError(
            f"{source}: weights do not fit the model; missing keys: {missing or 'none'}; "
            f"unexpected keys: {unexpected or 'none'}"
        )
