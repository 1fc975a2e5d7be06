"""Run configuration: typed dataclasses, TOML files and ``key=value`` overrides.

A run is described by one :class:`RunConfig` with a section per concern (``run``, ``model``, ``lora``,
``data``, ``partition``, ``train``, ``strategy``, ``eval``). A TOML file holds any subset of the
sections; ``--set section.key=value`` overrides single values on the command line (torchtune's
style). Every value is checked against its field's type when it is read, and a bad one raises
:class:`~fedlora.errors.ConfigError` naming the key, e.g. ``train.lr: expected a number, got 'abc'``.

The defaults are the quickstart's federation: MiniLM on sarcasm, 10 clients, Dirichlet 0.5, rank 4.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError


@dataclass
class RunSection:
    """Where and how a run is recorded.

    name: run name, used for the run directory (default ``"run"``).
    output_dir: parent folder of run directories (default ``"runs"``).
    dir: an explicit run directory; empty means ``output_dir/name`` (default ``""``).
    seed: the master seed; client sampling, batches and dropout are seeded per (seed, round, client).
    progress: show the rich progress bar (default True).
    """

    name: str = "run"
    output_dir: str = "runs"
    dir: str = ""
    seed: int = 0
    progress: bool = True


@dataclass
class ModelSection:
    """The base model.

    name: a catalog name (``minilm``, ``smollm2-135m``), a local folder or a Hugging Face id.
    dtype: ``"fp32"`` or ``"bf16"`` (bf16 autocast around forward passes; weights and LoRA factors
        stay fp32).
    device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"``.
    threads: torch CPU threads; 0 leaves torch's default.
    """

    name: str = "minilm"
    dtype: str = "fp32"
    device: str = "auto"
    threads: int = 0


@dataclass
class LoRASection:
    """PEFT LoRA settings.

    r: the global rank (default 4). alpha: PEFT's lora_alpha (default 8, so scaling 2).
    dropout: LoRA dropout (default 0.0).
    target_modules: modules to adapt; empty picks the architecture's default (bert/roberta:
        query, value; llama: q_proj, v_proj; gpt2: c_attn).
    client_ranks: per-client ranks, cycled over clients (client k gets client_ranks[k mod len]);
        empty means every client uses ``r``. Needs a strategy with heterogeneous ranks.
    """

    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    client_ranks: list[int] = field(default_factory=list)


@dataclass
class DataSection:
    """The dataset and the task.

    source: a catalog dataset name (``sarcasm``), a hub name or ``"json"``/``"csv"`` with data_files.
    data_files: local files for ``json``/``csv`` sources.
    columns: maps the task's fields to the source's columns, e.g. {text = "headline", label = "y"}.
    task: a task type registered in ``fedlora.tasks``: ``"classification"``, ``"multiple_choice"`` or
        ``"causal_lm"``.
    task_options: the task's own settings, e.g. {scoring = "loglik", loss = "lm"} for
        multiple_choice or {max_new_tokens = 128, generate_examples = 32} for causal_lm (see
        ``fedlora.tasks.choice`` and ``fedlora.tasks.causal``).
    max_length: tokenizer truncation length (default 64).
    validation_fraction: share of the source held out as the global validation set when it has none.
    train_examples: a seeded subset of the training split of this size (0 = all; default 0).
    eval_examples: size of the fixed global validation subset evaluated (0 = all; default 1000).
    holdout_fraction: share of each client's data kept as its personal held-out slice (default 0.1).
    """

    source: str = "sarcasm"
    data_files: list[str] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    task: str = "classification"
    task_options: dict[str, Any] = field(default_factory=dict)
    max_length: int = 64
    validation_fraction: float = 0.1
    train_examples: int = 0
    eval_examples: int = 1000
    holdout_fraction: float = 0.1


@dataclass
class PartitionSection:
    """How the training set is split over clients.

    method: ``iid``, ``dirichlet``, ``pathological``, ``natural`` or ``quantity_skew``.
    num_clients: clients in the federation (``natural``: one per distinct value of ``column``, and
        num_clients must be that count).
    column: the column partitioned on (default: the label; ``natural`` needs it set).
    alpha: Dirichlet concentration (default 0.5). min_size: smallest partition (default 1).
    labels_per_client: for ``pathological`` (default 2). sizes_sigma: for ``quantity_skew``.
    """

    method: str = "dirichlet"
    num_clients: int = 10
    column: str = ""
    alpha: float = 0.5
    min_size: int = 1
    labels_per_client: int = 2
    sizes_sigma: float = 1.0


@dataclass
class TrainSection:
    """Rounds and local training.

    rounds: federated rounds (default 5).
    clients_per_round: clients sampled per round; 0 uses ``client_fraction`` (default 0).
    client_fraction: share of clients sampled per round when ``clients_per_round`` is 0 (default 1.0).
    local_steps: optimiser steps per client per round (default 10).
    local_epochs: passes over the client's training slice per round (default 0 = use steps); when
        set, local_steps may not be given too.
    batch_size: default 16. optimizer: ``"adamw"`` or ``"sgd"`` (re-created per client per round).
    lr, weight_decay, momentum (SGD only), grad_clip (max global norm; 0 = off).
    schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` over a client's local steps, after
        ``warmup_steps`` of linear warm-up.
    round_lr_decay: the lr of round t is lr·round_lr_decay^t (default 1.0).
    fail_fast: raise on a client's NaN/Inf loss instead of dropping that client from the round.
    """

    rounds: int = 5
    clients_per_round: int = 0
    client_fraction: float = 1.0
    local_steps: int = 10
    local_epochs: int = 0
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    round_lr_decay: float = 1.0
    fail_fast: bool = False


@dataclass
class StrategySection:
    """The federated-LoRA method: a registered name and its constructor options."""

    name: str = "fedit"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSection:
    """Evaluation.

    every: evaluate every k rounds (the last round is always evaluated; default 1).
    personalised: also evaluate each client's model on its own held-out slice (default True).
    client_examples: cap on each client's held-out examples evaluated (0 = all; default 200).
    batch_size: evaluation batch size (default 64).
    """

    every: int = 1
    personalised: bool = True
    client_examples: int = 200
    batch_size: int = 64


@dataclass
class RunConfig:
    """A whole run. Build with :func:`load_config`; every section has working defaults."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        """Range checks that need no model or data, settings that would override each other, and the
        strategy's options; raises ConfigError naming the key(s)."""
        from fedlora.data.partition import METHODS  # numpy only
        from fedlora.strategies.registry import make_strategy  # torch; every strategy registers on import
        from fedlora.tasks.registry import task_names  # torch; every task type registers on import

        checks = [
            ("run.name", self.run.name != "", "must not be empty"),
            ("run.seed", self.run.seed >= 0, "must be ≥ 0"),
            ("model.name", self.model.name != "", "must not be empty"),
            ("model.threads", self.model.threads >= 0, "must be ≥ 0 (0 = torch's default)"),
            ("lora.r", self.lora.r >= 1, "must be ≥ 1"),
            ("lora.alpha", self.lora.alpha > 0, "must be positive"),
            ("lora.dropout", 0 <= self.lora.dropout < 1, "must be in [0, 1)"),
            ("lora.client_ranks", all(r >= 1 for r in self.lora.client_ranks), "ranks must be ≥ 1"),
            ("model.dtype", self.model.dtype in ("fp32", "bf16"), "must be 'fp32' or 'bf16'"),
            ("model.device", self.model.device in ("auto", "cpu", "cuda"), "must be 'auto', 'cpu' or 'cuda'"),
            ("data.source", self.data.source != "", "must not be empty"),
            ("data.task", self.data.task in task_names(), f"must be one of {', '.join(task_names())}"),
            ("data.train_examples", self.data.train_examples >= 0, "must be ≥ 0 (0 = all)"),
            ("data.eval_examples", self.data.eval_examples >= 0, "must be ≥ 0 (0 = all)"),
            ("data.max_length", self.data.max_length >= 2, "must be ≥ 2"),
            ("data.holdout_fraction", 0 <= self.data.holdout_fraction < 1, "must be in [0, 1)"),
            ("data.validation_fraction", 0 < self.data.validation_fraction < 1, "must be in (0, 1)"),
            ("partition.method", self.partition.method in METHODS, f"must be one of {', '.join(METHODS)}"),
            ("partition.num_clients", self.partition.num_clients >= 1, "must be ≥ 1"),
            ("partition.alpha", self.partition.alpha > 0, "must be positive"),
            ("partition.min_size", self.partition.min_size >= 1, "must be ≥ 1"),
            ("partition.labels_per_client", self.partition.labels_per_client >= 1, "must be ≥ 1"),
            ("partition.sizes_sigma", self.partition.sizes_sigma >= 0, "must be ≥ 0"),
            ("train.rounds", self.train.rounds >= 1, "must be ≥ 1"),
            ("train.clients_per_round", self.train.clients_per_round >= 0, "must be ≥ 0"),
            ("train.client_fraction", 0 < self.train.client_fraction <= 1, "must be in (0, 1]"),
            ("train.local_steps", self.train.local_steps >= 1 or self.train.local_epochs >= 1,
             "must be ≥ 1 (or set train.local_epochs)"),
            ("train.local_epochs", self.train.local_epochs >= 0, "must be ≥ 0 (0 = use train.local_steps)"),
            ("train.batch_size", self.train.batch_size >= 1, "must be ≥ 1"),
            ("train.optimizer", self.train.optimizer in ("adamw", "sgd"), "must be 'adamw' or 'sgd'"),
            ("train.lr", self.train.lr > 0, "must be positive"),
            ("train.weight_decay", self.train.weight_decay >= 0, "must be ≥ 0"),
            ("train.momentum", self.train.momentum >= 0, "must be ≥ 0"),
            ("train.grad_clip", self.train.grad_clip >= 0, "must be ≥ 0 (0 = off)"),
            ("train.schedule", self.train.schedule in ("constant", "linear", "cosine"),
             "must be 'constant', 'linear' or 'cosine'"),
            ("train.warmup_steps", self.train.warmup_steps >= 0, "must be ≥ 0"),
            ("train.round_lr_decay", self.train.round_lr_decay > 0, "must be positive"),
            ("eval.every", self.eval.every >= 1, "must be ≥ 1"),
            ("eval.client_examples", self.eval.client_examples >= 0, "must be ≥ 0 (0 = all)"),
            ("eval.batch_size", self.eval.batch_size >= 1, "must be ≥ 1"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} = {_get(self, key)!r}: {why}")
        # settings that would silently win over another one
        if self.train.local_steps != TrainSection.local_steps:
            _check_steps_or_epochs(self)
        if self.train.clients_per_round > self.partition.num_clients:
            # natural partitions too: their client count must equal num_clients (checked when the data loads)
            raise ConfigError(f"train.clients_per_round = {self.train.clients_per_round} is more than "
                              f"partition.num_clients = {self.partition.num_clients}; sample at most every client")
        if self.partition.method == "natural" and not self.partition.column:
            raise ConfigError("partition.method = 'natural' needs partition.column: the column whose distinct "
                              "values are the clients (e.g. an author or speaker id)")
        make_strategy(self.strategy.name, self.strategy.options)
        return self


def _check_steps_or_epochs(cfg: RunConfig) -> None:
    """train.local_epochs > 0 replaces train.local_steps: refuse a config that sets both."""
    if cfg.train.local_epochs > 0:
        raise ConfigError(f"train.local_epochs = {cfg.train.local_epochs} and train.local_steps = "
                          f"{cfg.train.local_steps} are both set, and local_epochs would override local_steps; "
                          "set only one of them")


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


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


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _unknown(kind: str, name: Any, known: Iterable[str]) -> ConfigError:
    name = str(name)  # a section or key of a hand-made dict may be anything
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config {kind} {name!r}{hint}")


def from_dict(data: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from nested sections (as TOML gives them), on top of ``base`` (default: defaults).

    Values are type-checked here; a ``train.local_steps`` given together with ``train.local_epochs``
    is refused here too, as only the input tells whether local_steps was given (at its default).
    :meth:`RunConfig.validate` does the range checks."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    hints = typing.get_type_hints(RunConfig)
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: expected a table of settings, got {values!r}")
        types_ = _field_types(hints[section])
        for key, value in values.items():
            if key not in types_:
                raise _unknown("key", f"{section}.{key}", [f"{section}.{k}" for k in types_])
            out[section][key] = coerce(f"{section}.{key}", value, types_[key])
    cfg = RunConfig(**{name: hints[name](**out[name]) for name in SECTIONS})
    if "local_steps" in data.get("train", {}):  # given, even at its default value
        _check_steps_or_epochs(cfg)
    return cfg


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``3``, ``2e-3``, ``true``, ``[2, 4]``, ``"x"``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return str(text)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested config data (``strategy.options.lam=0.2`` too)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must look like section.key")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a table")
        node[parts[-1]] = SetValue(text.strip())
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML config (or start from the defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            line = p.read_bytes()[: e.start].count(b"\n") + 1
            raise ConfigError(f"config file {str(p)!r} line {line}: not UTF-8 text ({e.reason})") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r}: {e}") from e
    apply_overrides(data, overrides)
    return from_dict(data).validate()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's escapes are TOML's too (\\n, \\", \\uXXXX); TOML also wants DEL escaped
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML text that :func:`load_config` reads back to an equal config."""
    lines = []
    for section, values in cfg.to_dict().items():
        if section == "train" and cfg.train.local_epochs > 0:
            del values["local_steps"]  # local_epochs replaces it; written, it would read back as a conflict
        lines.append(f"[{section}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


# ---- what a config means for its results ------------------------------------------------------------

#: keys that change nothing a run computes: where it is written, how it shows progress, CPU threads
NEUTRAL_KEYS = frozenset({"run.name", "run.output_dir", "run.dir", "run.progress", "model.threads"})

#: keys a resumed run may change: they do not change the trained model's shape or data (more rounds,
#: the evaluation cadence and batch, whether a NaN client raises) beyond the neutral ones
RESUMABLE_KEYS = NEUTRAL_KEYS | {"train.rounds", "eval.every", "eval.batch_size", "train.fail_fast"}


def flat_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` as ``{"section.key": value}``; free-form tables (strategy options,
    task options, columns) are flattened too (``strategy.options.lam``), so that a difference names
    the innermost key."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):  # an empty table adds no key: {} and an absent table are equal
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            walk(f"{section}.{key}", value)
    return out


def result_settings(cfg: RunConfig, ignore: Iterable[str] = NEUTRAL_KEYS) -> dict[str, Any]:
    """The settings that change a run's results: :func:`flat_settings` less ``ignore``."""
    ignore = set(ignore)
    return {k: v for k, v in flat_settings(cfg).items() if k not in ignore}


def fingerprint(cfg: RunConfig, ignore: Iterable[str] = NEUTRAL_KEYS) -> str:
    """A short, stable hash of :func:`result_settings`: equal exactly when those settings are equal
    (an int and the equal float count as equal, as the config widens ints to floats)."""
    import hashlib
    import json

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    text = json.dumps({k: norm(v) for k, v in sorted(result_settings(cfg, ignore).items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_diff(old: RunConfig, new: RunConfig, ignore: Iterable[str] = NEUTRAL_KEYS) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value), …]`` for every result setting that differs, in key order;
    a key present on one side only shows ``None`` on the other."""
    a, b = result_settings(old, ignore), result_settings(new, ignore)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def format_diff(diff: Iterable[tuple[str, Any, Any]]) -> str:
    """``train.lr: 0.002 → 0.001; lora.r: 4 → 8``: a settings difference for an error message."""
    return "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in diff)
