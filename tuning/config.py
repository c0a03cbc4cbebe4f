"""One typed training config: defaults here, then a YAML file, then `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from data_utils.decode import RESIZE_MODES
from data_utils.errors import UserError
from data_utils.files import atomic_write

if TYPE_CHECKING:  # ctmodels imports torch: seconds, which --help should not pay
    from ctmodels.model import ModelDescription


# The precision setting (ctmodels.model.PRECISIONS, here without importing torch): auto is bf16
# on CUDA and on CPUs with bf16 instructions, fp32 elsewhere (ctmodels.model.resolve_precision).
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(UserError, ValueError):
    """A config key or value the user has to fix; the message names the key."""


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = False

    def holds(self, x: float) -> bool:
        return (math.isfinite(x)
                and (self.low <= x if self.low_closed else self.low < x)
                and (x <= self.high if self.high_closed else x < self.high))

    def __str__(self) -> str:
        low, high = (f"{x:.0f}" if math.isfinite(x) and x == int(x) else f"{x:g}"
                     for x in (self.low, self.high))
        return f"{'[' if self.low_closed else '('}{low}, {high}{']' if self.high_closed else ')'}"


# The valid values of every numeric key: checked for each config, and so for every value a search
# space can draw. Nothing out of range is ever replaced by a default.
RANGES = {
    "lr": Interval(0, math.inf, low_closed=False),
    "weight_decay": Interval(0, math.inf),
    "momentum": Interval(0, 1),
    "batch_size": Interval(2, math.inf),  # BatchNorm cannot train on a batch of one
    "epochs": Interval(1, math.inf),
    "warmup_epochs": Interval(0, math.inf),
    "label_smoothing": Interval(0, 0.5),  # at 0.5 every target is 0.5
    "pos_weight": Interval(0, math.inf, low_closed=False),  # or None: 1
    "image_size": Interval(32, 2048, high_closed=True),  # a ResNet halves it five times
    "aug_strength": Interval(0, 1, high_closed=True),
    "dropout": Interval(0, 1),
    "head": Interval(1, math.inf),  # every hidden layer's width
    "num_workers": Interval(0, math.inf),
    "patience": Interval(1, math.inf),
    "min_delta": Interval(0, math.inf),
    "seed": Interval(0, 2**32),  # numpy's seeds
    "freeze_backbone_epochs": Interval(0, math.inf),
}


@dataclass
class TrainConfig:
    # model
    arch: str = "resnet18"
    head: list[int] = field(default_factory=list)  # hidden layer sizes of the classifier head
    dropout: float = 0.0
    activation: str = "relu"
    weights: str = "none"  # none | imagenet | PATH to a state_dict
    # Train only the head for this many epochs first (pretrained weights only); the backbone's
    # BatchNorm statistics stay frozen too, and the lr warmup and schedule start at the thaw.
    freeze_backbone_epochs: int = 0
    # optimisation
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    batch_size: int = 32
    epochs: int = 20
    lr_schedule: str = "cosine"  # cosine (after linear warmup) | constant
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    # Validate, keep and export an exponential moving average of the weights. Off: on demo data
    # it widened the val-test AUC gap (bench/ema_gap.py).
    ema: bool = False
    pos_weight: float | None = None  # BCE weight of positives; None = 1
    # data
    image_size: int = 224
    resize: str = "pad"
    aug_strength: float = 0.5  # scales every augmentation range; 0 = none
    num_workers: int = 0  # CPU threads for torch on CPU; 0 = torch's default
    # early stopping on val AUC
    patience: int = 5
    min_delta: float = 0.001
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; the head and loss stay fp32)

    def __post_init__(self) -> None:
        # Here, not at the top: ctmodels imports torch and torchvision (seconds), and the CLI
        # imports this module for every command, `--help` included.
        from ctmodels.resnet import ACTIVATIONS, ARCHS

        _check_choice("arch", self.arch, ARCHS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("optimizer", self.optimizer, ("adamw", "sgd"))
        _check_choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _check_choice("resize", self.resize, RESIZE_MODES)
        _check_choice("precision", self.precision, PRECISIONS)
        if not self.weights.strip():
            raise ConfigError("weights must be none, imagenet or a path to a state_dict, got ''")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for key, interval in RANGES.items():
            value = getattr(self, key)
            for number in value if isinstance(value, list) else [value]:
                if number is not None and not interval.holds(number):
                    raise ConfigError(f"{key} must be in {interval}, got {number}")
        if self.freeze_backbone_epochs and self.weights == "none":
            raise ConfigError("freeze_backbone_epochs needs pretrained weights (weights: imagenet "
                              "or a path); with random weights it would train a head on noise")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def acting(self) -> dict:
        """to_dict() without the keys that do not act on this run: momentum only with SGD, the
        warmup only before a cosine schedule, freezing only with pretrained weights (with
        random ones it must be 0)."""
        idle = {"momentum": self.optimizer != "sgd", "warmup_epochs": self.lr_schedule != "cosine",
                "freeze_backbone_epochs": self.weights == "none"}
        return {k: v for k, v in self.to_dict().items() if not idle.get(k, False)}

    def description(self) -> ModelDescription:
        """The network this config trains, as every checkpoint and export records it."""
        from ctmodels.model import ModelDescription

        return ModelDescription(self.arch, tuple(self.head), self.dropout, self.activation,
                                self.image_size, self.resize)


FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {sorted(choices)}, got {value!r}")


def coerce(key: str, value):
    """`value` as config key `key`'s type, unchecked against the other keys."""
    if key not in FIELD_TYPES:
        raise _unknown_key(key)
    return _coerce(key, value, FIELD_TYPES[key])


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; known keys: {', '.join(FIELD_TYPES)}")


def _coerce(key: str, value, annotation):
    """YAML reads `lr: 1` as int: convert to the field's type or say why."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    try:
        if origin is list:
            if not isinstance(value, list | tuple):
                raise TypeError
            return [_coerce(key, v, typing.get_args(hint)[0]) for v in value]
        if origin is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            return float(value)
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is str and isinstance(value, str | int | float):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string; YAML 1.2 and every
    user read it as a number. And PyYAML keeps the last of two equal keys, so a config or space
    that sets `lr` twice would silently use one of them: that is an error here, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # PyYAML's own error names it
                continue
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (also on line {first_line[key]})",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str):
    """Parse YAML; a syntax error or an unsafe tag is a ConfigError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_YAMLLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from e


def make_config(values: dict) -> TrainConfig:
    """Build a config from a dict; unknown keys are an error naming the key."""
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise _unknown_key(unknown[0])
    return TrainConfig(**{k: coerce(k, v) for k, v in values.items()})


def load_config(path: Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- YAML file <- `key=value` overrides (values parsed as YAML: 1e-3, [256, 64])."""
    values: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from e
        loaded = load_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = load_yaml(raw, f"--set {item}")
    return make_config(values)


def save_config(config: TrainConfig, path: Path) -> None:
    with atomic_write(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
