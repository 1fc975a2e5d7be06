"""The task types on the catalog's real models and data (slow: they load SmolLM2 and MiniLM)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_smollm2_learns_gsm_symbolic_answers(cache):
    """A few LoRA steps of SmolLM2-135M on four gsm-symbolic problems lower their answer loss, and
    greedy generation with the chat template gives text that the GSM8K scorer reads."""
    from transformers import AutoTokenizer

    from fedlora import assets
    from fedlora.config import TrainSection
    from fedlora.runtime.training import local_train
    from fedlora.runtime.model import SharedModel, autocast_for
    from fedlora.tasks.causal import CausalLMTask

    path = str(assets.model_path("smollm2-135m"))
    task = CausalLMTask(AutoTokenizer.from_pretrained(path), 96, max_new_tokens=12, generate_examples=2)
    split = assets.load_dataset("gsm-symbolic")["train"].select(range(4))
    data = task.encode(split)
    assert task.use_chat_template  # SmolLM2 has one
    torch.manual_seed(0)
    shared = SharedModel(task.load_model(path, torch.float32, split), task_type="CAUSAL_LM", rank=8, alpha=16,
                         dropout=0.0, target_modules=["q_proj", "v_proj"])
    idx = np.arange(4)
    autocast = autocast_for("bf16", CPU)
    before = task.evaluate(shared.model, data, idx, 4, CPU, autocast)
    result = local_train(shared, task, data, idx, cfg=TrainSection(batch_size=4, lr=3e-3, grad_clip=1.0), lr=3e-3,
                         steps=3, parts=frozenset({"A", "B"}), train_extras=True, regularizer=lambda live: None,
                         seed=0, device=CPU, autocast=autocast)
    after = task.evaluate(shared.model, data, idx, 4, CPU, autocast)
    assert result.steps == 3 and math.isfinite(result.loss)
    assert after["loss"] < before["loss"] - 0.05, (before["loss"], after["loss"])
    assert after["generated"] == 2 and all(isinstance(s["generated"], str) for s in after["samples"])


def test_minilm_runs_quartz_through_the_engine(cache):
    """MiniLM with a multiple-choice head on the catalog's quartz, two clients, one short round."""
    from safetensors.torch import load_file

    from fedlora.config import load_config
    from fedlora.sim import run

    cfg = load_config(None, [
        'model.name="minilm"', 'data.source="quartz"', 'data.task="multiple_choice"', "data.max_length=64",
        "data.eval_examples=64", "partition.num_clients=2", 'partition.method="iid"', "train.rounds=1",
        "train.local_steps=4", "train.batch_size=8", "train.lr=1e-3", "eval.client_examples=16",
        f'run.output_dir="{cache / "runs"}"', "run.progress=false"])
    summary = run(cfg, log=lambda s: None)
    row = json.loads(open(f"{summary['run_dir']}/metrics.jsonl").readline())
    g = row["eval"]["global"]
    assert g["examples"] == 64 and 0 <= g["accuracy"] <= 1 and math.isfinite(g["loss"])
    keys = load_file(f"{summary['run_dir']}/adapter/adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys  # the choice head is federated with the factors
