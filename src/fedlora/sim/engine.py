"""The embedded federated engine: one process, one frozen base model, every client simulated.

Read :func:`run` top to bottom; it is the whole round loop (design.md, "One round, as data"):

    sample clients → for each: load the global adapter (+ its personal state) into the shared model,
    set what trains and the scaling, train locally (+ the strategy's regulariser), transform before
    upload, upload → aggregate → merge any base-weight change → diagnostics → evaluate → one
    metrics row → atomic checkpoint.

Everything that can be wrong with the inputs (strategy, model, dataset, columns, an empty client) is
checked in :func:`prepare` before the first training step. Strategies are driven only through their
generic hooks (``fedlora.strategies.base``), never by name.
"""

from __future__ import annotations

import contextlib
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
from fedlora.errors import ConfigError, FedLoRAError, RoundFailedError
from fedlora.factors import Adapter
from fedlora.sim import client as client_mod
from fedlora.sim.model import SharedModel, autocast_for, load_tokenizer, pick_device, target_modules_for
from fedlora.sim.rundir import ResumePoint, RunDir, signals_deferred, sigterm_interrupts
from fedlora.sim.tasks import Encoded, Task, get_task
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState, Strategy
from fedlora.strategies.registry import make_strategy


# ---- setup: everything checked before any training ----------------------------------------------


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
    dtype = torch.float32  # bf16 runs autocast; weights and factors stay fp32
    torch.manual_seed(seed)  # the new head and PEFT's initial A: the same for the same seed
    try:
        base = task.load_model(model_path, dtype, splits["train"])
    except OSError as e:
        raise ConfigError(f"model.name = {cfg.model.name!r}: cannot load it ({e})") from e
    targets = target_modules_for(base.config.model_type, cfg.lora.target_modules)
    shared = SharedModel(base.to(device), task_type=task.peft_task_type, rank=cfg.lora.r, alpha=cfg.lora.alpha,
                         dropout=cfg.lora.dropout, target_modules=targets)
    ranks = cfg.lora.client_ranks or [cfg.lora.r]
    client_ranks = [ranks[k % len(ranks)] for k in range(len(parts))]
    num_labels = base.config.num_labels
    return Federation(cfg, strategy, task, shared, device, train, validation, eval_indices, client_train,
                      client_heldout, client_ranks, model_path, targets, num_labels, summary)


def sample_clients(seed: int, round: int, num_clients: int, cfg) -> list[int]:
    """This round's clients: ``clients_per_round`` of them, else ``client_fraction`` (at least one),
    drawn without replacement from a generator keyed by (seed, round) alone."""
    count = cfg.clients_per_round or max(1, round_half_up(cfg.client_fraction * num_clients))
    count = min(count, num_clients)
    if count == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round, 0x5A3])
    return sorted(int(k) for k in rng.choice(num_clients, count, replace=False))


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ---- one client, one round ----------------------------------------------------------------------


def client_context(fed: Federation, k: int, round: int, num_sampled: int) -> ClientContext:
    cfg = fed.cfg
    return ClientContext(client_id=k, round=round, num_samples=len(fed.client_train[k]), rank=fed.client_ranks[k],
                         alpha=cfg.lora.alpha, num_clients=num_sampled, total_clients=fed.num_clients,
                         seed=cfg.run.seed)


