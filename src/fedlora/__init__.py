"""fedlora: federated fine-tuning of transformer models with LoRA.

The core (``fedlora.factors``, ``fedlora.align``, ``fedlora.strategies``, ``fedlora.diagnostics``)
is pure torch: tensors in, tensors out, no model, no files, no engine.
"""

from fedlora.errors import AggregationInputError, ConfigError, FedLoRAError
from fedlora.factors import Adapter, LoRAPair, LowRank

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
