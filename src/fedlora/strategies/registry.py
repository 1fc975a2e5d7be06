"""The strategy name registry: ``get_strategy("fedrot", lam=0.4)``, and the options each strategy takes."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Mapping
from typing import Any

from fedlora.errors import ConfigError
from fedlora.registry import Registry
from fedlora.strategies.base import Strategy

REGISTRY = Registry("strategy")
#: Class decorator: add a strategy under its ``name``.
register = REGISTRY.register


def _strategy_class(name: str) -> type[Strategy]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown strategy {name!r}{hint} Known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def strategy_options(name: str) -> dict[str, Any]:
    """The options of strategy ``name`` and their types: ``{"lam": float, "align": str, …}``.

    Read from the keyword parameters of the class's ``__init__`` and, where it passes ``**kw`` on,
    of its bases' (own options first); a parameter with no annotation takes its default's type.
    """
    options: dict[str, Any] = {}
    for klass in _strategy_class(name).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        params = list(inspect.signature(init).parameters.values())[1:]  # less self
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                default_type = type(p.default) if p.default not in (p.empty, None) else Any
                options.setdefault(p.name, hints.get(p.name, default_type))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options


def _unknown_option(name: str, option: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(option, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    return ConfigError(f"strategy.options.{option}: unknown option {option!r} of strategy {name!r}{hint} "
                       f"Its options: {', '.join(known) or 'none'}")


def get_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy by name. Unknown names and options raise ConfigError with suggestions."""
    cls = _strategy_class(name)
    known = list(strategy_options(name))
    for option in options:
        if option not in known:
            raise _unknown_option(name, option, known)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"strategy {name!r}: {e}") from e


def make_strategy(name: str, options: Mapping[str, Any]) -> Strategy:
    """The strategy of config keys ``strategy.name`` and ``strategy.options``.

    Each option is checked against its type first (``strategy.options.lam: expected a number, got
    'abc'``), and an option whose type is a dataclass (``server_optimizer``) is built from its table.
    """
    from fedlora.config import coerce  # the config's own type check, so messages read alike

    known = strategy_options(name)
    kwargs = {}
    for option, value in options.items():
        if option not in known:
            raise _unknown_option(name, str(option), list(known))
        key = f"strategy.options.{option}"
        table_type = _dataclass_in(known[option])
        if table_type is not None and isinstance(value, Mapping):
            kwargs[option] = _from_table(key, table_type, value)
        elif table_type is not None and value is not None:
            raise ConfigError(f"{key}: expected a table of {', '.join(_fields(table_type))}, got {value!r}")
        else:
            kwargs[option] = coerce(key, value, known[option])
    return get_strategy(name, **kwargs)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in an option's type (``ServerAdam | None`` → ServerAdam), if any."""
    for t in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            return t
    return None


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _from_table(key: str, cls: type, table: Mapping[str, Any]) -> Any:
    """``cls(**table)``, with each entry checked against its field's type."""
    from fedlora.config import coerce

    fields = _fields(cls)
    for k in table:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "."
            raise ConfigError(f"{key}: unknown key {k!r}{hint} Its keys: {', '.join(fields)}")
    return cls(**{k: coerce(f"{key}.{k}", v, fields[k]) for k, v in table.items()})


def strategy_names() -> list[str]:
    return sorted(REGISTRY)
