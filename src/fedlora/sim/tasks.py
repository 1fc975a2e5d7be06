"""Task types: what a model is, how examples become batches, the loss, and the eval metrics.

The engine knows a task only through :class:`Task`. Classification is implemented here; multiple
choice and causal LM (the next issue) are further subclasses with their own ``load_model``,
``encode``, ``collate``, ``loss`` and ``evaluate``; the round loop does not change.

Examples are tokenised once per run and cached on disk (``FEDLORA_CACHE``, default
``~/.cache/fedlora/tokens``), keyed by the tokenizer, the max length and a hash of the texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fedlora.errors import ConfigError


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Task:
    """The interface the engine drives. Subclasses set ``name`` and ``peft_task_type``.

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


def _pad(seqs: list[list[int]], value: int) -> Tensor:
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


class ClassificationTask(ScoredTask):
    """Sequence classification of single texts or text pairs (columns ``text``, optional
    ``text_pair``, ``label`` as a ClassLabel). Loss: cross-entropy; metrics: accuracy and loss."""

    name = "classification"
    peft_task_type = "SEQ_CLS"

    def check_columns(self, split) -> None:
        missing = [c for c in ("text", "label") if c not in split.column_names]
        if missing:
            raise ConfigError(f"data: the classification task needs columns {missing} (map them with data.columns); "
                              f"the dataset has {split.column_names}")

    def num_labels(self, split) -> int:
        feat = split.features["label"]
        if hasattr(feat, "num_classes"):
            return int(feat.num_classes)
        return int(max(split["label"])) + 1

    def label_names(self, split) -> list[str]:
        feat = split.features["label"]
        return list(getattr(feat, "names", [str(i) for i in range(self.num_labels(split))]))

    def load_model(self, path: str, dtype: torch.dtype, train_split):
        from transformers import AutoModelForSequenceClassification

        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=self.num_labels(train_split),
                                                                       dtype=dtype)
        if model.config.pad_token_id is None:
            # decoders (llama, gpt2) classify from the last non-pad token and need a pad id to find it
            pad = self.tokenizer.pad_token_id
            model.config.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        return model

    def partition_values(self, split) -> np.ndarray:
        return np.asarray(split["label"])

    def encode(self, split) -> Encoded:
        texts = list(split["text"])
        pairs = list(split["text_pair"]) if "text_pair" in split.column_names else None
        labels = np.asarray(split["label"], dtype=np.int64)
        tok = self.tokenizer
        h = hashlib.sha256()
        for part in (type(tok).__name__, str(getattr(tok, "name_or_path", "")), str(len(tok)), str(self.max_length),
                     self.name):
            h.update(part.encode() + b"\0")
        for t in texts + (pairs or []):
            h.update(str(t).encode() + b"\0")
        h.update(labels.tobytes())
        path = cache_dir() / f"{self.name}-{h.hexdigest()[:32]}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, weights_only=False)
                return Encoded(cached["features"], labels, {"cache": str(path), "cached": True})
            except Exception:  # a damaged cache file is rebuilt, never trusted
                pass
        if tok.pad_token_id is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, pairs, truncation=True, max_length=self.max_length)
        features = {k: [list(map(int, ids)) for ids in enc[k]] for k in ("input_ids", "token_type_ids") if k in enc}
        _atomic_torch_save({"features": features}, path)
        return Encoded(features, labels, {"cache": str(path), "cached": False})

    def collate(self, data: Encoded, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        ids = [data.features["input_ids"][i] for i in indices]
        batch = {"input_ids": _pad(ids, pad)}
        batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0)
        if "token_type_ids" in data.features:
            batch["token_type_ids"] = _pad([data.features["token_type_ids"][i] for i in indices], 0)
        batch["labels"] = torch.as_tensor(data.labels[np.asarray(indices)], dtype=torch.long)
        return {k: v.to(device) for k, v in batch.items()}

    def scores(self, model, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()

    def eval_order(self, data: Encoded, indices: Sequence[int]) -> list[int]:
        # sort by length so each batch pads little
        return sorted(indices, key=lambda i: len(data.features["input_ids"][i]))


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask}


def _register_task_types() -> None:
    """Add the task types defined in their own modules (imported here: they import this one)."""
    from fedlora.sim.task_causal import CausalLMTask
    from fedlora.sim.task_choice import MultipleChoiceTask

    TASKS.setdefault(MultipleChoiceTask.name, MultipleChoiceTask)
    TASKS.setdefault(CausalLMTask.name, CausalLMTask)


def get_task(name: str, tokenizer, max_length: int, options: dict[str, Any] | None = None) -> Task:
    """The task object for ``data.task`` with ``data.task_options``; an unknown task or option
    raises ConfigError listing the known ones."""
    import inspect

    _register_task_types()
    if name not in TASKS:
        raise ConfigError(f"data.task = {name!r}: unknown task; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    known = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
    for key in options or {}:
        if key not in known:
            raise ConfigError(f"data.task_options.{key}: the {name} task has no such option; "
                              f"it has {', '.join(known) or 'none'}")
    return cls(tokenizer, max_length, **(options or {}))
