"""Fuzzing the config readers: whatever TOML file, ``--set`` text or nested table comes in, the result
is a valid RunConfig or a ConfigError, never another exception; and a config that is accepted writes
a TOML that reads back to an equal config (what a run directory stores, and resume reads)."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.config import SECTIONS, RunConfig, from_dict, load_config, to_toml
from fedlora.errors import ConfigError

KNOWN_KEYS = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(RunConfig(), s))]
EXTRA_KEYS = ["strategy.options.lam", "strategy.options.lamda", "strategy.options.clip", "strategy.options.n",
              "strategy.options.server_optimizer", "strategy.options.server_optimizer.lr", "data.columns.text",
              "data.task_options.scoring", "train", "strategy", "nosuch.key", "train.rounds.deeper", "run..name"]
NAMES = st.sampled_from(["fedit", "fedrot", "fedsa", "sfed", "svd", "natural", "iid", "dirichlet", "minilm",
                         "classification", "fp32", "cpu", "sgd", "cosine", "x"])

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=40),
    st.integers(),  # huge ones too
    st.sampled_from([2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
    NAMES,
    st.text(max_size=8),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5) | NAMES, inner, max_size=3)),
                      max_leaves=6)
keys = st.sampled_from(KNOWN_KEYS + EXTRA_KEYS)


def toml_literal(v) -> str:
    """``v`` as TOML text (TOML spells inf and nan bare; tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_literal(str(k))} = {toml_literal(x)}" for k, x in v.items()) + "}"


def accepted_or_config_error(make) -> RunConfig | None:
    """``make()``; a ConfigError is an accepted answer, any other exception fails the test."""
    try:
        cfg = make()
    except ConfigError:
        return None
    assert isinstance(cfg, RunConfig)
    return cfg


def check_accepted(cfg: RunConfig | None, tmp_path) -> None:
    if cfg is None:
        return
    cfg.validate()
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            assert not (isinstance(v, float) and not math.isfinite(v)), (section, f.name, v)
            assert not (isinstance(v, int) and abs(v) >= 2**63), (section, f.name, v)
    path = tmp_path / "stored.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(st.one_of(st.tuples(keys, st.one_of(values.map(toml_literal), st.text(max_size=10)))
                          .map(lambda kv: f"{kv[0]}={kv[1]}"),
                          st.text(max_size=20)),  # and any text at all
                max_size=4))
def test_set_overrides(tmp_path, overrides):
    check_accepted(accepted_or_config_error(lambda: load_config(None, overrides)), tmp_path)


@FUZZ
@given(st.dictionaries(keys, values, max_size=5), st.binary(max_size=6))
def test_toml_files(tmp_path, table, tail):
    sections: dict[str, dict] = {}
    for key, v in table.items():
        section, _, rest = key.partition(".")
        sections.setdefault(section, {})[rest or "x"] = v
    text = "".join(f"[{s}]\n" + "".join(f'"{k}" = {toml_literal(v)}\n' for k, v in kv.items())
                   for s, kv in sections.items())
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode() + (tail if tail.startswith(b"#") else b""))
    check_accepted(accepted_or_config_error(lambda: load_config(path)), tmp_path)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=5), st.integers()),
                       st.one_of(st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS).map(lambda k: k.split(".")[1]),
                                                           st.integers()), values, max_size=4), values),
                       max_size=4))
def test_from_dict(tmp_path, data):
    check_accepted(accepted_or_config_error(lambda: from_dict(data).validate()), tmp_path)


def test_what_the_fuzzing_found():
    """Inputs that escaped as TypeError, OverflowError or ValueError, or were accepted and failed later."""
    bad = [
        ["train.rounds=99999999999999999999999"],  # OverflowError in numpy/torch later
        ["run.seed=-1"],  # numpy refuses negative seeds mid-run
        ["train.lr=inf"], ["lora.alpha=1e400"],  # inf: every loss NaN
        ["partition.alpha=nan"], ["eval.client_examples=-1"], ["train.warmup_steps=-1"],
        ["strategy.options.x.y=3"],  # an unknown option, found only when the run starts
    ]
    for overrides in bad:
        assert accepted_or_config_error(lambda: load_config(None, overrides)) is None, overrides
    assert accepted_or_config_error(lambda: from_dict({3: {}})) is None


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'[run]\nname = "caf\xe9"\n')
    try:
        load_config(path)
    except ConfigError as e:
        assert "latin.toml" in str(e) and "UTF-8" in str(e)
    else:
        raise AssertionError("a latin-1 config file was accepted")
