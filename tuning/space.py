"""The search space: a YAML file of training-config keys, each fixed or drawn from a distribution.

Checked completely before Ray starts, so a typo costs seconds, not a cluster's start-up.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import yaml
from ray import tune

from tuning.config import ConfigError, TrainConfig, make_config

DEFAULT_SPACE = Path(__file__).with_name("search_space.yaml")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


def load_space(path: Path = DEFAULT_SPACE) -> dict:
    """Parse and check a space file; returns {key: fixed value | {distribution: args}}."""
    try:
        space = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read search space ({e})") from e
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: expected a mapping of config keys to values or distributions")
    known = typing.get_type_hints(TrainConfig)
    for key, spec in space.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown config key {key!r} in search space")
        if isinstance(spec, dict):
            _check_distribution(path, key, spec)
            values = spec.get("choice") or spec[next(iter(spec))]
        else:
            values = [spec]
        for value in values:  # every fixed value, choice and bound must be a valid config value
            try:
                make_config({key: value})
            except ConfigError as e:
                raise ConfigError(f"{path}: {key}: {e}") from e
    return space


def _check_distribution(path: Path, key: str, spec: dict) -> None:
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: {key}: expected one of {DISTRIBUTIONS}, got {spec}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: {key}: choice needs a non-empty list, got {args!r}")
        return
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{path}: {key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if low > high:
        raise ConfigError(f"{path}: {key}: {kind} low {low} > high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{path}: {key}: loguniform needs low > 0, got {low}")


def to_param_space(space: dict) -> dict:
    """Ray Tune's param_space. Optuna's categorical distributions take only scalars, so a choice
    among lists (head sizes) travels as JSON strings; `decode_params` turns them back."""
    params = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            params[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            params[key] = tune.choice([_encode(v) for v in args])
        elif kind == "randint":
            params[key] = tune.randint(args[0], args[1] + 1)  # Ray's upper bound is exclusive
        else:
            params[key] = getattr(tune, kind)(*args)
    return params


def _encode(value):
    return json.dumps(value) if isinstance(value, list | dict) else value


def decode_params(params: dict) -> dict:
    """Undo `to_param_space`'s JSON encoding of list values (head sizes)."""
    return {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v
            for k, v in params.items()}


def searched_keys(space: dict) -> list[str]:
    return [k for k, spec in space.items() if isinstance(spec, dict)]
