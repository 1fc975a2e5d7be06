"""Setup, shared by both engines: everything a run needs, loaded and checked before any training.

:func:`prepare` turns a config into a :class:`Federation` (the strategy, the task, the shared PEFT
model, the encoded splits, the clients' slices); every input error surfaces there, as a ConfigError
naming the key. :func:`client_context` is the one builder of a client's :class:`ClientContext`, and
:func:`sample_clients` the one rule for a round's clients.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.runtime.model import SharedModel, autocast_for, load_tokenizer, pick_device, target_modules_for
from fedlora.strategies import ClientContext, Strategy
from fedlora.strategies.registry import make_strategy
from fedlora.tasks import Encoded, Task, get_task


@dataclass
class Federation:
    """What a run trains on: the task, the shared model, the encoded splits and the clients' slices."""

    cfg: RunConfig
    strategy: Strategy
    task: Task
    shared: SharedModel
    device: torch.device
    train: Encoded
    validation: Encoded
    eval_indices: np.ndarray  # the fixed global validation subset
    client_train: list[np.ndarray]  # per client: indices into ``train`` it trains on
    client_heldout: list[np.ndarray]  # per client: its personal held-out slice
    client_ranks: list[int]
    model_path: str
    target_modules: list[str]
    num_labels: int
    partition_summary: dict[str, Any] = field(default_factory=dict)
    dp_sigma: float = 0.0  # privacy: the noise multiplier used (configured, or calibrated to target_epsilon)
    load_s: dict[str, float] = field(default_factory=dict)  # seconds prepare spent: "data" (load, tokenise), "model"

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def autocast(self):
        return autocast_for(self.cfg.model.dtype, self.device)