def client_round(fed: Federation, state: GlobalState, personal: Adapter | None, ctx: ClientContext,
                 loss_fn=None) -> tuple[client_mod.LocalResult, Adapter | None, Adapter | None, dict]:
    """Train client ``ctx.client_id`` from ``state``; returns (result, upload adapter, personal state, info)."""
    strategy, cfg = fed.strategy, fed.cfg
    start = strategy.client_start(state, personal, ctx)
    rank = next(iter(start.layers.values())).rank
    scaling = strategy.scaling(ctx, rank)
    fed.shared.load(start, scaling)
    trains_extras = strategy.trains_extras(ctx.round)
    reference = start.to(device=fed.device)  # the regulariser compares live (device) factors with it
    indices = fed.client_train[ctx.client_id]
    result = client_mod.local_train(
        fed.shared, fed.task, fed.train, indices, cfg=cfg.train,
        lr=cfg.train.lr * cfg.train.round_lr_decay ** ctx.round,
        steps=client_mod.steps_for(len(indices), cfg.train), parts=strategy.trainable(ctx.round),
        train_extras=trains_extras, regularizer=lambda live: strategy.regularizer(live, reference, scaling),
        seed=client_mod.client_seed(cfg.run.seed, ctx.round, ctx.client_id), device=fed.device,
        autocast=fed.autocast(), loss_fn=loss_fn, client_id=ctx.client_id)
    if result.adapter is None:
        return result, None, personal, {}
    adapter, info = strategy.before_upload(result.adapter, start, ctx)
    info = dict(info, scaling=scaling)
    return result, adapter, strategy.personal_state(adapter), info


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate(fed: Federation, state: GlobalState, personal: dict[int, Adapter | None]) -> dict[str, Any]:
    """The global model on the global validation subset; with ``eval.personalised``, each client's
    own model (``client_start`` with its personal state) on its held-out slice, weighted by slice
    size and unweighted (mean over clients)."""
    ev = fed.cfg.eval
    fed.shared.load(state.adapter, state.scaling)
    out: dict[str, Any] = {"global": fed.task.evaluate(fed.shared.model, fed.validation, fed.eval_indices,
                                                       ev.batch_size, fed.device, fed.autocast())}
    if not ev.personalised:
        return out
    per_client = {}
    for k in range(fed.num_clients):
        idx = fed.client_heldout[k]
        if ev.client_examples > 0:
            idx = idx[: ev.client_examples]
        if len(idx) == 0:
            continue
        ctx = client_context(fed, k, state.round, fed.num_clients)
        start = fed.strategy.client_start(state, personal.get(k), ctx)
        rank = next(iter(start.layers.values())).rank
        fed.shared.load(start, fed.strategy.scaling(ctx, rank))
        per_client[k] = fed.task.evaluate(fed.shared.model, fed.train, idx, ev.batch_size, fed.device, fed.autocast())
    if per_client:
        sizes = np.array([m["examples"] for m in per_client.values()], dtype=float)
        summary = {}
        for metric in fed.task.metrics:
            vals = np.array([m[metric] for m in per_client.values()], dtype=float)
            summary[f"{metric}_weighted"] = float((vals * sizes).sum() / sizes.sum())
            summary[f"{metric}_unweighted"] = float(vals.mean())
        summary["clients"] = len(per_client)
        summary["per_client"] = {str(k): m[fed.task.metrics[0]] for k, m in per_client.items()}
        out["personal"] = summary
    return out


# ---- the server half of a round, shared with the Flower ServerApp -------------------------------


def aggregate_round(fed: Federation, state: GlobalState, updates: list[ClientUpdate], contexts: list[ClientContext],
                    secure: ClientUpdate | None = None) -> tuple[GlobalState, Any, dict[str, Any]]:
    """Aggregate a round's updates, merge any base-weight change into the shared model, and measure it.

    Returns (new state, diagnostics or None, communication bytes). ``secure`` is the single update a
    secure-aggregation server holds (the weighted average): it is aggregated instead of ``updates``
    and the diagnostics, which need individual uploads, are skipped.
    """
    from fedlora.diagnostics import communication_bytes, keeps_personal_state, round_diagnostics

    strategy = fed.strategy
    new = strategy.aggregate([secure] if secure is not None else updates, state)
    if new.base_delta:
        fed.shared.merge_base(new.base_delta)
    diag = None if secure is not None else round_diagnostics(
        updates, strategy.weights(updates), new, personalised=keeps_personal_state(strategy))
    return new, diag, communication_bytes(strategy, state, updates, contexts)


def evaluate_if_due(fed: Federation, state: GlobalState, personal: dict[int, Adapter | None], t: int,
                    status: Callable[[str], None] | None = None) -> tuple[dict[str, Any] | None, float]:
    """Evaluate after round ``t`` every ``eval.every`` rounds and after the last; returns (metrics, seconds)."""
    cfg = fed.cfg
    if (t + 1) % cfg.eval.every != 0 and t + 1 != cfg.train.rounds:
        return None, 0.0
    if status is not None:
        status("evaluating")
    t1 = time.perf_counter()
    return evaluate(fed, state, personal), time.perf_counter() - t1


