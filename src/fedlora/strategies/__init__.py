"""Every federated-LoRA method: one module, one small class each, one name registry.

Importing this package imports each strategy module in it, which registers the strategy's name.
"""

import importlib
import pkgutil

from fedlora.strategies.base import ClientContext, ClientUpdate, GlobalState, Strategy
from fedlora.strategies.registry import REGISTRY, get_strategy, register, strategy_names

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["REGISTRY", "ClientContext", "ClientUpdate", "GlobalState", "Strategy", "get_strategy", "register",
           "strategy_names"]
