"""Inputs that cannot mean what they say: `fedlora run` refuses them with an error naming the key, file,
row or column, and exits 2 before any training (for data files: before the model loads)."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main
from fedlora.config import load_config, to_toml
from sim_tiny import tiny_fixture, tiny_overrides

tiny = tiny_fixture("inputs")


def fedlora_run(capsys, tiny, *overrides: str, config=None) -> str:
    """``fedlora run`` on the tiny model and data with ``overrides`` on top; asserts it fails with
    exit code 2 and no traceback, and returns its error message."""
    root, model, data = tiny
    argv = ["run", "--quiet"] + ([str(config)] if config else [])
    for item in [*tiny_overrides(root / "runs", model, data), *overrides]:
        argv += ["--set", item]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # datasets may log progress before it
    assert last.startswith("fedlora: error: "), last
    return last


# ---- settings that silently override each other ------------------------------------------------


def test_local_epochs_with_an_explicit_local_steps_is_refused(tiny, capsys, tmp_path):
    err = fedlora_run(capsys, tiny, "train.local_epochs=1", "train.local_steps=5")
    assert "train.local_epochs" in err and "train.local_steps" in err
    # the default local_steps does not count as given, but 10 written in a TOML file does
    assert load_config(None, ["train.local_epochs=2"]).train.local_epochs == 2
    path = tmp_path / "steps.toml"
    path.write_text("[train]\nlocal_steps = 10\n")
    err = fedlora_run(capsys, tiny, "train.local_epochs=1", config=path)
    assert "train.local_epochs" in err and "train.local_steps" in err
    # a run directory stores the resolved config; reading it back (resume, report) sees no conflict
    cfg = load_config(None, ["train.local_epochs=2"])
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("method", ["iid", "natural"])
def test_more_clients_per_round_than_clients_is_refused(tiny, capsys, method):
    err = fedlora_run(capsys, tiny, "train.clients_per_round=5", f"partition.method={method}",
                      "partition.column=y")
    assert "train.clients_per_round = 5" in err and "partition.num_clients = 3" in err


def test_natural_partition_needs_a_column(tiny, capsys):
    err = fedlora_run(capsys, tiny, "partition.method=natural")
    assert "partition.method = 'natural'" in err and "partition.column" in err


def test_a_strategy_option_of_the_wrong_type_names_the_option_and_its_type(tiny, capsys):
    err = fedlora_run(capsys, tiny, "strategy.name=fedrot", "strategy.options.lam=abc")
    assert "strategy.options.lam: expected a number, got 'abc'" in err
    err = fedlora_run(capsys, tiny, "strategy.name=fedsa", "strategy.options.rslora=1")
    assert "strategy.options.rslora: expected true or false, got 1" in err


def test_an_unknown_strategy_option_suggests_and_lists_the_options(tiny, capsys):
    err = fedlora_run(capsys, tiny, "strategy.name=fedrot", "strategy.options.lamda=0.2")
    assert "unknown option 'lamda' of strategy 'fedrot'; did you mean lam?" in err
    assert "Its options: lam, align, gauge, guard, weighting, server_optimizer" in err
    # a bad option fails in load_config, before any data or model is touched
    with pytest.raises(Exception, match="unknown option 'lamda'"):
        load_config(None, ["strategy.name=fedrot", "strategy.options.lamda=0.2"])


# ---- local data files ----------------------------------------------------------------------------

ROWS = [("the good film", "pos"), ("the bad film", "neg")] * 10


def write_csv(path, rows=ROWS, header="sentence,y"):
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


def run_on(capsys, tiny, path, *overrides) -> str:
    return fedlora_run(capsys, tiny, f'data.source="{path}"', *overrides)


def test_an_empty_or_header_only_file_names_the_file(tiny, capsys, tmp_path):
    for name, text in [("empty.csv", ""), ("empty.jsonl", ""), ("blank.jsonl", "\n  \n")]:
        (tmp_path / name).write_text(text)
        err = run_on(capsys, tiny, tmp_path / name)
        assert f"data file '{tmp_path / name}' is empty" in err
    err = run_on(capsys, tiny, write_csv(tmp_path / "header.csv", rows=[]))
    assert f"data file '{tmp_path / 'header.csv'}' has a header but no rows" in err


def test_an_undecodable_csv_names_the_file_and_line(tiny, capsys, tmp_path):
    path = write_csv(tmp_path / "latin.csv")
    path.write_bytes(path.read_bytes().replace(b"the bad film", b"caf\xe9 bad film", 1))
    err = run_on(capsys, tiny, path)
    assert f"data file '{path}' line 3" in err and "UTF-8" in err


def test_a_broken_json_line_names_the_file_and_line(tiny, capsys, tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps({"sentence": t, "y": y}) for t, y in ROWS]
    lines[3] = '{"sentence": "the good film", "y": '
    path.write_text("\n".join(lines) + "\n")
    err = run_on(capsys, tiny, path)
    assert f"data file '{path}' line 4" in err


def test_a_row_with_more_fields_than_the_header_names_the_line(tiny, capsys, tmp_path):
    # pandas would take the first row's extra field as an index and shift every column silently
    path = write_csv(tmp_path / "ragged.csv", [("the movie, sadly", "neg"), *ROWS])
    err = run_on(capsys, tiny, path)
    assert f"data file '{path}' line 2: 3 fields but the header has 2" in err


def test_an_empty_text_cell_names_the_row_and_file(tiny, capsys, tmp_path):
    rows = list(ROWS)
    rows[6] = ("", "pos")
    path = write_csv(tmp_path / "notext.csv", rows)
    err = run_on(capsys, tiny, path)
    assert f"data file '{path}' row 7: column 'sentence' (the text) is empty" in err


@pytest.mark.parametrize("fmt, label", [("csv", ""), ("jsonl", None), ("jsonl", " ")])
def test_a_missing_label_names_the_row_and_does_not_become_a_class(tiny, capsys, tmp_path, fmt, label):
    rows = list(ROWS)
    rows[4] = ("the good film", label)
    path = tmp_path / f"nolabel.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    else:
        path.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows))
    err = run_on(capsys, tiny, path)
    assert f"data file '{path}' row 5: column 'y' (the label) is empty" in err


def test_a_single_class_is_refused_naming_the_label_column(tiny, capsys, tmp_path):
    path = write_csv(tmp_path / "oneclass.csv", [(t, "pos") for t, _ in ROWS])
    err = run_on(capsys, tiny, path)
    assert "column 'y' (the label) holds a single class, 'pos'" in err


# ---- model paths ---------------------------------------------------------------------------------


def test_a_model_path_that_does_not_exist_says_so(tiny, capsys, tmp_path):
    for name in ["./no-such-model", str(tmp_path / "gone" / "model"), "~/no-such-fedlora-model"]:
        err = fedlora_run(capsys, tiny, f'model.name="{name}"')
        assert f"model.name = '{name}': no such folder" in err


def test_a_folder_without_a_model_says_so(tiny, capsys, tmp_path):
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "README.md").write_text("not a model\n")
    err = fedlora_run(capsys, tiny, f'model.name="{tmp_path / "empty-model"}"')
    assert f"model.name = '{tmp_path / 'empty-model'}': the folder holds no model (no config.json)" in err


# ---- with the real MiniLM ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from fedlora.assets import AssetError, resolve_model

    try:
        return resolve_model("minilm")
    except AssetError as e:  # no registry and no cache: nothing real to run on
        pytest.skip(f"catalog assets unavailable: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty text", "single class"])
def test_minilm_refuses_bad_rows_before_training(minilm, capsys, tmp_path, case):
    rows = [(t, "pos") for t, _ in ROWS] if case == "single class" else [*ROWS[:9], ("", "neg"), *ROWS[10:]]
    path = write_csv(tmp_path / "reviews.csv", rows)
    argv = ["run", "--quiet"]
    for item in ["model.name=minilm", f'data.source="{path}"', 'data.columns={text = "sentence", label = "y"}',
                 "partition.method=iid", "partition.num_clients=2", "train.rounds=1", "train.local_steps=1",
                 f'run.output_dir="{tmp_path / "runs"}"']:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = "row 10: column 'sentence' (the text) is empty" if case == "empty text" else "holds a single class"
    assert expected in err
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))  # nothing trained


def test_a_fedrot_strength_out_of_range_names_the_option(capsys):
    assert main(["run", "--set", "strategy.name=fedrot", "--set", "strategy.options.lam=2"]) == 2
    assert "strategy.options.lam = 2.0" in capsys.readouterr().err
