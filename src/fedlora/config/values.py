"""One config value checked against its field's type: TOML literals, ``--set`` texts, and the
messages that name the key (``train.lr: expected a number, got 'abc'``)."""

from __future__ import annotations

import math
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any

from fedlora.errors import ConfigError


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(item, str(item))
    if origin is dict:
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class SetValue(str):
    """The text of a ``--set`` value, read once the field's type is known: a string field takes a
    bare word as it is (``run.name=nan`` is the name "nan"), other fields parse it as TOML."""


def _resolve_set_values(value: Any) -> Any:
    """Parse ``--set`` texts nested inside a free-form table (strategy options)."""
    if isinstance(value, SetValue):
        return parse_value(value)
    if isinstance(value, Mapping):
        return {k: _resolve_set_values(v) for k, v in value.items()}
    return value


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the type ``tp`` of config key ``key``; ints widen to floats. A float
    must be finite and an int must fit 64 bits."""
    if isinstance(value, SetValue):
        text = str(value)
        value = text if tp is str and not text.startswith(('"', "'")) else parse_value(text)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return _resolve_set_values(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is out of range (a 64-bit float)") from None
    if tp is type(None) and value is None:
        return None
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        # inf, nan and ints beyond 64 bits pass the type but fail later, deep in numpy or torch
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if tp is int and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {value} is out of range (a 64-bit integer)")
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``3``, ``2e-3``, ``true``, ``[2, 4]``, ``"x"``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return str(text)
