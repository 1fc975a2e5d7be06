"""A real Flower deployment on loopback: a flower-superlink, two flower-supernode processes (each
loading its own partition) and ``flwr run``; round 1 must equal the embedded engine's, SuperNode 1 is
killed during round 2 and the round finishes with the other node; every process started is stopped."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedlora.config import load_config, to_toml  # noqa: E402
from fedlora.flower.cli import write_app  # noqa: E402
from fedlora.flower.deploy import LocalDeployment, _alive  # noqa: E402
from fedlora.sim import run  # noqa: E402
from fedlora.runtime.rundir import RunDir  # noqa: E402
from sim_tiny import make_tiny_model, make_toy_data, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.slow


def test_loopback_deployment_two_rounds_with_a_node_killed_mid_round(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    model, data = make_tiny_model(tmp_path / "tiny-bert"), make_toy_data(tmp_path / "toy.jsonl")

    def cfg(name, rounds=2):
        return load_config(None, tiny_overrides(tmp_path / "runs", model, data, run__name=f'"{name}"',
                                                partition__num_clients=2, eval__personalised="false",
                                                model__device='"cpu"', strategy__name='"fedrot"',
                                                train__rounds=rounds))

    (tmp_path / "flower.toml").write_text(to_toml(cfg("flower")))
    app = write_app(tmp_path / "app", tmp_path / "flower.toml", min_replies=1, round_timeout=90)
    metrics = tmp_path / "runs" / "flower" / "metrics.jsonl"

    dep = LocalDeployment(tmp_path / "deploy", num_nodes=2)
    started = []
    try:
        dep.start()

        def kill_node_1_in_round_2():
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                if metrics.is_file() and metrics.read_text().count("\n") >= 1:  # round 1 done: round 2 is out
                    time.sleep(1.0)  # let node 1's ClientApp start training
                    dep.kill_node(1)
                    return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_node_1_in_round_2, daemon=True)
        killer.start()
        result = dep.run_app(app, timeout=500)
        killer.join(5)
        started = dep.all_pids()
        assert result.returncode == 0, result.stdout[-3000:]
    finally:
        dep.stop()
    assert not [p for p in started + list(dep.known) if _alive(p)], "processes left running"

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = json.loads((tmp_path / "runs" / "flower" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and (tmp_path / "runs" / "flower" / "adapter").is_dir()
    assert rows[0]["clients"] == [0, 1] and not rows[0]["failed"]
    assert [f["client"] for f in rows[1]["failed"]] == [1], rows[1]["failed"]  # the killed node: dropped
    assert list(rows[1]["client_loss"]) == ["0"]

    # round 1 is the embedded engine's round 1 (same seed, both clients)
    torch.manual_seed(0)
    engine = run(cfg("engine", rounds=1), progress=False, log=lambda s: None)
    erow = RunDir.open(engine["run_dir"]).read_metrics()[0]
    assert rows[0]["train_loss"] == pytest.approx(erow["train_loss"], rel=1e-4)
    assert rows[0]["diagnostics"]["ideal_norm"] == pytest.approx(erow["diagnostics"]["ideal_norm"], rel=1e-4)
    assert rows[0]["bytes_up"] == erow["bytes_up"] == rows[0]["bytes_up_sent"]
