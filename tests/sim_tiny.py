"""A tiny random BERT with a real WordLevel tokenizer and a toy labelled dataset, for engine tests.

The label of a toy sentence is whether it holds a positive word, so a model can learn it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["the", "a", "very", "movie", "film", "plot", "actor", "scene", "and", "quite"]
POSITIVE = ["good", "great", "fine"]
NEGATIVE = ["bad", "awful", "poor"]


def make_tiny_model(folder: Path) -> Path:
    """A 2-layer, hidden-64 BertForSequenceClassification and its WordLevel tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + POSITIVE + NEGATIVE)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def make_toy_data(path: Path, n: int = 240, seed: int = 0) -> Path:
    """``n`` toy sentences as JSON lines with columns ``sentence`` and ``y`` (to exercise column mapping)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randint(0, 1)
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if y else NEGATIVE))
            f.write(json.dumps({"sentence": " ".join(words), "y": y}) + "\n")
    return path


def tiny_overrides(root: Path, model: Path, data: Path, **extra: object) -> list[str]:
    """``--set`` overrides for a fast tiny run; ``extra`` adds or replaces keys (dotted with ``__``)."""
    values = {
        "model.name": f'"{model}"', "data.source": f'"{data}"', "data.columns": '{text = "sentence", label = "y"}',
        "data.eval_examples": "40", "partition.num_clients": "3", "partition.method": '"iid"',
        "train.rounds": "2", "train.local_steps": "2", "train.batch_size": "8", "train.lr": "0.01",
        "eval.client_examples": "8", "eval.batch_size": "32", "run.output_dir": f'"{root}"', "run.progress": "false",
    }
    values.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def tiny_fixture(name: str, n: int = 240):
    """A module-scoped pytest fixture giving (root, tiny model folder, toy data file), with the
    tokenisation cache in the temporary folder. Use as ``tiny = tiny_fixture("mytests")``."""
    import pytest

    @pytest.fixture(scope="module")
    def tiny(tmp_path_factory):
        root = tmp_path_factory.mktemp(name)
        mp = pytest.MonkeyPatch()
        mp.setenv("FEDLORA_CACHE", str(root / "cache"))
        yield root, make_tiny_model(root / "tiny-bert"), make_toy_data(root / "toy.jsonl", n=n)
        mp.undo()

    return tiny
