"""The config loader, fuzzed (hypothesis): whatever arrives (nested dicts mixing real and random keys, values of
every type, huge numbers, NaN, unicode, random YAML text and bytes, random ``--set`` strings), it either builds a
config or raises ``ConfigError``; nothing else. A config it builds round-trips through ``to_dict`` and YAML."""

from __future__ import annotations

import dataclasses
import enum
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pf_ray.config import ExperimentConfig, LearnerConfig, apply_overrides, load_experiment
from pf_ray.errors import ConfigError
from pf_ray.learners import learner_config_class
from pf_ray.registry import DATASETS, LEARNERS, MODELS
from pf_ray.spec import RunSpec
from pf_ray.strict import from_dict, to_dict

# Deterministic (the same examples on every run, no example database written): a failure is reproducible.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# 10**5000: Python refuses to print it (over 4300 digits), so hypothesis draws an index, not the number itself.
HUGE = [10**5000, -(10**5000), 2**63, -(2**63) - 1, 10**20]
huge = st.integers(0, len(HUGE) - 1).map(lambda index: HUGE[index])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "~", "~nosuchuser_pf/x", "a\0b", "é", "🙂", "1e400", ".nan", "null", "0x10", "/"]),
    st.binary(max_size=8),
    st.dates(),
)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans()), children,
                        max_size=4),
    ),
    max_leaves=12,
)


# Plausible strings for string fields, so that more examples get past the names to the checks behind them.
NAMES = {"name": MODELS.names() + DATASETS.names() + LEARNERS.names(), "formats": ["onnx", "ort", "pte"]}


def value_for(hint: Any, field_name: str = "") -> st.SearchStrategy:
    """Values for a field of type ``hint``: mostly of roughly the right type and range, sometimes anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(value_for(a, field_name) for a in args if a is not type(None)), st.none())
    if dataclasses.is_dataclass(hint):
        return section(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        typed = st.sampled_from([m.value for m in hint])
    elif origin is tuple:
        typed = st.lists(value_for(args[0], field_name), max_size=4)
    elif hint is bool:
        typed = st.booleans()
    elif hint is int:
        typed = st.one_of(st.integers(-3, 300), huge)
    elif hint is float:
        typed = st.one_of(st.floats(-1.5, 12.0), st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e308]))
    elif hint is str:
        typed = st.one_of(st.text(max_size=16), st.sampled_from(NAMES.get(field_name, [""])))
    else:  # dict / Any
        typed = junk
    return st.one_of(typed, typed, typed, junk)


def section(cls: type) -> st.SearchStrategy:
    """A dict for dataclass ``cls``: any subset of its fields, now and then a key it does not have."""
    fields = typing.get_type_hints(cls)
    known = st.fixed_dictionaries(
        {}, optional={f.name: value_for(fields[f.name], f.name) for f in dataclasses.fields(cls) if f.init})
    stray = st.one_of(st.just({}), st.just({}), st.just({}),
                      st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), junk, max_size=2))
    return st.builds(lambda a, b: {**b, **a}, known, stray)


def learner_section() -> st.SearchStrategy:
    """``learner``: a registered name (mostly) with options drawn from that learner's own config class."""
    def options(name: str) -> st.SearchStrategy:
        if name in LEARNERS:
            return st.fixed_dictionaries({"name": st.just(name), "options": section(learner_config_class(name))})
        return st.fixed_dictionaries({"name": st.just(name), "options": junk})

    return st.one_of(st.sampled_from(LEARNERS.names()), st.text(max_size=10)).flatmap(options)


experiments = st.builds(lambda data, learner: {**data, "learner": learner} if learner is not None else data,
                        section(ExperimentConfig), st.one_of(st.none(), learner_section(), junk))
anything = st.one_of(junk, experiments)


