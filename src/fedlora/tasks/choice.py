"""Multiple choice: pick the right one of a question's choices, with an encoder head or a decoder's
likelihoods.

Schema: ``question`` (str), ``choices`` (list of str), ``label`` (index of the right choice), as
the catalog's ``quartz``. HellaSwag's own columns are read too (``ctx_a``/``ctx_b`` or ``ctx``,
``endings``, ``label``): the context is ``ctx_a + " " + ctx_b`` with ``" [title]"`` replaced by
``". "`` and whitespace normalised, as the Subspace-Reg code does (methods-reference §3.4); the
endings are cleaned the same way.

Two ways to score the choices (``scoring``; ``"auto"`` picks by the architecture):

- ``"head"`` (encoders, ``AutoModelForMultipleChoice``): each (question, choice) pair is encoded,
  the head gives one logit per choice; loss = cross-entropy over the choices. PEFT's ``SEQ_CLS``
  task type makes the head (``classifier``) a ``modules_to_save`` extra, so it is trained and
  federated with the LoRA factors.
- ``"loglik"`` (decoders, ``AutoModelForCausalLM``): a choice's score is the mean log-probability
  of its tokens (``" " + choice``) given the question (length-normalised, as Subspace-Reg). The
  training loss (``loss``) is cross-entropy over the choice scores (``"choice_ce"``, Subspace-Reg's)
  or plain LM loss on the right choice's tokens (``"lm"``).

Prediction: the highest-scoring choice; metrics: accuracy and the cross-entropy over the choices.
Questions may have different numbers of choices; missing ones are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.tasks.base import Encoded, ScoredTask, pad_ids, quiet_transformers
from fedlora.tasks.causal import IGNORE, fit_lengths, pad_token_id, sequence_logprobs
from fedlora.tasks.registry import register
from fedlora.tasks.token_cache import cache_key, cached_features

SCORINGS = ("auto", "head", "loglik")
LOSSES = ("choice_ce", "lm")


def clean_hellaswag(text: str) -> str:
    """Subspace-Reg's HellaSwag text cleaning: ``" [title]"`` → ``". "``, whitespace normalised."""
    return " ".join(text.replace(" [title]", ". ").split())


def _label_ints(split) -> list[int]:
    """Gold indices as ints, whatever the label column's type: ints, digit strings (HellaSwag's
    "0".."3"), letters ("A", "B", ...), or a ClassLabel over any of these (mapped through its names)."""
    names = getattr(split.features["label"], "names", None)
    out = []
    for v in split["label"]:
        if names is not None and isinstance(v, int) and 0 <= v < len(names):
            v = names[v]
        if isinstance(v, str) and len(v) == 1 and "A" <= v <= "Z":
            v = ord(v) - ord("A")
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise ConfigError(f"data: multiple_choice label {v!r} is not a choice index") from None
    return out


def choice_fields(split) -> tuple[list[str], list[list[str]], list[int]]:
    """(questions, choices, gold indices) from the standard or the HellaSwag schema."""
    cols = split.column_names
    if "question" in cols and "choices" in cols:
        questions = [str(q) for q in split["question"]]
        choices = [[str(c) for c in cs] for cs in split["choices"]]
    else:
        if "ctx_a" in cols:
            ctx = [f"{a} {b}" for a, b in zip(split["ctx_a"], split["ctx_b"])]
        else:
            ctx = list(split["ctx"])
        questions = [clean_hellaswag(c) for c in ctx]
        choices = [[clean_hellaswag(e) for e in es] for es in split["endings"]]
    labels = _label_ints(split)
    for i, (cs, y) in enumerate(zip(choices, labels)):
        if not cs:
            raise ConfigError(f"data: multiple_choice example {i} has no choices")
        if not 0 <= y < len(cs):
            raise ConfigError(f"data: multiple_choice example {i} has label {y} but {len(cs)} choices")
    return questions, choices, labels


