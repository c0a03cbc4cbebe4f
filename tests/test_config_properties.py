"""Property tests: any config value or search space is either accepted and valid, or refused with
a ConfigError (exit 2 in the CLI); nothing else escapes, and nothing out of range gets through."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctmodels.resnet import ACTIVATIONS, ARCHS
from data_utils.errors import UserError
from tuning.config import FIELD_TYPES, RANGES, ConfigError, TrainConfig, load_config, make_config
from tuning.space import RUN_KEYS, decode_params, load_space

# The same examples on every run, so CI never fails on a draw this machine did not see; a
# longer, random hunt is a local run with more examples.
QUICK = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])

CHOICES = {"arch": sorted(ARCHS), "activation": sorted(ACTIVATIONS), "optimizer": ["adamw", "sgd"],
           "lr_schedule": ["cosine", "constant"], "resize": ["pad", "stretch"],
           "device": ["auto", "cpu", "cuda", "cuda:1"], "weights": ["none"],
           "precision": ["auto", "fp32", "bf16"]}
wild = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=8),
                 st.sampled_from(["1e-4", ".nan", "-.inf", "[1", "{a: 1}", "cuda:x", "resnet"]),
                 st.lists(st.integers(-3, 3), max_size=2))


def within(interval, is_int: bool) -> st.SearchStrategy:
    """Mostly inside `interval` or at its edges (so many draws are accepted), sometimes anything."""
    low, high = interval.low, min(interval.high, interval.low + 600)
    edges = [low, high, low - 1, high + 1, math.nextafter(low, -math.inf), math.nan, math.inf]
    inside = (st.integers(math.ceil(low), math.floor(high)) if is_int
              else st.floats(low, high, allow_nan=False))
    return st.one_of(inside, inside, inside, st.sampled_from(edges), wild)


def near(key: str) -> st.SearchStrategy:
    if key in CHOICES:
        return st.one_of(st.sampled_from(CHOICES[key]), wild)
    if key == "head":
        return st.one_of(st.lists(within(RANGES["head"], is_int=True), max_size=3), wild)
    if key in RANGES:
        return within(RANGES[key], is_int=FIELD_TYPES[key] in (int, "int"))
    return st.one_of(st.booleans(), wild)  # ema, and keys that do not exist


@st.composite
def config_values(draw) -> dict:
    keys = draw(st.lists(st.sampled_from([*sorted(FIELD_TYPES), "colour"]), max_size=4,
                         unique=True))
    return {key: draw(near(key)) for key in keys}


def assert_valid(config: TrainConfig) -> None:
    """What every accepted config must satisfy, checked here independently of the code."""
    for key, interval in RANGES.items():
        value = getattr(config, key)
        for number in value if isinstance(value, list) else [value]:
            assert number is None or interval.holds(number), (key, number)
    for key, hint in FIELD_TYPES.items():
        if hint is int or hint == "int":
            assert type(getattr(config, key)) is int, key
    for key, choices in CHOICES.items():
        if key != "weights":
            assert getattr(config, key) in choices, key
    assert all(type(size) is int for size in config.head)


@QUICK
@given(config_values())
def test_any_config_dict_is_valid_or_refused(values):
    try:
        config = make_config(values)
    except ConfigError:
        return
    assert_valid(config)


@QUICK
@given(st.sampled_from(sorted(FIELD_TYPES)), st.one_of(
    st.text(max_size=12), st.floats().map(repr), st.integers(-3, 3000).map(str)))
def test_any_set_override_is_valid_or_refused(key, text):
    """`--set KEY=TEXT` with any text: YAML syntax errors and unsafe tags are refused too."""
    try:
        config = load_config(None, [f"{key}={text}"])
    except ConfigError:
        return
    assert_valid(config)


SEARCHABLE = [key for key in FIELD_TYPES if key not in RUN_KEYS]


@st.composite
def spaces(draw) -> dict:
    """Search-space files: fixed values, choices and [low, high] distributions per key."""
    spec = {}
    for key in draw(st.lists(st.sampled_from(SEARCHABLE), min_size=1, max_size=2, unique=True)):
        value = near(key)
        numeric = key in RANGES and key != "head"
        kind = draw(st.sampled_from(["fixed", "choice", "choice", "normal"]
                                    + ["uniform", "loguniform", "randint"] * numeric))
        if kind == "fixed":
            spec[key] = draw(value)
        elif kind == "choice":
            spec[key] = {"choice": draw(st.lists(value, min_size=1, max_size=3))}
        else:
            spec[key] = {kind: draw(st.lists(value, min_size=2, max_size=2))}
    return spec


@QUICK
@given(spaces(), st.integers(0, 2**16))
def test_any_search_space_is_refused_or_draws_only_valid_configs(tmp_path_factory, spec, seed):
    """A space that loads must give a valid config for every draw: each bound and choice is
    checked at load time, so no trial can fail later on a value the space allowed."""
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        space = load_space(path)
    except UserError:
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(5):
        trial = study.ask()
        fixed = space(trial)
        assert_valid(make_config(decode_params({**trial.params, **fixed})))
        study.tell(trial, 0.5)


def test_a_space_may_draw_a_key_whose_default_is_none(tmp_path):
    """Found by the property test above: pos_weight defaults to None (unweighted), which no
    range holds, so the recipe start point leaves it for Optuna to draw."""
    (tmp_path / "space.yaml").write_text("pos_weight: {uniform: [1.0, 2.0]}\n")
    space = load_space(tmp_path / "space.yaml")
    assert space.start == [{}]
    trial = optuna.create_study().ask()
    fixed = space(trial)
    assert 1.0 <= make_config(decode_params({**trial.params, **fixed})).pos_weight <= 2.0


def test_found_by_a_longer_random_run_of_these_properties():
    # An empty string is "in" any string: decode_params took '' for an encoded list.
    assert decode_params({"weights": "", "head": "[8]"}) == {"weights": "", "head": [8]}
    # ...and an empty weights path was a valid config, failing only when a trial loaded it.
    with pytest.raises(ConfigError, match="weights must be none, imagenet or a path"):
        make_config({"weights": ""})
