"""Run configuration: TOML, --set overrides, type errors naming the key, round trips."""

from pathlib import Path

import pytest

from fedlora.config import RunConfig, apply_overrides, from_dict, load_config, parse_value, to_toml
from fedlora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_the_quickstart_federation():
    cfg = load_config()
    assert (cfg.model.name, cfg.data.source, cfg.partition.method) == ("minilm", "sarcasm", "dirichlet")
    assert (cfg.partition.num_clients, cfg.partition.alpha, cfg.lora.r) == (10, 0.5, 4)


def test_quickstart_preset_matches_the_issue():
    cfg = load_config(ROOT / "configs" / "quickstart.toml")
    assert cfg.model.name == "minilm" and cfg.data.source == "sarcasm"
    assert cfg.partition.num_clients == 10 and cfg.partition.method == "dirichlet" and cfg.partition.alpha == 0.5
    assert cfg.lora.r == 4 and cfg.strategy.name == "fedit"


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 0.01\nrounds = 3\n[strategy]\nname = "fedrot"\n[strategy.options]\nlam = 0.2\n')
    cfg = load_config(path, ["train.rounds=7", "lora.client_ranks=[2, 4]", "strategy.options.align=\"A\"",
                             "model.name=some/hub-id", "data.columns={text = \"headline\"}"])
    assert cfg.train.lr == 0.01 and cfg.train.rounds == 7
    assert cfg.strategy.name == "fedrot" and cfg.strategy.options == {"lam": 0.2, "align": "A"}
    assert cfg.lora.client_ranks == [2, 4]
    assert cfg.model.name == "some/hub-id"  # not a TOML literal: taken as a bare string
    assert cfg.data.columns == {"text": "headline"}


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.rounds: expected an integer, got 2\.5"):
        load_config(None, ["train.rounds=2.5"])


@pytest.mark.parametrize("override, key", [
    ("train.lr=abc", r"train\.lr: expected a number, got 'abc'"),
    ("train.fail_fast=1", r"train\.fail_fast: expected true or false"),
    ("lora.client_ranks=[2, \"x\"]", r"lora\.client_ranks\[1\]: expected an integer"),
    ("lora.target_modules=query", r"lora\.target_modules: expected a list of strings"),
])
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_unknown_keys_and_sections_suggest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean train\.lr"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'; did you mean train"):
        load_config(None, ["trian.lr=0.1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_range_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr = -1\.0: must be positive"):
        load_config(None, ["train.lr=-1.0"])
    with pytest.raises(ConfigError, match=r"train\.client_fraction"):
        load_config(None, ["train.client_fraction=1.5"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_to_toml_round_trips(tmp_path):
    cfg = load_config(None, ["strategy.name=fedrot", "strategy.options.lam=0.3", "lora.target_modules=[\"q\", \"v\"]",
                             "data.columns={\"text pair\" = \"b\"}", "run.name=\"with \\\"quotes\\\"\""])
    path = tmp_path / "r.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_parse_value_and_nested_overrides():
    assert parse_value("2e-3") == 0.002 and parse_value("true") is True and parse_value("[1,2]") == [1, 2]
    assert parse_value("fedrot") == "fedrot"
    data = apply_overrides({}, ["strategy.options.server_optimizer.lr=0.01"])
    assert from_dict(data).strategy.options["server_optimizer"] == {"lr": 0.01}
    assert load_config(None, ["run.name=nan", "run.output_dir=1e3"]).run.name == "nan"  # strings stay strings
    assert from_dict({}) == RunConfig()
