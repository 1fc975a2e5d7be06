"""Causal-LM fine-tuning: prompt → answer, loss on the answer tokens only, greedy-generation eval.

Each example is a prompt and a target answer. With a tokenizer that has a chat template (SmolLM2
has one) the prompt is rendered as a user turn with the assistant header appended, and the target
is the assistant turn that follows, end-of-turn token included, so the model learns to stop.
Without a template the prompt is followed by a newline and the target by the EOS token.

Training: cross-entropy on the target tokens only (prompt and padding carry label -100), averaged
over the batch's target tokens. Batches are dynamically padded on the right. Packing was measured
and is slower here: SmolLM2 on gsm-symbolic with the chat template (8 examples, 132–256 tokens,
fp32, 2 CPU threads) took 66.6 s/step padded (8 × 256 = 2,048 tokens) against 72.7 s/step packed
into one row of 1,576 tokens with per-example positions, on a heavily shared machine: a packed row's
block-diagonal mask is still a dense attention over the whole row, which costs more than the
padding it saves.

Evaluation on held-out examples:

- ``loss``: mean negative log-likelihood per target token; ``perplexity`` = exp(loss);
- ``accuracy``: exact match of greedy generations (at most ``generate_examples`` per call, up to
  ``max_new_tokens`` new tokens each) against the reference answer; numbers are compared after
  GSM8K-style extraction (:mod:`fedlora.tasks.answers`), other answers as normalised text;
- ``samples``: the first few (prompt, generation, reference, correct) for the run summary.

Columns: ``prompt`` (else ``question``) is the prompt; ``solution`` (else ``answer``) the target;
``answer`` the reference the generations are scored against (a GSM8K answer ``... #### 42`` works
as both target and reference). Any of them can be set with the task options.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.tasks.answers import exact_match, extract_number
from fedlora.tasks.base import Encoded, Task, pad_ids, quiet_transformers
from fedlora.tasks.registry import register
from fedlora.tasks.token_cache import cache_key, cached_features

IGNORE = -100


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: the summed log-probability of its labelled tokens, and how many there are.

    ``labels`` is ``input_ids`` with every position not scored set to -100; position t is predicted
    from the tokens before it. Log-probabilities are taken in fp32 (bf16 logits lose the small
    differences between choices).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    target = labels[:, 1:]
    mask = target != IGNORE
    rows, cols = mask.nonzero(as_tuple=True)
    picked = logits[:, :-1][rows, cols].float()  # only the scored positions: [n_scored, vocab]
    logp = torch.log_softmax(picked, dim=-1).gather(-1, target[rows, cols].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logp.device).index_add(0, rows, logp)
    return sums, mask.sum(dim=1)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (decoders often have no pad token), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def fit_lengths(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncate a (prompt, target) pair to ``max_length`` tokens in all: the prompt loses its start
    (down to half the budget), then the target its end. Both keep at least one token."""
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    keep_prompt = max(1, min(len(prompt), max(max_length - len(target), max_length // 2)))
    prompt = prompt[-keep_prompt:]
    return prompt, target[: max(1, max_length - len(prompt))]


@register
class CausalLMTask(Task):
    """Prompt → answer fine-tuning of a decoder (``AutoModelForCausalLM``); see the module docstring.

    Options (``data.task_options``): ``prompt_column``, ``target_column``, ``answer_column``;
    ``chat_template`` (default: use the tokenizer's when it has one); ``max_new_tokens`` (default
    128); ``generate_examples`` (generations per evaluation, default 32; 0 = none); ``samples``
    (generations kept for the summary, default 3); ``answer_format``: ``"auto"`` (numbers when the
    reference holds one), ``"number"`` or ``"text"``.
    """

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    metrics = ("accuracy", "loss", "perplexity")

    def __init__(self, tokenizer, max_length: int, *, prompt_column: str = "", target_column: str = "",
                 answer_column: str = "answer", chat_template: bool | None = None, max_new_tokens: int = 128,
                 generate_examples: int = 32, samples: int = 3, answer_format: str = "auto"):
        super().__init__(tokenizer, max_length)
        if answer_format not in ("auto", "number", "text"):
            raise ConfigError(f"data.task_options.answer_format = {answer_format!r}: must be 'auto', 'number' or "
                              "'text'")
        for key, value in (("max_new_tokens", max_new_tokens), ("generate_examples", generate_examples),
                           ("samples", samples)):
            if value < 0:
                raise ConfigError(f"data.task_options.{key} = {value}: must be ≥ 0")
        self.prompt_column, self.target_column, self.answer_column = prompt_column, target_column, answer_column
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ConfigError("data.task_options.chat_template = true, but the tokenizer has no chat template")
        self.use_chat_template = has_template if chat_template is None else bool(chat_template)
        self.max_new_tokens, self.generate_examples, self.samples = max_new_tokens, generate_examples, samples
        self.answer_format = answer_format

    # ---- columns ------------------------------------------------------------------------------------
    def _columns(self, split) -> tuple[str, str, str]:
        cols = split.column_names
        prompt = self.prompt_column or ("prompt" if "prompt" in cols else "question")
        target = self.target_column or ("solution" if "solution" in cols else "answer")
        return prompt, target, self.answer_column or target

    def check_columns(self, split) -> None:
        missing = [c for c in dict.fromkeys(self._columns(split)) if c not in split.column_names]
        if missing:
            raise ConfigError(f"data: the causal_lm task needs columns {missing} (set data.task_options."
                              f"prompt_column / target_column / answer_column, or map them with data.columns); "
                              f"the dataset has {split.column_names}")

    def partition_values(self, split) -> np.ndarray:
        # no labels: every example is one class (use partition.column, e.g. "template", for skew)
        return np.zeros(len(split), dtype=np.int64)

    # ---- model and tokens ---------------------------------------------------------------------------
    def load_model(self, path: str, dtype: torch.dtype, train_split):
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id(self.tokenizer)
        return model

    def render(self, prompt: str, target: str) -> tuple[str, str]:
        """The prompt text (what generation starts from) and the target text that follows it."""
        tok = self.tokenizer
        if not self.use_chat_template:
            return prompt + "\n", target
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": target}], tokenize=False)
        if not full.startswith(head):
            raise ConfigError("the tokenizer's chat template renders the assistant turn differently from its "
                              "generation prompt; set data.task_options.chat_template = false")
        return head, full[len(head):].rstrip()

    def _tokenize(self, prompts: list[str], targets: list[str]) -> dict[str, list[list[int]]]:
        tok = self.tokenizer
        heads, tails = zip(*(self.render(p, t) for p, t in zip(prompts, targets))) if prompts else ((), ())
        # without a template the tokenizer adds its own BOS to the prompt; the template writes its own markers
        p_ids = tok(list(heads), add_special_tokens=not self.use_chat_template)["input_ids"]
        t_ids = tok(list(tails), add_special_tokens=False)["input_ids"]
        eos = [] if self.use_chat_template or tok.eos_token_id is None else [int(tok.eos_token_id)]
        out: dict[str, list[list[int]]] = {"prompt_ids": [], "target_ids": []}
        for p, t in zip(p_ids, t_ids):
            p, t = fit_lengths(list(map(int, p)), list(map(int, t)) + eos, self.max_length)
            out["prompt_ids"].append(p)
            out["target_ids"].append(t)
        return out

    def encode(self, split) -> Encoded:
        prompt_col, target_col, answer_col = self._columns(split)
        prompts, targets = [str(x) for x in split[prompt_col]], [str(x) for x in split[target_col]]
        key = cache_key(self.tokenizer, self.max_length, self.name, [str(self.use_chat_template)], prompts + targets)
        features, meta = cached_features(self.name, key, lambda: self._tokenize(prompts, targets))
        meta.update(prompts=prompts, references=[str(x) for x in split[answer_col]])
        return Encoded(features, np.zeros(len(prompts), dtype=np.int64), meta)

    def collate(self, data: Encoded, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        seqs, labels = [], []
        for i in indices:
            p, t = data.features["prompt_ids"][i], data.features["target_ids"][i]
            seqs.append(p + t)
            labels.append([IGNORE] * len(p) + t)
        batch = {"input_ids": pad_ids(seqs, pad_token_id(self.tokenizer)),
                 "attention_mask": pad_ids([[1] * len(s) for s in seqs], 0),
                 "labels": pad_ids(labels, IGNORE)}
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return -sums.sum() / counts.sum().clamp(min=1)

    # ---- evaluation ---------------------------------------------------------------------------------
    def generate(self, model, data: Encoded, indices: Sequence[int], batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> list[str]:
        """Greedy continuations of the prompts of ``indices`` (left-padded batches), decoded without
        special tokens."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        pad = pad_token_id(tok)
        eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
        base_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set([base_eos] if isinstance(base_eos, int) else base_eos or [])
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                               eos_token_id=sorted(eos) or None)
        out: list[str] = []
        for start in range(0, len(indices), batch_size):
            prompts = [data.features["prompt_ids"][i] for i in indices[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with autocast or contextlib.nullcontext(), quiet_transformers():
                generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            out += tok.batch_decode(generated[:, width:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def evaluate(self, model, data: Encoded, indices: Sequence[int], batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        idx = list(indices)
        nll, tokens = 0.0, 0
        by_length = sorted(idx, key=lambda i: len(data.features["prompt_ids"][i]) + len(data.features["target_ids"][i]))
        for start in range(0, len(by_length), batch_size):
            batch = self.collate(data, by_length[start:start + batch_size], device)
            with autocast or contextlib.nullcontext():
                sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            nll -= float(sums.sum())
            tokens += int(counts.sum())
        chosen = idx[: self.generate_examples]
        texts = self.generate(model, data, chosen, batch_size, device, autocast) if chosen else []
        refs = [data.meta["references"][i] for i in chosen]
        numeric = {"auto": None, "number": True, "text": False}[self.answer_format]
        correct = [exact_match(t, r, numeric) for t, r in zip(texts, refs)]
        model.train(was_training)
        loss = nll / tokens if tokens else float("nan")
        samples = [{"prompt": data.meta["prompts"][i], "generated": t, "reference": r,
                    "extracted": extract_number(t), "correct": c}
                   for i, t, r, c in list(zip(chosen, texts, refs, correct))[: self.samples]]
        return {"accuracy": (sum(correct) / len(correct)) if correct else float("nan"), "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)) if tokens else float("nan"), "examples": len(idx),
                "generated": len(correct), "samples": samples}
