"""One client's round, on either engine: :func:`client_round` starts from the global state (and the
client's personal state), trains locally (:func:`local_train`: its batches, a fresh optimiser, a
schedule, the strategy's regulariser) and transforms the result before upload.

Randomness is keyed by (seed, round, client) alone (batch order and dropout), so a client's round is
reproducible on its own, whatever ran before it: the basis of resuming a run.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedlora.config import TrainSection
from fedlora.errors import FedLoRAError
from fedlora.factors import Adapter
from fedlora.strategies import ClientContext, GlobalState

if TYPE_CHECKING:
    from fedlora.runtime.federation import Federation


class ClientTrainingError(FedLoRAError):
    """A client's local training failed (a NaN or Inf loss) and ``train.fail_fast`` is set."""


def client_seed(seed: int, round: int, client: object, purpose: str = "train") -> int:
    """A 32-bit seed for one (seed, round, client, purpose)."""
    return zlib.crc32(f"{seed}/{round}/{client}/{purpose}".encode())


def batch_order(indices: np.ndarray, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches: shuffled passes over ``indices``, re-shuffled each pass; a short tail batch
    at the end of a pass is kept (no example is skipped)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < steps:
        order = rng.permutation(indices)
        for start in range(0, len(order), batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def steps_for(num_examples: int, cfg: TrainSection) -> int:
    """Local optimiser steps for a client: ``local_epochs`` passes if set, else ``local_steps``."""
    if cfg.local_epochs > 0:
        return cfg.local_epochs * math.ceil(num_examples / cfg.batch_size)
    return cfg.local_steps


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainSection, lr: float) -> torch.optim.Optimizer:
    """A fresh SGD or AdamW for one client's round (methods re-create it each round)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainSection) -> float:
    """Warm-up then constant, linear decay to 0 or cosine decay to 0, over a client's local steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LocalResult:
    """What one client's training produced. ``adapter`` is None when it failed (``error`` says why)."""

    adapter: Adapter | None
    loss: float
    steps: int
    error: str | None = None


LossFn = Callable[[torch.nn.Module, dict[str, Tensor]], Tensor]


def local_train(shared, task, data, indices: np.ndarray, *, cfg: TrainSection, lr: float, steps: int,
                parts: frozenset[str], train_extras: bool, regularizer: Callable[[Adapter], Tensor | None],
                seed: int, device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
                loss_fn: LossFn | None = None, client_id: object = None,
                dp_sgd: tuple[float, float] | None = None) -> LocalResult:
    """Train the shared model's live adapter on ``indices`` of ``data`` for ``steps`` steps.

    The caller has loaded the client's start adapter. ``parts`` ("A", "B") and ``train_extras`` say
    what trains; ``regularizer(live_adapter)`` adds the strategy's term to every step's loss. A NaN
    or Inf loss stops the client: raises :class:`ClientTrainingError` with ``cfg.fail_fast``, else
    returns a failed result. Returns the trained adapter (detached) and the mean loss.

    ``dp_sgd = (σ, C)``: sample-level DP-SGD (:mod:`fedlora.privacy.dpsgd`): Poisson batches of
    expected size ``cfg.batch_size``, Opacus's per-example clipping to C and noise σ·C; the
    regulariser's gradient is added after the noise; ``train.grad_clip`` is not applied (the
    per-example clip replaces it).
    """
    loss_fn = loss_fn or task.loss
    params = shared.set_trainable(parts, train_extras)
    opt = make_optimizer(params, cfg, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg))
    torch.manual_seed(seed)  # dropout masks: a function of (seed, round, client) only
    shared.model.train()
    live = shared.live()
    total, done, counted = 0.0, 0, 0
    private = None
    if dp_sgd is not None:
        from fedlora.privacy.dpsgd import PrivateTraining, poisson_batches

        private = PrivateTraining(shared.model, opt, sigma=dp_sgd[0], clip=dp_sgd[1],
                                  expected_batch_size=cfg.batch_size, seed=seed)
        batches = poisson_batches(indices, cfg.batch_size, steps, seed)
    else:
        batches = batch_order(indices, cfg.batch_size, steps, seed)
    with private or contextlib.nullcontext():
        for batch_idx in batches:
            if private is not None and len(batch_idx) == 0:  # an empty Poisson batch: a noise-only step
                private.empty_batch()
                private.step(regularizer(live))
                sched.step()
                done += 1
                continue
            batch = task.collate(data, batch_idx, device)
            with autocast or contextlib.nullcontext():
                loss = loss_fn(shared.model, batch)
            reg = regularizer(live)
            full = loss if reg is None else loss + reg
            if not torch.isfinite(full):
                msg = f"client {client_id}: loss is {float(full.detach())} at local step {done}"
                if cfg.fail_fast:
                    raise ClientTrainingError(msg + " (train.fail_fast is set)")
                return LocalResult(None, float("nan"), done, msg)
            if private is not None:
                loss.backward()  # per-example gradients of the data term only
                private.step(reg)
            else:
                opt.zero_grad(set_to_none=True)
                full.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
            sched.step()
            total += float(full.detach())
            done += 1
            counted += 1
    return LocalResult(shared.read(), total / max(counted, 1), done)


def client_round(fed: Federation, state: GlobalState, personal: Adapter | None, ctx: ClientContext,
                 loss_fn=None) -> tuple[LocalResult, Adapter | None, Adapter | None, dict]:
    """Train client ``ctx.client_id`` from ``state``; returns (result, upload adapter, personal state,
    info). The upload adapter is None when training failed (``result.error`` says why)."""
    strategy, cfg = fed.strategy, fed.cfg
    start = strategy.client_start(state, personal, ctx)
    rank = next(iter(start.layers.values())).rank
    scaling = strategy.scaling(ctx, rank)
    fed.shared.load(start, scaling)
    reference = start.to(device=fed.device)  # the regulariser compares live (device) factors with it
    indices = fed.client_train[ctx.client_id]
    result = local_train(
        fed.shared, fed.task, fed.train, indices, cfg=cfg.train,
        lr=cfg.train.lr * cfg.train.round_lr_decay ** ctx.round,
        steps=steps_for(len(indices), cfg.train), parts=strategy.trainable(ctx.round),
        train_extras=strategy.trains_extras(ctx.round),
        regularizer=lambda live: strategy.regularizer(live, reference, scaling),
        seed=client_seed(cfg.run.seed, ctx.round, ctx.client_id), device=fed.device,
        autocast=fed.autocast(), loss_fn=loss_fn, client_id=ctx.client_id,
        dp_sgd=(fed.dp_sigma, cfg.privacy.clip) if cfg.privacy.mode == "sample" else None)
    if result.adapter is None:
        return result, None, personal, {}
    adapter, info = strategy.before_upload(result.adapter, start, ctx)
    info = dict(info, scaling=scaling)
    personal_next = strategy.personal_state(adapter)
    if cfg.privacy.mode == "client":  # DP-FedAvg: clip the update before it leaves the client
        from fedlora.privacy.clipping import clip_update
        from fedlora.runtime.privacy import current_clip

        adapter, norm = clip_update(adapter, start, strategy.upload_parts(ctx.round), current_clip(cfg, state))
        info["update_norm"] = norm
    return result, adapter, personal_next, info
