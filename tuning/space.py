"""The search space: a YAML file of training-config keys, each fixed or drawn from a distribution,
plus the configs to evaluate first.

A `choice` may carry sub-spaces, one per option, drawn only when that option is chosen (the lr
range of SGD is not AdamW's). Such a parameter is named `key[option]` (`lr[sgd]`), so TPE never
mixes the two ranges' observations; `decode_params` maps the names back to config keys.
`SearchSpace` is Optuna's define-by-run function for Ray's OptunaSearch.

Checked completely before Ray starts, so a typo costs seconds, not a cluster's start-up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_utils import runfolder
from tuning.config import (
    FIELD_TYPES,
    ConfigError,
    TrainConfig,
    coerce,
    load_yaml,
    make_config,
)

DEFAULT_SPACE = Path(__file__).with_name("search_space.yaml")  # for GPUs
CPU_SPACE = DEFAULT_SPACE.with_name("search_space_cpu.yaml")
DEMO_SPACE = DEFAULT_SPACE.with_name("search_space_demo.yaml")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
START_KEY = "start_with"
# Settings of the data or the run, not of a model: a trial cannot change them (the dataset is
# decoded once for all trials; precision is the hardware's, how fast a trial learns, not what), so
# a space must not pretend to search them.
RUN_KEYS = {"image_size": "--image-size", "resize": "--resize", "epochs": "--max-epochs",
            "seed": "--seed", "device": "--gpus-per-trial", "num_workers": "--cpus-per-trial",
            "precision": "--precision"}
NUMBER = "trial_number"  # Optuna's count of the trial (0 = first proposed), carried in its config
# What a trial shows for a searched key that does not act on it (TrainConfig.acting: momentum
# unless the optimizer is SGD, warmup_epochs under a constant schedule, freeze_backbone_epochs
# with random weights): 0, each one's "off". All three are numbers, so the stand-in sits on the
# axis of the values drawn for the others, and it is a valid value of each key.
IDLE = 0


@dataclass
class SearchSpace:
    """A checked space file. Calling it with an Optuna trial draws one config (define-by-run)."""

    spec: dict  # key -> fixed value | {distribution: args}; a choice's args may map option -> spec
    start: list[dict]  # Optuna params of the configs evaluated before TPE proposes any
    path: str

    def __call__(self, trial) -> dict:
        """Suggest every searched parameter on `trial`; returns the fixed values and its number."""
        return {**_draw(self.spec, trial, ""), NUMBER: trial.number}

    def searched_keys(self) -> list[str]:
        """Config keys that some branch of the space searches, in file order."""
        return list(dict.fromkeys(_searched(self.spec)))

    def values_of(self, key: str, base_config: dict) -> set:
        """Every value a choice or fixed entry can give `key`, or base_config's if unsearched
        (for the checks a value needs before the run, such as weights that must be on disk)."""
        values = set(_values(self.spec, key))
        return values or {base_config.get(key, getattr(TrainConfig(), key))}

    def param_names(self, *keys: str) -> list[str]:
        """Parameter names (`lr`, `lr[sgd]`, ...) under which these config keys are searched."""
        return [name for name, key in _names(self.spec, "") if key in keys]


def load_space(path: str | Path = DEFAULT_SPACE, base_config: dict | None = None) -> SearchSpace:
    """Parse and check a space file (a path or a URI). Every value any distribution can draw,
    combined with base_config (the fixed keys of the run), must be a valid config."""
    try:
        text = runfolder.read_text(path)
        if text is None:
            raise ConfigError(f"{path}: no such search space file")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read search space ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from e
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of config keys to values or distributions")
    explicit_start = START_KEY in raw
    start = raw.pop(START_KEY, [{}])
    try:
        _check_spec(raw, dict(base_config or {}))
        points = _start_points(raw, start, dict(base_config or {}), strict=explicit_start)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if not any(_searched(raw)):  # every trial would train the same config
        raise ConfigError(f"{path}: searches nothing, every key is fixed; give one a "
                          "distribution (e.g. lr: {loguniform: [1.0e-4, 1.0e-2]}), or train this "
                          "config once with `ctscan train --config`")
    return SearchSpace(raw, points, str(path))


def _check_spec(spec: dict, context: dict, above: frozenset = frozenset()) -> None:
    """context: the base config plus the branch options chosen above this sub-space; above: the
    keys its enclosing spaces already set."""
    for key, value in spec.items():
        if key in RUN_KEYS:
            raise ConfigError(f"{key} is a setting of the run, not searched; use "
                              f"`ctscan tune {RUN_KEYS[key]}` instead")
        if key == START_KEY:
            raise ConfigError(f"{START_KEY} belongs at the top level of the space")
        if key not in FIELD_TYPES:
            raise ConfigError(f"unknown config key {key!r} in search space")
        if key in above:
            raise ConfigError(f"{key} is searched twice on one branch")
        if not isinstance(value, dict):
            _check_value(key, value, context)
            continue
        kind, args = _distribution(key, value)
        if kind == "choice" and isinstance(args, dict):
            for option, sub in args.items():
                _check_value(key, option, context)
                if sub is not None and not isinstance(sub, dict):
                    raise ConfigError(f"{key}: option {option!r} needs a mapping of config keys "
                                      f"(or nothing), got {sub!r}")
                _check_spec(sub or {}, {**context, key: option}, above | set(spec))
            continue
        if kind != "choice" and FIELD_TYPES[key] is int and kind != "randint":
            raise ConfigError(f"{key} is an integer; draw it with randint or choice, not {kind}")
        # Every choice and both bounds; the keys' valid ranges are intervals, so the values
        # between the bounds are valid too.
        for option in args:
            _check_value(key, option, context)


def _distribution(key: str, spec: dict) -> tuple[str, list | dict]:
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{key}: expected one of {DISTRIBUTIONS}, got {spec}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list | dict) or not args:
            raise ConfigError(f"{key}: choice needs a non-empty list (or a mapping of options "
                              f"to sub-spaces), got {args!r}")
        return kind, args
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if low > high:
        raise ConfigError(f"{key}: {kind} low {low} > high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{key}: randint needs integer bounds, got {args!r}")
    return kind, args


def _check_value(key: str, value, context: dict) -> None:
    try:
        make_config({**context, key: value})
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from e


def _draw(spec: dict, trial, suffix: str) -> dict:
    fixed = {}
    for key, value in spec.items():
        name = key + suffix
        if not isinstance(value, dict):
            fixed[name] = _encode(value)
            continue
        kind, args = next(iter(value.items()))
        if kind == "choice" and isinstance(args, dict):
            option = trial.suggest_categorical(name, list(args))
            fixed.update(_draw(args[option] or {}, trial, f"{suffix}[{option}]"))
        elif kind == "choice":
            trial.suggest_categorical(name, [_encode(v) for v in args])
        elif kind == "randint":
            trial.suggest_int(name, args[0], args[1])
        else:
            trial.suggest_float(name, args[0], args[1], log=kind == "loguniform")
    return fixed


def _names(spec: dict, suffix: str):
    """(parameter name, config key) of every searched parameter on every branch."""
    for key, value in spec.items():
        if isinstance(value, dict):
            yield key + suffix, key
            args = value.get("choice")
            if isinstance(args, dict):
                for option, sub in args.items():
                    yield from _names(sub or {}, f"{suffix}[{option}]")


def _values(spec: dict, key: str):
    for k, value in spec.items():
        args = value.get("choice") if isinstance(value, dict) else None
        if k == key:
            yield from ([value] if not isinstance(value, dict) else args or [])
        if isinstance(args, dict):
            for sub in args.values():
                yield from _values(sub or {}, key)


def _searched(spec: dict):
    for _, key in _names(spec, ""):
        yield key


def _start_points(spec: dict, start, base_config: dict, strict: bool) -> list[dict]:
    """Optuna params for each start config. A start config names some keys; the others take
    TrainConfig's defaults, so `{}` is the documented recipe. Where a default lies outside the
    space and the file listed no start configs, Optuna draws that parameter instead."""
    if not isinstance(start, list) or not all(isinstance(s, dict) for s in start):
        raise ConfigError(f"{START_KEY}: expected a list of config mappings, got {start!r}")
    defaults = TrainConfig().to_dict()
    points = []
    for i, values in enumerate(start):
        where = f"{START_KEY}[{i}]"
        try:
            make_config({**base_config, **values})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        config = {k: coerce(k, v) for k, v in {**defaults, **values}.items()}
        point, used = {}, set()
        _start_point(spec, config, set(values) if strict else set(), "", point, used, where)
        unused = sorted(set(values) - used)
        if unused:
            raise ConfigError(f"{where}: {unused[0]} is not searched on this branch of the space")
        points.append(point)
    return points


def _start_point(spec: dict, config: dict, strict: set, suffix: str, point: dict, used: set,
                 where: str) -> None:
    for key, value in spec.items():
        used.add(key)
        if not isinstance(value, dict):
            if config[key] != coerce(key, value) and key in strict:
                raise ConfigError(f"{where}: {key}={config[key]!r}, but the space fixes it "
                                  f"to {value!r}")
            continue
        kind, args = next(iter(value.items()))
        wanted = config[key]
        if kind == "choice":
            options = list(args)
            typed = [coerce(key, o) for o in options]
            inside = wanted in typed
        else:
            low, high = args
            # None (pos_weight's default: unweighted) lies in no numeric range.
            inside = (wanted is not None and low <= wanted <= high
                      and (kind != "randint" or wanted == int(wanted)))
        if not inside:
            if key in strict:
                raise ConfigError(f"{where}: {key}={wanted!r} is outside the space's {kind} "
                                  f"{args!r}")
            continue  # Optuna draws it
        if kind == "choice":
            option = options[typed.index(wanted)]
            point[key + suffix] = option if isinstance(args, dict) else _encode(option)
            if isinstance(args, dict):
                _start_point(args[option] or {}, config, strict, f"{suffix}[{option}]", point,
                             used, where)
        else:
            point[key + suffix] = int(wanted) if kind == "randint" else float(wanted)


def _encode(value):
    """Optuna's categorical distributions take only scalars, so a choice among lists (head
    sizes) travels as a JSON string."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def decode_params(params: dict) -> dict:
    """Config keys and values from a trial's parameter names and encoded values."""
    return {name.split("[")[0]: json.loads(v) if isinstance(v, str) and v[:1] in ("[", "{") else v
            for name, v in params.items() if name != NUMBER}


