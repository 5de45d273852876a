"""Strict conversion between plain dicts and frozen dataclasses, and the value checks configs use.

``from_dict`` is the one way a dict becomes a config: unknown keys, wrong types and out-of-range values raise
``ConfigError`` naming the dotted field, the value and what is allowed; ``str`` becomes an enum, ``list`` becomes a
tuple. ``to_dict`` is its inverse, so a config round-trips through YAML, Ray Tune results, checkpoints and reports.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pf_ray.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Validation helpers, used in the dataclasses' __post_init__.


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (bounds optional, each inclusive or not)."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name}: got nan; expected a number")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        low_text = "-inf" if low is None else f"{low:g}"
        high_text = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{name}: got {show_value(value)}; allowed range is {left}{low_text}, {high_text}{right}")


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}: got {show_value(value)}; allowed: {', '.join(map(str, choices))}")


def check_path(name: str, value: str) -> None:
    """Raise ConfigError unless ``value`` can name a file: no NUL byte, and a leading ``~user`` that exists."""
    if "\0" in value:
        raise ConfigError(f"{name}: got {show_value(value)}; a path cannot hold a NUL byte")
    if value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:  # "~someone" with no such user
            raise ConfigError(f"{name}: got {show_value(value)}; {value.split('/', 1)[0]!r} is no user's home "
                              "folder") from None


# --------------------------------------------------------------------------------------------------------------
# Generic strict conversion between dicts and (nested) frozen dataclasses.


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly. ``path`` prefixes field names in error messages."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: got {describe_value(data)}; expected a mapping of fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(_key_text, data)) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown field {where}{unknown[0]}; valid fields of {path or cls.__name__}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, _join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError as error:
        # __post_init__ checks name the bare field; prefix the section so the user can find it.
        message = str(error)
        if path and not message.startswith(path):
            message = f"{path}.{message}"
        raise ConfigError(message) from None
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {error}") from None


def to_dict(config: Any) -> Any:
    """Inverse of ``from_dict``: plain dicts, lists, strings and numbers only (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): to_dict(v) for k, v in config.items()}
    return config


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def describe_value(value: Any) -> str:
    return f"{show_value(value)} ({type(value).__name__})"


MAX_SHOWN = 80  # characters of a received value quoted in an error message
MAX_INT = 2**63 - 1  # the largest integer a setting may hold


def show_value(value: Any) -> str:
    """``repr(value)`` for an error message: at most MAX_SHOWN characters, and never an exception of its own
    (Python refuses to print an integer of more than 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"an integer of about {round(value.bit_length() * math.log10(2))} digits"
        return f"a {type(value).__name__}"
    return text if len(text) <= MAX_SHOWN else f"{text[: MAX_SHOWN - 5]}...{text[-2:]}"


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else show_value(key)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: got {describe_value(value)}; "
                          f"expected one of {', '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path=path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise ConfigError(f"{path}: got {show_value(value)}; allowed: {', '.join(map(str, allowed))}")
        return hint(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {describe_value(value)}; expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: got {len(value)} values; expected {len(args)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {describe_value(value)}; expected a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: got {describe_value(value)}; expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: got {describe_value(value)}; expected an integer")
        if abs(value) > MAX_INT:  # no setting needs more, and YAML/JSON writers choke on thousands of digits
            raise ConfigError(f"{path}: got {show_value(value)}; integers are at most {MAX_INT} in magnitude")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: got {describe_value(value)}; expected a number")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigError(f"{path}: got {show_value(value)}; integers are at most {MAX_INT} in magnitude")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: got {describe_value(value)}; expected a string")
        return value
    raise TypeError(f"config type {hint!r} of {path} is not supported by from_dict")


def _type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, its failures as one ConfigError: ``{what} is not valid YAML at line L, column C:
    <problem>``. ``what`` names the text's origin, e.g. "config file 'x.yaml'"."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as error:  # a scalar YAML accepts but Python cannot build: 2026-13-45
        first = str(error).splitlines()[0] if str(error) else ""
        raise ConfigError(f"{what} is not valid YAML: {type(error).__name__}: {first}") from None
