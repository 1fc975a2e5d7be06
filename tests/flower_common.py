"""Shared pieces of the Flower tests: the tiny federation, configs, the engine's result, adapter checks."""

from __future__ import annotations

import pytest
import torch

from fedlora.config import load_config
from fedlora.factors import Adapter
from fedlora.sim import run
from fedlora.runtime.rundir import RunDir
from sim_tiny import make_tiny_model, make_toy_data, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, tiny BERT folder, toy data file), with the token cache under root."""
    root = tmp_path_factory.mktemp("flower")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLORA_CACHE", str(root / "cache"))
    yield root, make_tiny_model(root / "tiny-bert"), make_toy_data(root / "toy.jsonl")
    mp.undo()


def cfg_for(tiny, name, **extra):
    """A tiny 3-client, 2-round config on CPU, by default without personalised evaluation; ``extra`` as
    tiny_overrides (and may replace those defaults)."""
    root, model, data = tiny
    return load_config(None, tiny_overrides(root / "runs", model, data, **{
        "run__name": f'"{name}"', "eval__personalised": "false", "model__device": '"cpu"', **extra}))


def engine_run(cfg, loss_fn=None):
    """The embedded engine's final GlobalState and metrics rows, with PEFT's init seeded as the
    Flower server seeds it."""
    torch.manual_seed(cfg.run.seed)
    summary = run(cfg, loss_fn=loss_fn, progress=False, log=lambda s: None)
    d = RunDir.open(summary["run_dir"])
    return d.load_checkpoint()["state"], d.read_metrics()


def assert_close_adapters(got: Adapter, want: Adapter):
    """Same keys, every tensor equal to float32 tolerance."""
    g, w = got.tensors(), want.tensors()
    assert g.keys() == w.keys()
    for k in w:
        torch.testing.assert_close(g[k], w[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
