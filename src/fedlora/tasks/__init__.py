"""Task types: one module, one class each, one name registry (like :mod:`fedlora.strategies`).

``base`` is the contract (:class:`Task`, :class:`ScoredTask`, :class:`Encoded`) and names no task;
``classification``, ``choice`` (multiple choice) and ``causal`` (causal LM) are the task types;
``token_cache`` is the on-disk cache of tokenised splits; ``answers`` scores generated answers.
Importing this package imports each module in it, which registers the task types' names.
"""

import importlib
import pkgutil

from fedlora.tasks.base import Encoded, ScoredTask, Task, cache_dir, quiet_transformers
from fedlora.tasks.registry import REGISTRY, get_task, register, task_names

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["REGISTRY", "Encoded", "ScoredTask", "Task", "cache_dir", "get_task", "quiet_transformers", "register",
           "task_names"]
