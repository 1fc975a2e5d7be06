"""The task name registry: ``get_task("causal_lm", tokenizer, 256, {"max_new_tokens": 64})``.

Each task type registers itself with the :func:`register` class decorator; importing
:mod:`fedlora.tasks` imports every task module, so the registry is full once any part of the package
is imported.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedlora.errors import ConfigError
from fedlora.registry import Registry
from fedlora.tasks.base import Task

REGISTRY = Registry("task")
#: Class decorator: add a task under its ``name``.
register = REGISTRY.register


def task_options(name: str) -> list[str]:
    """The options of task ``name`` (``data.task_options`` keys): its keyword-only ``__init__`` parameters."""
    cls = REGISTRY[name]
    return [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]


def get_task(name: str, tokenizer, max_length: int, options: dict[str, Any] | None = None) -> Task:
    """The task object for ``data.task`` with ``data.task_options``; an unknown task or option
    raises ConfigError listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"data.task = {name!r}: unknown task; known: {', '.join(task_names())}")
    known = task_options(name)
    for key in options or {}:
        if key not in known:
            raise ConfigError(f"data.task_options.{key}: the {name} task has no such option; "
                              f"it has {', '.join(known) or 'none'}")
    return REGISTRY[name](tokenizer, max_length, **(options or {}))


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(REGISTRY)