def params_in_force(params: dict, config: TrainConfig, searched: Iterable[str]) -> dict:
    """A trial's params (config keys, as `decode_params` gives them) with a value for every key
    the space searches on any branch, so that every view lists every trial alike: TensorBoard's
    HParams session, trials.json and what reads it (the report's leaderboard and figure).

    config is the trial's training config. A searched key takes the value the trainer uses:
    - drawn: as drawn;
    - not drawn on the trial's branch (weight_decay on the demo space's SGD trials): the value in
      force, the run's fixed keys' or TrainConfig's default (weight_decay 1e-4);
    - pos_weight unset (None): 1.0, as the loss weighs positives then;
    - not acting on the trial (momentum on an AdamW trial): IDLE (0), even where drawn.
    Every value is a valid value of its key, so `SearchOptions.trial_config` of the result trains
    the same model (with momentum 0 where it does not act, say).
    """
    acting = config.acting()
    if acting["pos_weight"] is None:
        acting["pos_weight"] = 1.0
    return {**params, **{key: acting.get(key, IDLE) for key in searched}}


def values_off_draw(spec: dict, base_config: dict) -> dict[str, list]:
    """Searched key -> the values `params_in_force` gives it where it is not drawn (off a
    branch, or not acting), on every branch of the space: TensorBoard's filters offer the
    declared domain of a key, and a value outside it would hide its trial."""
    searched = set(_searched(spec))
    values: dict[str, list] = {}
    for context, drawn in _branches(spec, {}, frozenset()):
        config = make_config({**base_config, **context})
        in_force = params_in_force({}, config, searched)
        for key in sorted(searched):
            if key not in drawn or key not in config.acting():
                values.setdefault(key, []).append(in_force[key])
    return values


def _branches(spec: dict, context: dict, drawn: frozenset) -> Iterator[tuple[dict, frozenset]]:
    """(the fixed values and branch options, the keys drawn) of each branch of a space: one
    option of every choice with sub-spaces, at every level."""
    context = {**context, **{k: v for k, v in spec.items() if not isinstance(v, dict)}}
    paths = [(context, drawn | {k for k, v in spec.items() if isinstance(v, dict)})]
    for key, value in spec.items():
        options = value.get("choice") if isinstance(value, dict) else None
        if isinstance(options, dict):
            paths = [branch for above, keys in paths for option, sub in options.items()
                     for branch in _branches(sub or {}, {**above, key: option}, keys)]
    yield from paths


def startup_trials(num_samples: int) -> int:
    """TPE's random start-up trials: a fifth of the trials, 2 to 10 (Optuna's default is 10
    whatever the budget, which leaves a 12-trial search 2 guided proposals)."""
    return max(2, min(10, math.ceil(num_samples / 5)))
