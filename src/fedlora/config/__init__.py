"""Run configuration: typed dataclasses, TOML files and ``key=value`` overrides.

A run is described by one :class:`RunConfig` with a section per concern (``run``, ``model``, ``lora``,
``data``, ``partition``, ``train``, ``strategy``, ``eval``). A TOML file holds any subset of the
sections; ``--set section.key=value`` overrides single values on the command line (torchtune's
style). Every value is checked against its field's type when it is read, and a bad one raises
:class:`~fedlora.errors.ConfigError` naming the key, e.g. ``train.lr: expected a number, got 'abc'``.

The defaults are the quickstart's federation: MiniLM on sarcasm, 10 clients, Dirichlet 0.5, rank 4.

The package's modules, each imported here, so ``from fedlora.config import X`` is the way in:

- ``sections``: the section dataclasses and :class:`RunConfig` with its range checks;
- ``values``: one value checked against its field's type (:func:`coerce`, :func:`parse_value`);
- ``toml_io``: nested tables, ``--set`` overrides and TOML files to a config (:func:`load_config`)
  and back (:func:`to_toml`);
- ``settings``: what a config means for its results (:func:`fingerprint`, :func:`settings_diff`).
"""

from fedlora.config.sections import (
    SECTIONS,
    DataSection,
    EvalSection,
    LoRASection,
    ModelSection,
    PartitionSection,
    PrivacySection,
    RunConfig,
    RunSection,
    StrategySection,
    TrainSection,
)
from fedlora.config.settings import (
    NEUTRAL_KEYS,
    RESUMABLE_KEYS,
    fingerprint,
    flat_settings,
    format_diff,
    result_settings,
    settings_diff,
)
from fedlora.config.toml_io import apply_overrides, from_dict, load_config, to_toml
from fedlora.config.values import SetValue, coerce, parse_value

__all__ = [
    "SECTIONS", "DataSection", "EvalSection", "LoRASection", "ModelSection", "PartitionSection", "PrivacySection", "RunConfig",
    "RunSection", "StrategySection", "TrainSection",
    "NEUTRAL_KEYS", "RESUMABLE_KEYS", "fingerprint", "flat_settings", "format_diff", "result_settings", "settings_diff",
    "apply_overrides", "from_dict", "load_config", "to_toml",
    "SetValue", "coerce", "parse_value",
]