def resolve_model(name: str) -> str:
    """A catalog name → its local folder; a local folder → itself; anything else is a hub id.

    A name that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) and is no folder, or a folder
    with no ``config.json``, raises ConfigError saying so rather than asking the hub for it."""
    folder = Path(name).expanduser()
    looks_like_path = name.startswith((".", "~")) or folder.is_absolute() or name.count("/") > 1 or (
        os.sep != "/" and os.sep in name)  # a hub id is "name" or "owner/name"
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.name = {name!r}: the folder holds no model (no config.json)")
        return str(folder)
    if looks_like_path and not folder.exists():
        raise ConfigError(f"model.name = {name!r}: no such folder")
    from fedlora import assets

    return str(assets.resolve_model(name))


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy (options checked, ``server_optimizer`` built; see ``make_strategy``)."""
    strategy = make_strategy(cfg.strategy.name, cfg.strategy.options)
    if cfg.lora.client_ranks and set(cfg.lora.client_ranks) != {cfg.lora.r} and not strategy.heterogeneous_ranks:
        raise ConfigError(f"lora.client_ranks = {cfg.lora.client_ranks}: strategy {strategy.name!r} needs equal "
                          "ranks; use one that supports heterogeneous ranks (e.g. flora, flexlora)")
    return strategy


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> Federation:
    """Load and check everything a run needs; raises ConfigError (naming the key) before training."""
    from fedlora.data import format_partition_summary, holdout, load_source, partition, partition_summary

    t_start = time.perf_counter()
    strategy = build_strategy(cfg)
    if cfg.model.threads > 0:
        torch.set_num_threads(cfg.model.threads)
    device = pick_device(cfg.model.device)
    seed = cfg.run.seed

    splits = load_source(cfg.data.source, data_files=cfg.data.data_files or None, columns=cfg.data.columns or None,
                         validation_fraction=cfg.data.validation_fraction, seed=seed)
    model_path = resolve_model(cfg.model.name)
    task = get_task(cfg.data.task, load_tokenizer(model_path), cfg.data.max_length, cfg.data.task_options)
    if 0 < cfg.data.train_examples < len(splits["train"]):
        # a seeded subset (Subspace-Reg trains on the first 8,000 HellaSwag examples after a seeded shuffle)
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(cfg.data.train_examples))
    for name in ("train", "validation"):
        task.check_columns(splits[name])

    # partition the training split over clients, each keeping a held-out slice of its own
    column = cfg.partition.column
    if column and column not in splits["train"].column_names:
        raise ConfigError(f"partition.column = {column!r}: no such column; the dataset has "
                          f"{splits['train'].column_names}")
    values = np.asarray(splits["train"][column]) if column else task.partition_values(splits["train"])
    parts = partition(values, cfg.partition.num_clients, cfg.partition.method, alpha=cfg.partition.alpha,
                      min_size=cfg.partition.min_size, labels_per_client=cfg.partition.labels_per_client,
                      sizes_sigma=cfg.partition.sizes_sigma, seed=seed)
    client_train, client_heldout = [], []
    for k, idx in enumerate(parts):
        tr, ho = holdout(idx, cfg.data.holdout_fraction, seed + 1000 + k)
        if len(tr) == 0:
            raise ConfigError(f"client {k}: its partition has no training examples "
                              f"(partition.method = {cfg.partition.method!r}, {len(idx)} examples in all); "
                              "use fewer clients, a larger partition.alpha or partition.min_size")
        client_train.append(tr)
        client_heldout.append(ho)
    labels = task.partition_values(splits["train"])
    summary = partition_summary(parts, labels)
    log(format_partition_summary(summary))

    rng = np.random.default_rng([seed, 7])
    n_val = len(splits["validation"])
    eval_indices = np.arange(n_val)
    if 0 < cfg.data.eval_examples < n_val:
        eval_indices = np.sort(rng.choice(n_val, cfg.data.eval_examples, replace=False))

    train = task.encode(splits["train"])
    validation = task.encode(splits["validation"])
    t_model = time.perf_counter()
    dtype = torch.float32  # bf16 runs autocast; weights and factors stay fp32
    torch.manual_seed(seed)  # the new head and PEFT's initial A: the same for the same seed
    try:
        base = task.load_model(model_path, dtype, splits["train"])
    except OSError as e:
        raise ConfigError(f"model.name = {cfg.model.name!r}: cannot load it ({e})") from e
    targets = target_modules_for(base.config.model_type, cfg.lora.target_modules)
    shared = SharedModel(base.to(device), task_type=task.peft_task_type, rank=cfg.lora.r, alpha=cfg.lora.alpha,
                         dropout=cfg.lora.dropout, target_modules=targets)
    t_loaded = time.perf_counter()
    ranks = cfg.lora.client_ranks or [cfg.lora.r]
    client_ranks = [ranks[k % len(ranks)] for k in range(len(parts))]
    num_labels = base.config.num_labels
    dp_sigma = 0.0
    if cfg.privacy.mode != "none":
        from fedlora.privacy import noise_multiplier

        dp_sigma = noise_multiplier(cfg, [len(t) for t in client_train])
    return Federation(cfg, strategy, task, shared, device, train, validation, eval_indices, client_train,
                      client_heldout, client_ranks, model_path, targets, num_labels, summary, dp_sigma,
                      load_s={"data": t_model - t_start, "model": t_loaded - t_model})


def clients_per_round(num_clients: int, cfg) -> int:
    """How many clients a round samples: ``clients_per_round``, else ``client_fraction`` of them
    (at least one, at most all)."""
    count = cfg.clients_per_round or max(1, round_half_up(cfg.client_fraction * num_clients))
    return min(count, num_clients)


def sample_clients(seed: int, round: int, num_clients: int, cfg, poisson: bool = False) -> list[int]:
    """This round's clients: :func:`clients_per_round` of them, drawn without replacement from a
    generator keyed by (seed, round) alone. ``poisson`` (client-level DP): each client joins
    independently with probability count / num_clients, so a round may have more, fewer or no
    clients (the sampling the privacy accounting assumes)."""
    count = clients_per_round(num_clients, cfg)
    if count == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round, 0x5A3])
    if poisson:
        return [int(k) for k in np.flatnonzero(rng.random(num_clients) < count / num_clients)]
    return sorted(int(k) for k in rng.choice(num_clients, count, replace=False))


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def client_context(fed: Federation, k: int, round: int, num_sampled: int, num_samples: int | None = None,
                   rank: int | None = None) -> ClientContext:
    """Client ``k``'s context in ``round``, one of ``num_sampled``; ``num_samples`` and ``rank`` as the
    client reported them (a Flower reply), else as this federation knows them."""
    cfg = fed.cfg
    return ClientContext(client_id=k, round=round,
                         num_samples=len(fed.client_train[k]) if num_samples is None else num_samples,
                         rank=fed.client_ranks[k] if rank is None else rank, alpha=cfg.lora.alpha,
                         num_clients=num_sampled, total_clients=fed.num_clients, seed=cfg.run.seed)


def checkpoint_extra(fed: Federation) -> dict[str, Any]:
    """What a checkpoint holds beyond the strategy's state, for an exact resume: the seed, the
    partition (checked on resume: the data must not have changed), the torch RNG state, and the
    merged base weights themselves (re-adding the summed merges would round differently)."""
    weights = {layer: fed.shared.lora_layers[layer].get_base_layer().weight.detach().to("cpu", copy=True)
               for layer in fed.shared.base_merged}
    return {"seed": fed.cfg.run.seed, "client_train": [np.asarray(i) for i in fed.client_train],
            "client_heldout": [np.asarray(i) for i in fed.client_heldout], "torch_rng": torch.get_rng_state(),
            "base_weights": weights}


def restore_checkpoint_extra(fed: Federation, ckpt: dict[str, Any], path: Path) -> None:
    """Undo :func:`checkpoint_extra` on a freshly prepared federation; a checkpoint of other data,
    another partition or another seed raises ConfigError naming the file."""
    extra = ckpt["extra"]
    if extra.get("seed", fed.cfg.run.seed) != fed.cfg.run.seed:
        raise ConfigError(f"checkpoint {str(path)!r} was written with run.seed = {extra['seed']}, the config "
                          f"says {fed.cfg.run.seed}; resume with the run's own config")
    for key in ("client_train", "client_heldout"):
        saved = extra.get(key)
        if saved is not None and (len(saved) != fed.num_clients or not all(
                np.array_equal(a, b) for a, b in zip(saved, getattr(fed, key)))):
            raise ConfigError(f"checkpoint {str(path)!r}: the clients' data ({key}) differs from the checkpoint's; "
                              "the dataset, the partition settings or the seed changed since the run started")
    weights = extra.get("base_weights")
    if weights is None:  # an older checkpoint: rebuild the merged base weights from their sum
        for layer, delta in ckpt["base_merged"].items():
            fed.shared.add_to_base(layer, delta)
    else:
        with torch.no_grad():
            for layer, w in weights.items():
                target = fed.shared.lora_layers[layer].get_base_layer().weight
                target.copy_(w.to(target.device, target.dtype))
        fed.shared.base_merged = {layer: d.clone() for layer, d in ckpt["base_merged"].items()}
    if "torch_rng" in extra:
        torch.set_rng_state(extra["torch_rng"])


def start_state(fed: Federation, log: Callable[[str], None] = print):
    """The round-0 global state: the strategy's :meth:`~fedlora.strategies.Strategy.init_state` from
    PEFT's fresh adapter, or from ``lora.init_adapter`` (:mod:`fedlora.peft_adapter`) laid over it."""
    cfg = fed.cfg
    fresh = fed.shared.initial_adapter()
    if not cfg.lora.init_adapter:
        return fed.strategy.init_state(fresh, alpha=cfg.lora.alpha, seed=cfg.run.seed)
    from fedlora import peft_adapter

    path = cfg.lora.init_adapter
    adapter_config = peft_adapter.read_adapter_config(path)
    peft_adapter.check_task_type(path, adapter_config, fed.task.peft_task_type)
    start = peft_adapter.start_adapter(path, fresh, log)
    return fed.strategy.init_state(start, alpha=cfg.lora.alpha, seed=cfg.run.seed,
                                   start_scaling=peft_adapter.adapter_scaling(adapter_config))

