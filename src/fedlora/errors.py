"""Exceptions raised by fedlora. Every message names the client, layer, key or file at fault."""


class FedLoRAError(ValueError):
    """Base class for fedlora's input errors."""


class AggregationInputError(FedLoRAError):
    """An upload, weight or global state that the server cannot aggregate."""


class ConfigError(FedLoRAError):
    """A bad configuration value: unknown name, wrong type, value out of range."""


class RoundFailedError(FedLoRAError):
    """A round that could not complete: every sampled client failed, or (on Flower) fewer valid
    replies came back than the configured minimum. The run ends with status "failed: …"."""
