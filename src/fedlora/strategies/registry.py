"""The strategy name registry: ``get_strategy("fedrot", lam=0.4)``."""

from __future__ import annotations

import difflib
from typing import Any

from fedlora.errors import ConfigError
from fedlora.strategies.base import Strategy

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"strategy name {cls.name!r} is taken by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy by name. Unknown names and options raise ConfigError with suggestions."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown strategy {name!r}{hint} Known: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**options)
    except TypeError as e:
        raise ConfigError(f"strategy {name!r}: {e}") from e


def strategy_names() -> list[str]:
    return sorted(REGISTRY)