def model_kind(path: str) -> str:
    """``"head"`` when the architecture has a multiple-choice head in transformers, else ``"loglik"``
    when it is a causal LM; anything else raises ConfigError."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES:
        return "head"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "loglik"
    raise ConfigError(f"model type {model_type!r} has neither a multiple-choice head nor a causal-LM head in "
                      "transformers; the multiple_choice task cannot score with it")


@register
class MultipleChoiceTask(ScoredTask):
    """Multiple choice by encoder head or decoder log-likelihood; see the module docstring.

    Options (``data.task_options``): ``scoring`` (``"auto"``, ``"head"``, ``"loglik"``) and, for
    log-likelihood scoring, ``loss`` (``"choice_ce"`` or ``"lm"``).
    """

    name = "multiple_choice"
    peft_task_type = "SEQ_CLS"  # becomes CAUSAL_LM for log-likelihood scoring (see ``kind``)

    def __init__(self, tokenizer, max_length: int, *, scoring: str = "auto", loss: str = "choice_ce"):
        super().__init__(tokenizer, max_length)
        if scoring not in SCORINGS:
            raise ConfigError(f"data.task_options.scoring = {scoring!r}: must be one of {', '.join(SCORINGS)}")
        if loss not in LOSSES:
            raise ConfigError(f"data.task_options.loss = {loss!r}: must be one of {', '.join(LOSSES)}")
        self.scoring, self.loss_type = scoring, loss
        self._kind: str | None = None

    @property
    def kind(self) -> str:
        """``"head"`` or ``"loglik"``: the configured scoring, else the model's (from its config)."""
        if self._kind is None:
            self._kind = self.scoring if self.scoring != "auto" else model_kind(self.tokenizer.name_or_path)
            if self._kind == "loglik":
                self.peft_task_type = "CAUSAL_LM"
        return self._kind

    def check_columns(self, split) -> None:
        cols = split.column_names
        if not ({"question", "choices", "label"} <= set(cols) or
                ({"endings", "label"} <= set(cols) and ({"ctx_a", "ctx_b"} <= set(cols) or "ctx" in cols))):
            raise ConfigError("data: the multiple_choice task needs columns question, choices, label (or HellaSwag's "
                              f"ctx_a, ctx_b, endings, label); the dataset has {cols}")

    def partition_values(self, split) -> np.ndarray:
        return np.asarray(_label_ints(split))

    def load_model(self, path: str, dtype: torch.dtype, train_split):
        from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice

        with quiet_transformers():
            if self.kind == "head":
                # the one-logit choice head is new; a checkpoint's classification head (other shape) is dropped
                model = AutoModelForMultipleChoice.from_pretrained(path, dtype=dtype, ignore_mismatched_sizes=True)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id(self.tokenizer)
        return model

    # ---- tokens -------------------------------------------------------------------------------------
    def _tokenize_pairs(self, questions: list[str], choices: list[list[str]]) -> dict[str, Any]:
        flat_q = [q for q, cs in zip(questions, choices) for _ in cs]
        flat_c = [c for cs in choices for c in cs]
        enc = self.tokenizer(flat_q, flat_c, truncation=True, max_length=self.max_length)
        out: dict[str, Any] = {}
        for key in ("input_ids", "token_type_ids"):
            if key not in enc:
                continue
            rows, pos = [], 0
            for cs in choices:
                rows.append([list(map(int, ids)) for ids in enc[key][pos:pos + len(cs)]])
                pos += len(cs)
            out[key] = rows
        return out

    def _tokenize_continuations(self, questions: list[str], choices: list[list[str]]) -> dict[str, Any]:
        tok = self.tokenizer
        prompts = tok(questions)["input_ids"]
        flat = tok([" " + c for cs in choices for c in cs], add_special_tokens=False)["input_ids"]
        out: dict[str, Any] = {"prompt_ids": [], "choice_ids": []}
        pos = 0
        for p, cs in zip(prompts, choices):
            row = []
            for ids in flat[pos:pos + len(cs)]:
                row.append(list(map(int, ids)) or [pad_token_id(tok)])  # an empty choice still scores a token
            pos += len(cs)
            longest = max(len(c) for c in row)
            p, _ = fit_lengths(list(map(int, p)), [0] * longest, self.max_length)
            out["prompt_ids"].append(p)
            out["choice_ids"].append([c[: self.max_length - len(p)] for c in row])
        return out

    def encode(self, split) -> Encoded:
        questions, choices, labels = choice_fields(split)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        texts = [x for q, cs in zip(questions, choices) for x in (q, len(cs), *cs)]
        key = cache_key(self.tokenizer, self.max_length, self.name, [self.kind], texts)
        build = self._tokenize_pairs if self.kind == "head" else self._tokenize_continuations
        features, meta = cached_features(self.name, key, lambda: build(questions, choices))
        return Encoded(features, np.asarray(labels, dtype=np.int64), meta)

    # ---- batches ------------------------------------------------------------------------------------
    def collate(self, data: Encoded, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        idx = list(indices)
        counts = [len(data.features["input_ids" if self.kind == "head" else "choice_ids"][i]) for i in idx]
        width = max(counts)
        batch = {"choice_mask": torch.tensor([[j < n for j in range(width)] for n in counts]),
                 "labels": torch.as_tensor(data.labels[np.asarray(idx)], dtype=torch.long)}
        if self.kind == "head":
            pad = self.tokenizer.pad_token_id or 0
            for key, fill in (("input_ids", pad), ("token_type_ids", 0)):
                if key not in data.features:
                    continue
                # a missing choice is a copy of the first one (its logit is masked out)
                seqs = [data.features[key][i][j if j < n else 0] for i, n in zip(idx, counts) for j in range(width)]
                batch[key] = pad_ids(seqs, fill).view(len(idx), width, -1)
            lengths = [len(data.features["input_ids"][i][j if j < n else 0]) for i, n in zip(idx, counts)
                       for j in range(width)]
            batch["attention_mask"] = pad_ids([[1] * n for n in lengths], 0).view(len(idx), width, -1)
        else:
            seqs, labels = [], []
            for i, n in zip(idx, counts):
                p = data.features["prompt_ids"][i]
                for j in range(width):
                    c = data.features["choice_ids"][i][j if j < n else 0]
                    seqs.append(p + c)
                    labels.append([IGNORE] * len(p) + c)
            batch["input_ids"] = pad_ids(seqs, pad_token_id(self.tokenizer))
            batch["attention_mask"] = pad_ids([[1] * len(s) for s in seqs], 0)
            batch["token_labels"] = pad_ids(labels, IGNORE)
        return {k: v.to(device) for k, v in batch.items()}

    def scores(self, model, batch: dict[str, Tensor]) -> Tensor:
        """[batch, choices] scores (head logits or mean log-probabilities); missing choices are -inf."""
        mask = batch["choice_mask"]
        if self.kind == "head":
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            raw = model(**inputs).logits.float()
        else:
            sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["token_labels"])
            raw = (sums / counts.clamp(min=1)).view(mask.shape)
        return raw.masked_fill(~mask, float("-inf"))

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        if self.kind == "loglik" and self.loss_type == "lm":
            # LM loss on the right choice only: forward just those sequences
            width = batch["choice_mask"].shape[1]
            gold = torch.arange(len(batch["labels"]), device=batch["labels"].device) * width + batch["labels"]
            sums, counts = sequence_logprobs(model, batch["input_ids"][gold], batch["attention_mask"][gold],
                                             batch["token_labels"][gold])
            return -sums.sum() / counts.sum().clamp(min=1)
        return torch.nn.functional.cross_entropy(self.scores(model, batch), batch["labels"])
