"""Sequence classification: single texts or text pairs, one label each, with a classification head.

Columns ``text``, optional ``text_pair``, and ``label`` (a ClassLabel, or ints). The model is
``AutoModelForSequenceClassification`` sized from the training split's number of labels; a decoder
(llama, gpt2) gets the tokenizer's pad (else EOS) id so it can find each sequence's last token.
Loss: cross-entropy; metrics: accuracy and loss (:class:`~fedlora.tasks.base.ScoredTask`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.tasks.base import Encoded, ScoredTask, pad_ids, quiet_transformers
from fedlora.tasks.registry import register
from fedlora.tasks.token_cache import cached_features


@register
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
        key = self._cache_key(texts, pairs, labels)
        features, meta = cached_features(self.name, key, lambda: self._tokenize(texts, pairs))
        return Encoded(features, labels, meta)

    def _cache_key(self, texts: list, pairs: list | None, labels: np.ndarray) -> str:
        # this task's own key (its labels are hashed too), unchanged so that existing caches stay valid
        tok = self.tokenizer
        h = hashlib.sha256()
        for part in (type(tok).__name__, str(getattr(tok, "name_or_path", "")), str(len(tok)), str(self.max_length),
                     self.name):
            h.update(part.encode() + b"\0")
        for t in texts + (pairs or []):
            h.update(str(t).encode() + b"\0")
        h.update(labels.tobytes())
        return h.hexdigest()[:32]

    def _tokenize(self, texts: list, pairs: list | None) -> dict[str, list[list[int]]]:
        tok = self.tokenizer
        if tok.pad_token_id is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, pairs, truncation=True, max_length=self.max_length)
        return {k: [list(map(int, ids)) for ids in enc[k]] for k in ("input_ids", "token_type_ids") if k in enc}

    def collate(self, data: Encoded, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        ids = [data.features["input_ids"][i] for i in indices]
        batch = {"input_ids": pad_ids(ids, pad)}
        batch["attention_mask"] = pad_ids([[1] * len(s) for s in ids], 0)
        if "token_type_ids" in data.features:
            batch["token_type_ids"] = pad_ids([data.features["token_type_ids"][i] for i in indices], 0)
        batch["labels"] = torch.as_tensor(data.labels[np.asarray(indices)], dtype=torch.long)
        return {k: v.to(device) for k, v in batch.items()}

    def scores(self, model, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()

    def eval_order(self, data: Encoded, indices: Sequence[int]) -> list[int]:
        # sort by length so each batch pads little
        return sorted(indices, key=lambda i: len(data.features["input_ids"][i]))