def metrics_row(t: int, sampled: list[int], failed: list[dict], losses: dict[int, tuple[float, int]],
                evaluation: dict[str, Any] | None, diag, comm: dict[str, Any], *, t0: float, train_s: float,
                eval_s: float, **extra: Any) -> dict[str, Any]:
    """One metrics.jsonl row. ``losses`` maps client → (train loss, samples); the round's train loss is
    their sample-weighted mean. ``extra`` adds engine-specific keys (e.g. the bytes Flower carried)."""
    weights = np.array([n for _, n in losses.values()], dtype=float)
    values = [loss for loss, _ in losses.values()]
    row = {
        "round": t,
        "clients": sampled,
        "failed": failed,
        "train_loss": float(np.dot(weights, values) / weights.sum()) if losses else None,
        "client_loss": {str(k): loss for k, (loss, _) in losses.items()},
        "eval": evaluation,
        "diagnostics": diag.to_dict() if diag is not None else None,
        "bytes_up": comm["bytes_up_total"],
        "bytes_down": comm["bytes_down_total"],
    }
    row.update(extra)
    row.update(train_s=train_s, eval_s=eval_s, wall_s=time.perf_counter() - t0)
    return row


# ---- the run ------------------------------------------------------------------------------------


class Display:
    """Rich progress (round, ETA) and one readable line per round; silent when ``enabled`` is False."""

    def __init__(self, console, enabled: bool, total: int, done: int):
        self.console = console
        self.enabled = enabled
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=self.console, transient=True)
            self.task = self.progress.add_task("", total=total, completed=done)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def round_done(self, line: str) -> None:
        self.console.print(line)
        if self.progress is not None:
            self.progress.advance(self.task)


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The one-line summary of a metrics row."""
    parts = [f"round {row['round'] + 1}/{rounds}", f"{len(row['clients'])} clients"]
    if row["failed"]:
        parts.append(f"[red]{len(row['failed'])} failed[/]")
    if row["train_loss"] is not None:
        parts.append(f"loss {row['train_loss']:.4f}")
    ev = row.get("eval")
    if ev:
        g = ev["global"]
        parts.append(f"acc {g['accuracy']:.3f}" if "accuracy" in g else f"eval loss {g['loss']:.4f}")
        p = ev.get("personal")
        if p and "accuracy_weighted" in p:
            parts.append(f"personal {p['accuracy_weighted']:.3f} (w) / {p['accuracy_unweighted']:.3f} (u)")
    d = row.get("diagnostics")
    if d and d.get("agg_error_rel") is not None:
        parts.append(f"agg.err {d['agg_error_rel']:.2e}")
    parts.append(f"↑{row['bytes_up'] / 2**20:.2f} MB ↓{row['bytes_down'] / 2**20:.2f} MB")
    parts.append(f"{row['wall_s']:.1f}s")
    return " · ".join(parts)


@sigterm_interrupts()
def run(cfg: RunConfig, *, resume: str | Path | None = None, loss_fn=None, progress: bool | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a federated simulation; returns the summary (also written to summary.json).

    ``resume`` is an existing run directory: the run continues from its last complete round. ``cfg``
    may differ from the config stored there only in ``RESUMABLE_KEYS`` (e.g. more rounds); a run
    already complete for ``cfg.train.rounds`` is left untouched. ``loss_fn(model, batch, client_id)``
    replaces the task's loss (tests use it to inject failures).

    Ctrl-C or SIGTERM stops after writing the summary (status "interrupted") and re-raises
    KeyboardInterrupt; complete rounds are never lost. A round in which every sampled client fails
    (NaN or Inf loss) cannot complete: the run ends with status "failed: …" and raises
    RoundFailedError naming the first client's error; so does any other FedLoRAError mid-run
    (e.g. ``train.fail_fast``). Rounds where only some clients fail complete without them; the
    summary counts those client-rounds (``failed_client_rounds``, ``first_failure``).
    """
    from rich.console import Console

    t_start = time.perf_counter()
    show = cfg.run.progress if progress is None else progress
    console = Console(highlight=False)
    say = log or console.print

    # what can be checked without the model or the data is checked first, and touches no file
    if resume is not None:
        rundir = RunDir.open(resume)
        rundir.check_resume_config(cfg)
        finished = rundir.finished_summary(cfg.train.rounds)
        if finished is not None:
            say(f"run {rundir.path} is already complete: {cfg.train.rounds} of {cfg.train.rounds} rounds; "
                "add rounds with --set train.rounds=N")
            return finished
        point = rundir.resume_point()
        if cfg.train.rounds < point.round:
            raise ConfigError(f"train.rounds = {cfg.train.rounds}: the run in {str(rundir.path)!r} has already "
                              f"completed {point.round} rounds; ask for at least that many")
    else:
        RunDir.check_location(cfg)

    fed = prepare(cfg, say)  # every input error surfaces here, before any training
    strategy, shared = fed.strategy, fed.shared
    seed = cfg.run.seed
    state = strategy.init_state(shared.initial_adapter(), alpha=cfg.lora.alpha, seed=seed)
    personal: dict[int, Adapter | None] = {}
    for k in range(fed.num_clients):  # a client the strategy cannot start (e.g. its rank) fails now, not mid-run
        strategy.client_start(state, None, client_context(fed, k, 0, fed.num_clients))
    if resume is not None:
        if point.checkpoint is not None:
            state, personal = point.checkpoint["state"], point.checkpoint["personal"]
            restore_checkpoint_extra(fed, point.checkpoint, rundir.checkpoint_path)
        rundir.cut_metrics(point)
        rundir.write_config(cfg)  # e.g. more rounds, set on the command line of the resume
        say(resume_line(rundir, point))
    else:
        rundir = RunDir.create(cfg)
        rundir.write_json("partition.json", fed.partition_summary)
        _plot_partition(fed.partition_summary, rundir.path / "partition.png")
    say(f"run directory: {rundir.path}")

    status = "completed"
    complete = (state, dict(shared.base_merged))  # the last round that is fully written
    failed_row = None  # the row of a round that could not complete (it is not in metrics.jsonl)
    display = Display(console, show, cfg.train.rounds, state.round)
    try:
        with display:
            while state.round < cfg.train.rounds:
                t = state.round
                t0 = time.perf_counter()
                sampled = sample_clients(seed, t, fed.num_clients, cfg.train)
                updates, contexts, losses, failed = [], [], {}, []
                for i, k in enumerate(sampled):
                    display.status(f"client {k} ({i + 1}/{len(sampled)})")
                    ctx = client_context(fed, k, t, len(sampled))
                    client_loss = (lambda m, b, k=k: loss_fn(m, b, k)) if loss_fn else None
                    result, adapter, mine, info = client_round(fed, state, personal.get(k), ctx, client_loss)
                    if adapter is None:
                        failed.append({"client": k, "step": result.steps, "error": result.error})
                        continue
                    personal[k] = mine
                    payload = strategy.payload(adapter, t)
                    updates.append(ClientUpdate(k, strategy.receive(payload, state, t), ctx.num_samples,
                                                info["scaling"], info))
                    contexts.append(ctx)
                    losses[k] = result.loss
                t_train = time.perf_counter() - t0
                if not updates:  # nothing to aggregate: a model carried over unchanged is no round's result
                    failed_row = metrics_row(t, sampled, failed, {}, None, None, NO_BYTES, t0=t0, train_s=t_train,
                                             eval_s=0.0)
                    raise RoundFailedError(f"round {t + 1}: every sampled client failed ({len(failed)} of "
                                           f"{len(sampled)}); the first: {failed[0]['error']}")

                display.status("aggregating")
                state, diag, comm = aggregate_round(fed, state, updates, contexts)
                evaluation, t_eval = evaluate_if_due(fed, state, personal, t, status=display.status)
                row = metrics_row(t, sampled, failed, {k: (loss, len(fed.client_train[k])) for k, loss in losses.items()},
                                  evaluation, diag, comm, t0=t0, train_s=t_train, eval_s=t_eval)
                with signals_deferred():  # a signal here lands after the row, the checkpoint and `complete` agree
                    rundir.commit_round(row, state, personal, shared.base_merged, checkpoint_extra(fed))
                    complete = (state, dict(shared.base_merged))
                display.round_done(round_line(row, cfg.train.rounds))
    except KeyboardInterrupt:
        status = "interrupted"
        say(f"interrupted after {complete[0].round} complete rounds of {cfg.train.rounds}; "
            f"resume with: fedlora run --resume {rundir.path}")
    except FedLoRAError as e:  # a failed round, fail_fast, a strategy rejecting the round: keep what is complete
        finish(fed, rundir, *complete, f"failed: {e}", time.perf_counter() - t_start, failed_row=failed_row)
        raise
    summary = finish(fed, rundir, *complete, status, time.perf_counter() - t_start)
    if status == "interrupted":
        raise KeyboardInterrupt
    say(completed_line(summary))
    return summary


