"""The task contract: what a model is, how examples become batches, the loss, and the eval metrics.

The engine knows a task only through :class:`Task`; each task type is a subclass in its own module
of this package (``classification``, ``choice``, ``causal``), registered by name with
:func:`fedlora.tasks.registry.register`. :class:`ScoredTask` is the shared base of tasks that score
classes or choices (cross-entropy loss, accuracy). This module names no subclass.

Examples are tokenised once per run and cached on disk (``FEDLORA_CACHE``, default
``~/.cache/fedlora/tokens``), keyed by the tokenizer, the max length and a hash of the texts
(:mod:`fedlora.tasks.token_cache`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor


@dataclass
class Encoded:
    """A tokenised split: per example, its token-id sequences (ragged) and its label.

    ``features`` maps a model input name (``input_ids``, ``token_type_ids``) to one list of ids per
    example; ``labels`` is one int per example. Padding happens per batch (dynamic padding).
    """

    features: dict[str, list[list[int]]]
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    """Where tokenised splits are cached."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora")) / "tokens"


class Task:
    """The interface the engine drives. Subclasses set ``name`` and ``peft_task_type`` and are
    registered under their name with :func:`fedlora.tasks.registry.register`.

    - ``load_model(path, dtype, train_split)``: the base model with this task's head (sized from the
      training split, e.g. its number of labels).
    - ``encode(split)``: a :class:`Encoded` split (tokenised once, cached).
    - ``partition_values(split)``: the values partitioners split on by default (labels).
    - ``collate(data, indices, device)``: one padded batch as model keyword arguments plus ``labels``.
    - ``loss(model, batch)``: the training loss (a scalar tensor).
    - ``evaluate(model, data, indices, batch_size, device, autocast)``: metric name → value, including
      ``loss`` and ``examples``; the first key of ``metrics`` is the headline metric.
    """

    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    #: whether a larger headline metric (``metrics[0]``) is better ("best" in the summary is then its
    #: max); a task whose headline is a loss or perplexity sets False
    higher_is_better: ClassVar[bool] = True

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def check_columns(self, split) -> None:
        raise NotImplementedError

    def load_model(self, path: str, dtype: torch.dtype, train_split):
        raise NotImplementedError

    def encode(self, split) -> Encoded:
        raise NotImplementedError

    def partition_values(self, split) -> np.ndarray:
        raise NotImplementedError

    def collate(self, data: Encoded, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model, data: Encoded, indices: Sequence[int], batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
        raise NotImplementedError


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading progress bar and its report of the freshly initialised head
    (expected for a new task head), restoring the previous settings afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def pad_ids(seqs: list[list[int]], value: int) -> Tensor:
    """Ragged id sequences as one right-padded [len(seqs), longest] long tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class ScoredTask(Task):
    """A task whose model gives one score per class or choice for each example.

    Loss: cross-entropy over the scores. Metrics: accuracy (argmax) and loss. Subclasses define
    ``scores(model, batch)``, and may order evaluation batches with ``eval_order`` (e.g. by length,
    so each batch pads little; the metrics do not depend on order).
    """

    metrics = ("accuracy", "loss")

    def scores(self, model, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def eval_order(self, data: Encoded, indices: Sequence[int]) -> list[int]:
        return list(indices)

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        return torch.nn.functional.cross_entropy(self.scores(model, batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, data: Encoded, indices: Sequence[int], batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        idx = self.eval_order(data, indices)
        for start in range(0, len(idx), batch_size):
            batch = self.collate(data, idx[start:start + batch_size], device)
            with autocast or contextlib.nullcontext():
                scores = self.scores(model, batch).float()
            loss_sum += float(torch.nn.functional.cross_entropy(scores, batch["labels"], reduction="sum"))
            correct += int((scores.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
        model.train(was_training)
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "examples": 0}
        return {"accuracy": correct / n, "loss": loss_sum / n, "examples": n}
