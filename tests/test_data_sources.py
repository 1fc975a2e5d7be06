"""load_source on real local files (csv, tsv, jsonl, parquet), the Hub path offline, and the catalog."""

import json
import time

import datasets
import pandas as pd
import pytest

from fedlora.data import load_source
from fedlora.data.sources import hub_reachable
from fedlora.errors import ConfigError

ROWS = [
    {"sentence": f"review number {i} {'great' if i % 3 else 'awful'}", "sentiment": "pos" if i % 3 else "neg", "id": i}
    for i in range(60)
]


def write(tmp_path, fmt, rows=ROWS, name="reviews"):
    path = tmp_path / f"{name}.{fmt}"
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_local_file_with_column_mapping(tmp_path, fmt):
    path = write(tmp_path, fmt)
    dd = load_source(
        path, columns={"text": "sentence", "label": "sentiment"}, validation_fraction=0.25, seed=1,
        cache_dir=tmp_path / "cache",
    )
    assert set(dd) == {"train", "validation"}
    assert len(dd["train"]) + len(dd["validation"]) == 60
    assert len(dd["validation"]) == 15
    assert "text" in dd["train"].column_names and "sentence" not in dd["train"].column_names
    assert dd["train"].column_names == dd["validation"].column_names
    feature = dd["train"].features["label"]
    assert isinstance(feature, datasets.ClassLabel) and feature.names == ["neg", "pos"]
    # Every example keeps its own label through the rename and the encoding.
    by_id = {r["id"]: r for r in ROWS}
    for split in dd.values():
        for row in split:
            assert feature.int2str(row["label"]) == by_id[row["id"]]["sentiment"]
            assert row["text"] == by_id[row["id"]]["sentence"]


def test_validation_carving_is_seeded_and_disjoint(tmp_path):
    path = write(tmp_path, "jsonl")
    ids = {}
    for seed in (0, 0, 1):
        dd = load_source(path, columns={"label": "sentiment"}, seed=seed, cache_dir=tmp_path / "cache")
        train, val = set(dd["train"]["id"]), set(dd["validation"]["id"])
        assert not train & val and len(train | val) == 60
        ids.setdefault(seed, []).append(val)
    assert ids[0][0] == ids[0][1]
    assert ids[0][0] != ids[1][0]


def test_bad_column_names_it_and_lists_the_available_ones(tmp_path):
    path = write(tmp_path, "csv")
    with pytest.raises(ConfigError, match=r"'sentense'.*did you mean 'sentence'.*available columns: sentence, sentiment, id"):
        load_source(path, columns={"text": "sentense"}, cache_dir=tmp_path / "cache")


def test_test_split_stands_in_for_validation_and_data_files_with_a_format(tmp_path):
    train = write(tmp_path, "csv", ROWS[:40], name="train")
    test = write(tmp_path, "csv", ROWS[40:], name="test")
    dd = load_source("csv", data_files={"train": train, "test": test}, columns={"text": "sentence"},
                     cache_dir=tmp_path / "cache")
    assert len(dd["train"]) == 40
    assert sorted(dd["validation"]["id"]) == list(range(40, 60))
    both = load_source("csv", data_files=[train, test], cache_dir=tmp_path / "cache")
    assert len(both["train"]) + len(both["validation"]) == 60


def test_directory_and_path_sources_and_a_shadowed_column(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    rows = [dict(r, text="stale") for r in ROWS]  # "text" exists but the mapping points elsewhere
    write(folder, "jsonl", rows[:30], name="a")
    write(folder, "jsonl", rows[30:], name="b")
    (folder / "README.md").write_text("not data")
    dd = load_source(folder, columns={"text": "sentence"}, cache_dir=tmp_path / "cache")
    assert len(dd["train"]) + len(dd["validation"]) == 60
    assert "stale" not in set(dd["train"]["text"])


def test_integer_labels_become_a_shared_class_label(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(30)]
    dd = load_source(write(tmp_path, "parquet", rows), cache_dir=tmp_path / "cache")
    assert dd["train"].features["label"].num_classes == 3


def test_missing_file_and_unknown_extension_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(str(tmp_path / "nope.csv"))
    odd = tmp_path / "data.txt"
    odd.write_text("hello\n")
    with pytest.raises(ConfigError, match="no known extension"):
        load_source(str(odd))
    with pytest.raises(ConfigError, match="mix formats"):
        load_source([write(tmp_path, "csv"), write(tmp_path, "jsonl")])
    with pytest.raises(ConfigError, match="validation_fraction"):
        load_source(write(tmp_path, "csv"), validation_fraction=1.5)


def test_hub_name_offline_fails_fast_naming_the_source(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"dataset 'fedlora-test/no-such-dataset:cfg' is not a catalog dataset"):
        load_source("fedlora-test/no-such-dataset:cfg", cache_dir=tmp_path / "cache")
    assert time.monotonic() - start < 10
    # "path/config" is tried as a dataset plus config, then as an owner/name repo id.
    with pytest.raises(ConfigError, match=r"(?s)Tried: glue \(config sst2\): .*; glue/sst2: "):
        load_source("glue/sst2", cache_dir=tmp_path / "cache")


def test_hub_name_offline_suggests_catalog_datasets(tmp_path, monkeypatch):
    pytest.importorskip("fedlora.assets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="Closest catalog datasets: .*sarcasm"):
        load_source("sarcasmm", cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_catalog_source_sarcasm():
    pytest.importorskip("fedlora.assets")
    dd = load_source("sarcasm")
    assert {"train", "validation"} <= set(dd)
    assert len(dd["train"]) > 10_000
    assert isinstance(dd["train"].features["label"], datasets.ClassLabel)
    assert dd["train"].features["label"].num_classes == 2
    assert isinstance(dd["train"][0]["text"], str)


def test_a_bad_row_of_a_validation_file_names_that_file(tmp_path):
    good = write(tmp_path, "csv", name="train")
    rows = [dict(r) for r in ROWS[:10]]
    rows[2]["sentence"] = None
    bad = write(tmp_path, "csv", rows, name="valid")
    with pytest.raises(ConfigError, match=rf"data file '{bad}' row 3: column 'sentence' \(the text\) is empty"):
        load_source("csv", data_files={"train": good, "validation": bad}, columns={"text": "sentence"})


def test_compressed_and_parquet_files_are_checked_too(tmp_path):
    import gzip

    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a", "label": 0}\n{"text": "b", "label": \n'))
    with pytest.raises(ConfigError, match=rf"data file '{path}' line 2: not valid JSON"):
        load_source(str(path))
    empty = write(tmp_path, "parquet", rows=pd.DataFrame({"sentence": [], "sentiment": []}), name="empty")
    with pytest.raises(ConfigError, match=rf"data file '{empty}' has no rows"):
        load_source(empty)


def test_the_run_path_and_the_model_path_share_one_hub_error(tmp_path, monkeypatch):
    """load_source (what a run calls) fails on a switched-off hub with the HubUnavailableError that
    resolve_model raises, naming catalog datasets only, never a model."""
    import huggingface_hub.constants

    from fedlora.hub import HubUnavailableError

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match=r"switched off.*'gsm-symbolic'"):
        load_source("openai/gsm8k", cache_dir=tmp_path / "cache")
    with pytest.raises(HubUnavailableError) as caught:
        load_source("minilm-data", cache_dir=tmp_path / "cache")
    assert "'minilm'" not in str(caught.value)