#: the communication of a round that sent nothing
NO_BYTES = {"bytes_up_total": 0, "bytes_down_total": 0}


def resume_line(rundir: RunDir, point: ResumePoint) -> str:
    """What a resume starts from, and what it cut from metrics.jsonl."""
    line = f"resuming {rundir.path} at round {point.round + 1} ({point.round} rounds done)"
    if point.redone is not None:
        line += f"; round {point.redone + 1} was logged after the last checkpoint, so it is run again"
    if point.torn_line is not None:
        line += f"; cut the torn last line of metrics.jsonl (line {point.torn_line}, a write cut short)"
    return line


def completed_line(summary: dict[str, Any]) -> str:
    """The last line of a completed run: its rounds and, if any, its failed client-rounds."""
    line = f"completed {summary['rounds_completed']} rounds"
    n = summary["failed_client_rounds"]
    if n:
        line += f"; {n} client-round{'s' if n > 1 else ''} failed (first: {summary['first_failure']})"
    return line


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


def _plot_partition(summary: dict[str, Any], path: Path) -> None:
    from fedlora.data import plot_partition

    tmp = path.with_name(f".tmp-{path.name}")
    plot_partition(summary, tmp)
    tmp.replace(path)


def finish(fed: Federation, rundir: RunDir, state: GlobalState, base_merged: dict, status: str,
           wall_s: float, failed_row: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the global adapter and merged base change of the last complete round, write summary.json.
    ``failed_row`` is the row of a round that could not complete: not logged, but its failures count."""
    cfg = fed.cfg
    rundir.save_adapter(state.adapter, scaling=state.scaling, base_model=fed.model_path,
                        task_type=fed.task.peft_task_type, target_modules=fed.target_modules, dropout=cfg.lora.dropout,
                        base_delta=fed.shared.base_delta_state_dict(base_merged))
    rows = rundir.read_metrics()
    summary = summarize(rows + ([failed_row] if failed_row else []), fed.task.metrics[0],
                        higher_is_better=fed.task.higher_is_better)
    summary.update(status=status, strategy=cfg.strategy.name, model=cfg.model.name, dataset=cfg.data.source,
                   num_clients=fed.num_clients, num_labels=fed.num_labels, rounds_completed=state.round,
                   rounds=cfg.train.rounds, wall_s=wall_s, run_dir=str(rundir.path),
                   adapter=str(rundir.path / "adapter"),
                   base_delta=str(rundir.path / "base_delta.safetensors") if base_merged else None)
    samples = [r["eval"]["global"]["samples"] for r in rows if (r.get("eval") or {}).get("global", {}).get("samples")]
    if samples:  # generation tasks: the last evaluation's generated samples
        summary["samples"] = samples[-1]
    rundir.write_json("summary.json", summary)
    return summary


def summarize(rows: list[dict[str, Any]], metric: str, higher_is_better: bool = True) -> dict[str, Any]:
    """Best and final values of the headline metric (global and personal), mean aggregation error,
    bytes, and failed client-rounds (how many, and the first), from metrics rows."""
    best = max if higher_is_better else min
    def series(get):
        out = []
        for r in rows:
            with contextlib.suppress(KeyError, TypeError):
                v = get(r)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    out.append(v)
        return out

    glob = series(lambda r: r["eval"]["global"][metric])
    pers_w = series(lambda r: r["eval"]["personal"][f"{metric}_weighted"])
    pers_u = series(lambda r: r["eval"]["personal"][f"{metric}_unweighted"])
    err = series(lambda r: r["diagnostics"]["agg_error_rel"])
    failures = [f"round {r['round'] + 1}, {f['error']}" for r in rows for f in r["failed"]]
    return {
        "metric": metric,
        f"best_{metric}": best(glob) if glob else None,
        f"final_{metric}": glob[-1] if glob else None,
        f"best_personal_{metric}_weighted": best(pers_w) if pers_w else None,
        f"final_personal_{metric}_weighted": pers_w[-1] if pers_w else None,
        f"final_personal_{metric}_unweighted": pers_u[-1] if pers_u else None,
        "mean_agg_error_rel": float(np.mean(err)) if err else None,
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "failed_client_rounds": len(failures),
        "first_failure": failures[0] if failures else None,
    }
