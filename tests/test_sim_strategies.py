"""Every registered strategy runs 2 rounds end to end on a tiny random BERT through the engine."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.sim import run
from fedlora.strategies import REGISTRY, strategy_names
from sim_tiny import tiny_fixture, tiny_overrides


tiny = tiny_fixture("strategies", n=120)


@pytest.mark.parametrize("name", strategy_names())
def test_two_rounds(tiny, name):
    root, model, data = tiny
    extra = {"lora__client_ranks": "[2, 4]"} if REGISTRY[name].heterogeneous_ranks else {}
    cfg = load_config(None, tiny_overrides(root / "runs", model, data, run__name=f'"{name}"',
                                           strategy__name=f'"{name}"', data__eval_examples=16, **extra))
    summary = run(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert not r["failed"] and r["diagnostics"]["num_clients"] == 3 and r["bytes_up"] > 0
        assert 0 <= r["eval"]["global"]["accuracy"] <= 1 and "accuracy_weighted" in r["eval"]["personal"]
    tensors = load_file(f"{summary['run_dir']}/adapter/adapter_model.safetensors")
    assert any(".lora_A." in k for k in tensors) and "base_model.model.classifier.weight" in tensors
