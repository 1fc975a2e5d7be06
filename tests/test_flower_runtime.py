"""Flower runs are first-class: they evaluate personal models on the nodes that hold them (the same
figures as the embedded engine), resume bit-identically, and stop cleanly on Ctrl-C, because both
engines run the one round loop (fedlora.runtime.loop) and differ only in their transport."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from fedlora.flower.inprocess import run_inprocess  # noqa: E402
from fedlora.runtime.rundir import RunDir  # noqa: E402
from fedlora.sim import run  # noqa: E402
from flower_common import cfg_for, tiny  # noqa: E402,F401
from sim_tiny import tiny_overrides  # noqa: E402

TIMINGS = {"wall_s", "train_s", "eval_s", "node_timing", "model_loads"}  # (the nodes' clocks; fresh nodes reload)


def personal_cfg(tiny, name, strategy, **extra):
    return cfg_for(tiny, name, strategy__name=f'"{strategy}"', eval__personalised="true", train__rounds=3,
                   train__clients_per_round=2, **extra)


@pytest.mark.parametrize("strategy", ["fedsa", "sfed", "fedit"])
def test_flower_personalised_evaluation_equals_the_embedded_engine(tiny, strategy):
    """Two of three clients per round, so some node evaluates a personal state from an earlier round
    (or none yet): each node evaluates its own model on its held-out slice, and the weighted and
    unweighted figures equal the embedded engine's."""
    torch.manual_seed(0)
    want = run(personal_cfg(tiny, f"engine-personal-{strategy}", strategy), progress=False, log=lambda s: None)
    got = run_inprocess(personal_cfg(tiny, f"flower-personal-{strategy}", strategy), log=lambda s: None)
    erows, frows = (RunDir.open(s["run_dir"]).read_metrics() for s in (want, got))
    assert len(frows) == len(erows) == 3
    for f, e in zip(frows, erows):
        fp, ep = f["eval"]["personal"], e["eval"]["personal"]
        assert fp["clients"] == ep["clients"] == 3
        assert fp["per_client"].keys() == ep["per_client"].keys()
        for key in ("accuracy_weighted", "accuracy_unweighted", "loss_weighted", "loss_unweighted"):
            assert fp[key] == pytest.approx(ep[key], rel=1e-4, abs=1e-6), key
    assert got["final_personal_accuracy_weighted"] == pytest.approx(want["final_personal_accuracy_weighted"])
    assert got["engine"] == "flower" and want["engine"] == "embedded"


def test_a_flower_run_writes_what_an_embedded_run_writes(tiny):
    """One summary.json (engine "flower"), the partition summary and plot, a full checkpoint, and
    metrics rows with the embedded schema plus the bytes Flower carried."""
    e = run(cfg_for(tiny, "schema-engine"), progress=False, log=lambda s: None)
    f = run_inprocess(cfg_for(tiny, "schema-flower"), log=lambda s: None)
    ed, fd = RunDir.open(e["run_dir"]), RunDir.open(f["run_dir"])
    for name in ("partition.json", "partition.png", "summary.json", "adapter/adapter_model.safetensors"):
        assert (fd.path / name).is_file(), name
    assert set(f) == set(e) and f["status"] == "completed"
    erow, frow = ed.read_metrics()[0], fd.read_metrics()[0]
    assert set(frow) == set(erow) | {"bytes_up_sent", "bytes_down_sent", "model_loads", "node_timing"}
    assert set(frow["node_timing"]) == {str(k) for k in frow["clients"]}  # one entry per replying client
    # in process every node shares one process: the first message of the run loads the model, no other
    assert [r["model_loads"] for r in fd.read_metrics()] == [1, 0]
    ckpt = fd.load_checkpoint()
    assert ckpt["round"] == 2 and {"client_train", "torch_rng", "transport"} <= set(ckpt["extra"])


# ---- Flower's simulation runtime (Ray): each call starts a simulation, ≈10 s -------------------


def sim_sets(tiny, **extra) -> list[str]:
    root, model, data = tiny
    return [a for o in tiny_overrides(root / "runs", model, data, eval__personalised="true",
                                      **extra) for a in ("--set", o)]


def identical(a, b) -> None:
    """Same rows (timings and the bytes the transport re-sent after a resume aside), bit-equal adapter."""
    ra, rb = RunDir.open(a).read_metrics(), RunDir.open(b).read_metrics()
    assert [r["round"] for r in ra] == [r["round"] for r in rb]
    skip = TIMINGS | {"bytes_down_sent"}
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in skip} == {k: v for k, v in y.items() if k not in skip}
    ta, tb = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedrot", "fedsa"])
def test_a_flower_simulation_resumed_after_round_1_ends_bit_identical(tiny, tmp_path, strategy):
    pytest.importorskip("ray")
    from fedlora.cli import main

    env_cache = os.environ.get("FEDLORA_CACHE")
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = dict(strategy__name=f'"{strategy}"', train__clients_per_round=2)
    assert main(["flower", "sim", *sim_sets(tiny, run__dir=f'"{full}"', train__rounds=3, **common)]) == 0
    assert main(["flower", "sim", *sim_sets(tiny, run__dir=f'"{cut}"', train__rounds=1, **common)]) == 0
    assert main(["flower", "sim", "--resume", str(cut), "--set", "train.rounds=3"]) == 0
    assert env_cache == os.environ.get("FEDLORA_CACHE")
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["engine"] == "flower"
    identical(full, cut)


@pytest.mark.slow
def test_sigint_to_a_flower_simulation_leaves_a_resumable_run(tiny, tmp_path):
    """A real SIGINT to `fedlora flower sim`: exit 130, the complete rounds kept and the summary
    written (status interrupted), then `fedlora flower sim --resume` finishes the run."""
    pytest.importorskip("ray")
    root = tiny[0]
    run_dir = tmp_path / "ctrl-c"
    cmd = [sys.executable, "-m", "fedlora.cli", "flower", "sim",
           *sim_sets(tiny, run__dir=f'"{run_dir}"', train__rounds=200, strategy__name='"fedsa"')]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FEDLORA_CACHE=str(root / "cache")))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoint.pt").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    done = summary["rounds_completed"]
    assert summary["status"] == "interrupted" and 1 <= done < 200
    assert [r["round"] for r in RunDir.open(run_dir).read_metrics()] == list(range(done))
    assert RunDir.open(run_dir).load_checkpoint()["round"] == done
    assert f"fedlora flower sim --resume {run_dir}" in out + err
    from fedlora.cli import main

    assert main(["flower", "sim", "--resume", str(run_dir), "--set", f"train.rounds={done + 1}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == done + 1
    assert [r["round"] for r in RunDir.open(run_dir).read_metrics()] == list(range(done + 1))
