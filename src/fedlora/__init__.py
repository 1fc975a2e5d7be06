"""fedlora: federated fine-tuning of transformer models with LoRA.

The core (``fedlora.factors``, ``fedlora.align``, ``fedlora.strategies``, ``fedlora.diagnostics``)
is pure torch: tensors in, tensors out, no model, no files, no engine.
"""

import os

# Before torch loads (fedlora.factors imports it): on a shared CPU, spinning OpenMP threads stall each
# other and small torch ops slow down ~10× (measured here: one MiniLM forward 0.93 s vs 0.11 s).
# A default only; a user's own setting wins, and it has no effect if torch was imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fedlora.errors import AggregationInputError, ConfigError, FedLoRAError

_FACTORS = ("Adapter", "LoRAPair", "LowRank")


def __getattr__(name: str):
    """``fedlora.Adapter`` etc. load torch on first use, so ``import fedlora.errors`` (and the light
    Flower ClientApp that forwards to a resident node, ``fedlora.flower.forwarder``) does not."""
    if name in _FACTORS:
        from fedlora import factors

        return getattr(factors, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AggregationInputError",
    "ConfigError",
    "FedLoRAError",
    "LoRAPair",
    "LowRank",
    "__version__",
]
