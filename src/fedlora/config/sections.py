"""The config's typed sections and :class:`RunConfig`, the whole run, with its range checks.

One dataclass per section (``run``, ``model``, ``lora``, ``data``, ``partition``, ``train``,
``strategy``, ``eval``, ``privacy``); every field has a working default, documented in its section's docstring.
:meth:`RunConfig.validate` checks ranges and settings that would override each other, and raises
:class:`~fedlora.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedlora.errors import ConfigError

#: the experiment trackers ``run.trackers`` may name (implemented in :mod:`fedlora.tracking`)
TRACKER_NAMES = ("tensorboard", "mlflow")


@dataclass
class RunSection:
    """Where and how a run is recorded.

    name: run name, used for the run directory (default ``"run"``).
    output_dir: parent folder of run directories (default ``"runs"``).
    dir: an explicit run directory; empty means ``output_dir/name`` (default ``""``).
    seed: the master seed; client sampling, batches and dropout are seeded per (seed, round, client).
    progress: show the rich progress bar (default True); false silences every progress bar, the
        libraries' too (datasets, transformers, huggingface_hub), as ``--quiet`` does.
    trackers: experiment trackers that log each metrics row as it is committed, and the config:
        ``"tensorboard"`` (``RUN_DIR/tensorboard/``) and/or ``"mlflow"`` (default none; needs
        ``pip install 'fedlora[tracking]'``; see :mod:`fedlora.tracking`).
    tracking_uri: MLflow's tracking URI; empty (default) means a local SQLite store beside the run
        directory, ``sqlite:///<parent of RUN_DIR>/mlflow.db``.
    """

    name: str = "run"
    output_dir: str = "runs"
    dir: str = ""
    seed: int = 0
    progress: bool = True
    trackers: list[str] = field(default_factory=list)
    tracking_uri: str = ""


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
    init_adapter: a PEFT adapter folder (``adapter_config.json`` + weights; e.g. a run's
        ``adapter/`` or ``fedlora export --adapter``) the federation starts from instead of PEFT's
        fresh initialisation. Its rank, alpha and target modules fill in ``r``, ``alpha`` and
        ``target_modules`` when the config leaves them out; a config that sets a different value
        is an error naming both (see :mod:`fedlora.init_adapter`). Default ``""``: fresh.
    """

    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    client_ranks: list[int] = field(default_factory=list)
    init_adapter: str = ""


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


PRIVACY_MODES = ("none", "client", "sample")


@dataclass
class PrivacySection:
    """Differential privacy (see :mod:`fedlora.privacy`; needs ``pip install 'fedlora[dp]'``).

    mode: ``"none"`` (default); ``"client"``: client-level DP-FedAvg (McMahan et al., ICLR 2018):
        each client's update (its upload minus its start) is clipped to L2 norm ``clip`` and the
        server adds N(0, σ²·clip²) to the sum, dividing by a fixed denominator; clients are then
        sampled by Poisson sampling at rate clients-per-round / clients; ``"sample"``: DP-SGD
        (Abadi et al., 2016) in every client's local training, through Opacus, with Poisson
        batches; each client's ε is over its own steps.
    clip: the L2 clipping norm C (per client update, or per example's gradient; default 1.0).
    noise_multiplier: σ, the noise std in units of ``clip`` (default 0: set it or target_epsilon;
        σ = 0 adds no noise and gives no privacy, ε = ∞).
    target_epsilon: calibrate σ before the run so that ε after ``train.rounds`` rounds is this
        (0 = off; excludes noise_multiplier).
    delta: the δ of (ε, δ)-DP (default 1e-5).
    max_epsilon: stop the run cleanly before a round that would take ε above it (0 = no limit).
    adaptive_clip: client level only: adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy,
        NeurIPS 2021): ``clip`` is the start, and after each round C ← C·exp(−clip_lr·(b̃ − clip_quantile)),
        b̃ the noised fraction of clients whose update was within C (see :mod:`fedlora.privacy`).
    clip_quantile: the target fraction γ of unclipped updates (default 0.5).
    clip_lr: the geometric step η_C (default 0.2).
    count_noise: σ_b, the std of the noise on the count of unclipped updates (default 0: expected
        clients per round / 20, the paper's choice).
    """

    mode: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_epsilon: float = 0.0
    adaptive_clip: bool = False
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float = 0.0


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
    privacy: PrivacySection = field(default_factory=PrivacySection)

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
            ("run.trackers", all(t in TRACKER_NAMES for t in self.run.trackers),
             f"each must be one of {', '.join(TRACKER_NAMES)}"),
            ("run.trackers", len(set(self.run.trackers)) == len(self.run.trackers), "names a tracker twice"),
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
            ("privacy.mode", self.privacy.mode in PRIVACY_MODES, f"must be one of {', '.join(PRIVACY_MODES)}"),
            ("privacy.clip", self.privacy.clip > 0, "must be positive"),
            ("privacy.noise_multiplier", self.privacy.noise_multiplier >= 0, "must be ≥ 0"),
            ("privacy.target_epsilon", self.privacy.target_epsilon >= 0, "must be ≥ 0 (0 = off)"),
            ("privacy.delta", 0 < self.privacy.delta < 1, "must be in (0, 1)"),
            ("privacy.max_epsilon", self.privacy.max_epsilon >= 0, "must be ≥ 0 (0 = no limit)"),
            ("privacy.clip_quantile", 0 < self.privacy.clip_quantile < 1, "must be in (0, 1)"),
            ("privacy.clip_lr", self.privacy.clip_lr > 0, "must be positive"),
            ("privacy.count_noise", self.privacy.count_noise >= 0, "must be ≥ 0 (0 = clients per round / 20)"),
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
        strategy = make_strategy(self.strategy.name, self.strategy.options)
        if self.privacy.mode != "none":
            from fedlora.privacy import check_privacy  # no privacy package is imported here

            check_privacy(self, strategy)
        else:  # a privacy setting with privacy off would silently train without it
            for key in ("noise_multiplier", "target_epsilon", "max_epsilon"):
                if getattr(self.privacy, key):
                    raise ConfigError(f"privacy.{key} = {getattr(self.privacy, key)!r} is set but privacy.mode = "
                                      "'none', so the run would not be private; set privacy.mode to 'client' or "
                                      "'sample', or remove it")
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
