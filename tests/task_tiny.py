"""Tiny models and toy data for the multiple-choice and causal-LM task tests.

- a 2-layer, hidden-32 random ``LlamaForCausalLM`` with a real WordLevel tokenizer that has a
  ChatML-style chat template (as SmolLM2's), saved to a folder;
- toy arithmetic problems (question, prompt, answer, solution ending in ``#### n``, template), the
  gsm-symbolic schema;
- toy two-choice questions (question, choices, label), the quartz schema: the right choice is the
  positive word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sim_tiny import NEGATIVE, POSITIVE, WORDS

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MATH_WORDS = ["what", "is", "plus", "minus", "so", "the", "answer", "give", "result", "user", "assistant",
              "system", "?", ".", "####", "which", "word", "good", "one"]


def make_tiny_llama(folder: Path, chat_template: bool = True) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (vocab ≈ 340) and its tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = list(dict.fromkeys(MATH_WORDS + WORDS + POSITIVE + NEGATIVE))
    vocab = {w: i for i, w in enumerate(specials + words + [str(n) for n in range(-100, 200)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>" if chat_template else "</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=2, eos_token_id=fast.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def make_toy_math(path: Path, n: int = 120, seed: int = 0) -> Path:
    """``n`` toy sums in the gsm-symbolic schema (``template`` is 0 for plus, 1 for minus), as JSON lines."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 1)
            value = a + b if op == 0 else a - b
            word = "plus" if op == 0 else "minus"
            question = "so " * rng.randint(0, 3) + f"what is {a} {word} {b} ?"  # prompts of several lengths
            f.write(json.dumps({"question": question, "prompt": f"{question} give the result .", "answer": str(value),
                                "solution": f"{a} {word} {b} is {value} . #### {value}", "template": op}) + "\n")
    return path


def make_toy_choice(path: Path, n: int = 120, seed: int = 0) -> Path:
    """``n`` toy questions in the quartz schema: which choice is the positive word."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
            choices = [good, bad] if label == 0 else [bad, good]
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"question": "which word is good ? " + " ".join(words), "choices": choices,
                                "label": label}) + "\n")
    return path