def _dotted_fields(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            paths += _dotted_fields(hint, f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


KEYS = _dotted_fields(ExperimentConfig) + [
    f"learner.options.{f.name}" for name in LEARNERS.names() for f in dataclasses.fields(learner_config_class(name))]


def _dump(data: Any) -> str:
    """YAML text of ``data`` (dates, bytes, unicode and all); empty where YAML cannot write it (an integer of more
    than 4300 digits)."""
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return ""


FRAGMENTS = ["search:\n", "  num_trials: 3\n", "\tseed: 1\n", "- 1\n", "{", "}", "[", "]", ": ", "&a [*a]",
             "*b", "!!python/object/apply:os.system ['true']", "!!binary 'x'", "!!int 'x'", "!!float 'x'",
             "!!set {1}", "2026-13-45", "seed: 1" + "0" * 5000 + "\n", "? [a]\n: 1\n", "---\n", "...\n", "%YAML 1.1\n",
             "\x00", "\ufeff", "é: 1\n", "model: {name: resnet20}\n", "learner: {options: {keep_ratio: .nan}}\n",
             "[" * 400, "]" * 400, "a: &x [*x]\n", "export: {formats: [pte, tflite]}\n"]
yaml_texts = st.one_of(
    st.text(max_size=60),
    anything.map(_dump),
    st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join),
    st.tuples(anything.map(_dump), st.integers(0, 200), st.sampled_from(FRAGMENTS)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1]:]),  # a real config text with something inserted
)


def _accepts_or_config_error(load: typing.Callable[[], ExperimentConfig]) -> None:
    try:
        config = load()
        RunSpec.resolve(config)  # learner.options are checked by the learner's own config class
    except ConfigError:
        return
    # What loads must round-trip: through plain dicts (Tune results, checkpoints) and through YAML (config.yaml).
    assert from_dict(ExperimentConfig, to_dict(config)) == config
    assert from_dict(ExperimentConfig, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="pf_ray_fuzz_") as name:
        yield Path(name)


@FUZZ
@given(data=anything)
def test_from_dict_raises_only_config_error(data):
    _accepts_or_config_error(lambda: from_dict(ExperimentConfig, data))


@FUZZ
@given(name=st.one_of(st.sampled_from(LEARNERS.names()), st.text(max_size=8)), options=junk)
def test_learner_options_raise_only_config_error(name, options):
    _accepts_or_config_error(lambda: from_dict(ExperimentConfig, {"learner": {"name": name, "options": options}}))


@FUZZ
@given(text=yaml_texts)
def test_yaml_files_raise_only_config_error(folder, text):
    path = folder / "experiment.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates: bytes that are not UTF-8
    _accepts_or_config_error(lambda: load_experiment(path))


@FUZZ
@given(content=st.binary(max_size=64))
def test_binary_files_raise_only_config_error(folder, content):
    path = folder / "experiment.yaml"
    path.write_bytes(content)
    _accepts_or_config_error(lambda: load_experiment(path))


overrides = st.builds(
    lambda key, sep, value: f"{key}{sep}{value}",
    st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"), st.text(max_size=12)),
    st.sampled_from(["=", "=", "=", "", "==", ":"]),
    st.one_of(st.text(max_size=20), junk.map(_dump).map(lambda t: t.strip()), st.sampled_from(FRAGMENTS)),
)


@FUZZ
@given(data=st.one_of(st.just({}), experiments), sets=st.lists(overrides, max_size=4))
def test_set_overrides_raise_only_config_error(data, sets):
    _accepts_or_config_error(lambda: from_dict(ExperimentConfig, apply_overrides(data, sets)))


def test_the_fuzzing_reaches_past_the_first_check():
    """The strategies are not all rejected at the first unknown key: some random experiments load."""
    loaded = []

    @settings(max_examples=50, deadline=None, derandomize=True)
    @given(data=experiments)
    def collect(data):
        try:
            loaded.append(RunSpec.resolve(from_dict(ExperimentConfig, data)))
        except ConfigError:
            pass

    collect()
    assert len(loaded) >= 5
    assert isinstance(from_dict(LearnerConfig, {}), LearnerConfig)
