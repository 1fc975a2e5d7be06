"""Exact resume: a run stopped (cleanly, or by SIGKILL mid-round) and resumed ends bit-identical to
one that was never interrupted: every metrics row (timings aside) and every saved tensor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.runtime.rundir import RunDir
from sim_tiny import make_tiny_model, make_toy_data, tiny_overrides
from task_tiny import make_tiny_llama, make_toy_math

TIMINGS = {"wall_s", "train_s", "eval_s", "node_timing", "model_loads"}  # (Flower: the nodes' clocks and loads)
#: what a Flower run's transport carried: after a resume, nodes that lost their cached copy of the
#: global adapter get all of it once, so bytes_down_sent may grow there; nothing else may differ
SENT_DOWN = "bytes_down_sent"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, tiny bert, toy sentences, tiny llama, toy sums), the token cache in the temp folder."""
    root = tmp_path_factory.mktemp("resume")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLORA_CACHE", str(root / "cache"))
    yield (root, make_tiny_model(root / "tiny-bert"), make_toy_data(root / "toy.jsonl", n=160),
           make_tiny_llama(root / "tiny-llama"), make_toy_math(root / "math.jsonl", n=120))
    mp.undo()


CASES = {  # three clients of four train each round (so a client's state can skip rounds)
    # personal state (each client keeps its B)
    "fedsa": ["strategy.name=\"fedsa\""],
    # base-weight merges every round, heterogeneous ranks
    "flora": ["strategy.name=\"flora\"", "lora.client_ranks=[2, 4]"],
    # server optimiser state (Adam moments) and the alignment reference
    "fedrot-adam": ["strategy.name=\"fedrot\"", "strategy.options.server_optimizer={lr = 0.01}"],
    # the causal-LM task: generations and samples in the rows
    "causal": ["data.task=\"causal_lm\"", "data.task_options={max_new_tokens = 3, generate_examples = 4}",
               "partition.column=\"template\""],
}


def overrides(tiny, name: str, case: str, rounds: int) -> list[str]:
    root, bert, toy, llama, sums = tiny
    if case == "causal":
        base = tiny_overrides(root / "runs", llama, sums, data__columns="{}")
    else:
        base = tiny_overrides(root / "runs", bert, toy)
    return base + [f"run.name=\"{name}\"", f"train.rounds={rounds}", "partition.num_clients=4",
                   "train.local_steps=3", "eval.client_examples=4", "data.eval_examples=16",
                   "train.clients_per_round=3"] + CASES[case]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def assert_identical_runs(a, b) -> None:
    """Same rows (timings aside) and bit-equal adapter and base-merge tensors."""
    ra, rb = rows(a), rows(b)
    assert [r["round"] for r in rb] == list(range(len(ra)))
    for x, y in zip(ra, rb):
        skip = TIMINGS | {SENT_DOWN}
        assert {k: v for k, v in x.items() if k not in skip} == {k: v for k, v in y.items() if k not in skip}
        assert (SENT_DOWN in x) == (SENT_DOWN in y) and y.get(SENT_DOWN, 0) >= x.get(SENT_DOWN, 0)
    for name in ("adapter/adapter_model.safetensors", "base_delta.safetensors"):
        fa, fb = Path(a) / name, Path(b) / name
        assert fa.is_file() == fb.is_file()
        if fa.is_file():
            ta, tb = load_file(fa), load_file(fb)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_a_clean_stop_is_exact(tiny, case, engine):
    full = engine(load_config(None, overrides(tiny, f"full-{case}", case, 4)), log=lambda s: None)

    calls = [0]

    def stop_in_round_2(model, batch, client):  # the task's own loss, until two steps into round 2
        calls[0] += 1
        if calls[0] > 2 * 3 * 3 + 2:  # two rounds of 3 clients × 3 steps (two base merges for flora)
            raise KeyboardInterrupt
        return fed_task.loss(model, batch)

    cfg = load_config(None, overrides(tiny, f"cut-{case}", case, 4))
    from fedlora.runtime.federation import prepare

    fed_task = prepare(cfg, log=lambda s: None).task
    with pytest.raises(KeyboardInterrupt):
        engine(cfg, loss_fn=stop_in_round_2, log=lambda s: None)
    cut = sorted((tiny[0] / "runs").glob(f"cut-{case}*"))[-1]
    assert json.load(open(cut / "summary.json"))["rounds_completed"] == 2 and len(rows(cut)) == 2
    resumed = engine(load_config(cut / "config.toml"), resume=cut, log=lambda s: None)
    assert resumed["status"] == "completed" and resumed["rounds_completed"] == 4
    assert_identical_runs(full["run_dir"], cut)


def test_sigkill_mid_round_resumes_from_the_previous_round(tiny, tmp_path, engine, run_command):
    """`fedlora run` in a subprocess, killed with SIGKILL while a round is under way: the files are
    intact, `fedlora run --resume` finishes the run, and the result equals an uninterrupted run."""
    rounds = 6
    full = engine(load_config(None, overrides(tiny, "sigkill-full", "fedsa", rounds) + ["train.local_steps=12"]),
                  log=lambda s: None)
    run_dir = tmp_path / "killed"
    sets = overrides(tiny, "killed", "fedsa", rounds) + ["train.local_steps=12", f"run.dir=\"{run_dir}\""]
    cmd = [sys.executable, "-m", "fedlora.cli", *run_command] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, FEDLORA_CACHE=str(tiny[0] / "cache"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoint.pt").is_file():
        time.sleep(0.02)
    time.sleep(0.1)  # the first round's checkpoint is written; the second round (36 steps) is training now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert RunDir(run_dir).load_checkpoint()["round"] == 1  # killed inside round 2: round 1 is what is complete
    assert len(RunDir(run_dir).read_metrics()) == 1 and not (run_dir / "summary.json").exists()

    from fedlora.cli import main

    assert main([*run_command, "--resume", str(run_dir)]) == 0
    assert json.load(open(run_dir / "summary.json"))["rounds_completed"] == rounds
    assert_identical_runs(full["run_dir"], run_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_checkpoint_names_the_file(tiny, damage, engine):
    summary = engine(load_config(None, overrides(tiny, f"damaged-{damage}", "fedsa", 1)), log=lambda s: None)
    ckpt = Path(summary["run_dir"]) / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(ConfigError, match=str(ckpt)):  # more rounds: a finished run needs no checkpoint
        engine(load_config(Path(summary["run_dir"]) / "config.toml", ["train.rounds=2"]), resume=summary["run_dir"],
               log=lambda s: None)
