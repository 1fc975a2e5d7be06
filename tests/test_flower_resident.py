"""Resident nodes (``fedlora flower node``): a worker per SuperNode keeps the model loaded across
rounds, and the ClientApp Flower starts per message only forwards to it over a local channel.

- the channel: a wrong or missing secret is refused, so is another user; the right one gets a real
  ClientApp reply;
- a loopback deployment of resident nodes gives the embedded engine's result (fedrot on the real
  MiniLM, fedit on the real SmolLM2, fedsa with personal evaluation on a tiny model), loads the
  model once per node per run, and survives a worker killed mid-round: that round completes with
  the other node, the next one uses a restarted worker; every process started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedlora.config import load_config, to_toml  # noqa: E402
from fedlora.flower import channel as ch  # noqa: E402
from fedlora.flower.cli import write_app  # noqa: E402
from fedlora.flower.deploy import LocalDeployment, _alive  # noqa: E402
from fedlora.runtime.rundir import RunDir  # noqa: E402
from fedlora.sim import run  # noqa: E402
from sim_tiny import make_tiny_model, make_toy_data, tiny_overrides  # noqa: E402



# ---- what the per-message processes import ------------------------------------------------------------


@pytest.mark.parametrize("what", ["the forwarding ClientApp", "the command line (fedlora flower node)"])
def test_the_forwarder_and_the_node_supervisor_do_not_import_torch(what):
    """Flower starts a ClientApp process per message, and `fedlora flower node` lives beside the
    SuperNode all run long: neither may carry torch (the forwarder would pay seconds a round, the
    supervisor ~200 MB a node)."""
    code = {"the forwarding ClientApp": "import fedlora.flower.forwarder",
            "the command line (fedlora flower node)": "from fedlora.cli import build_parser; build_parser()"}[what]
    out = subprocess.run([sys.executable, "-c", f"import sys; {code}; print(sorted(m for m in ('torch', "
                          "'transformers', 'peft', 'datasets') if m in sys.modules))"],  # (flwr itself loads numpy)
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fedlora_flower_node_passes_supernode_arguments_and_adds_its_folder(tmp_path, capsys):
    from fedlora.cli import main
    from fedlora.flower.node import supernode_commands

    one = supernode_commands(["--insecure", "--superlink", "h:1", "--node-config", "partition-id=0 num-partitions=2"],
                             tmp_path)
    assert one == [["--insecure", "--superlink", "h:1", "--node-config",
                    f'partition-id=0 num-partitions=2 fedlora-node="{tmp_path}"']]
    two = supernode_commands(["--superlink=h:1", "--port", "9100", "--node-config", "partition-id=0 num-partitions=2",
                              "--node-config=partition-id=1 num-partitions=2"], tmp_path)
    assert [c[c.index("--port") + 1] for c in two] == ["9100", "9101"]  # one Runtime API port each
    assert [c[-1].split()[0] for c in two] == ["partition-id=0", "partition-id=1"]
    with pytest.raises(Exception, match="auth-supernode-private-key"):
        supernode_commands(["--auth-supernode-private-key", "k", "--node-config", "a=1", "--node-config", "a=2"],
                           tmp_path)
    assert main(["flower", "node", "--node-config", "partition-id=0 num-partitions=2"]) == 2
    assert "--superlink" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other commands still refuse unknown arguments
        main(["flower", "app", str(tmp_path / "app"), "--config", "x.toml", "--no-such-flag"])


# ---- the channel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker():  # (a real worker imports torch and fedlora's ClientApp: ~8 s)
    """A real resident worker (``python -m fedlora.flower.node --worker DIR``) in a private folder."""
    node_dir = ch.make_node_dir(None)
    ch.new_secret(node_dir)
    p = subprocess.Popen([sys.executable, "-m", "fedlora.flower.node", "--worker", str(node_dir)])
    deadline = time.monotonic() + 120
    while not (node_dir / ch.PIDFILE).is_file() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert (node_dir / ch.PIDFILE).is_file(), "the worker did not start"
    yield node_dir, p
    p.terminate()
    p.wait(10)
    import shutil

    shutil.rmtree(node_dir, ignore_errors=True)


def handshake(node_dir, secret: bytes) -> bytes:
    """Connect and send ``secret``; the worker's answer, or b"" when it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(node_dir / ch.SOCKET))
        try:
            ch.send_frame(s, secret)
            return ch.recv_frame(s)
        except (ch.ChannelClosed, ConnectionResetError, BrokenPipeError):  # closed on us
            return b""


def test_the_worker_refuses_a_wrong_or_missing_secret_and_answers_the_right_one(worker, monkeypatch):
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    node_dir, _ = worker
    assert oct((node_dir).stat().st_mode & 0o777) == "0o700"
    assert oct((node_dir / ch.SOCKET).stat().st_mode & 0o777) == "0o600"
    assert oct((node_dir / ch.SECRET).stat().st_mode & 0o777) == "0o600"
    assert handshake(node_dir, b"") == b""
    assert handshake(node_dir, b"0" * 64) == b""
    assert handshake(node_dir, ch.read_secret(node_dir).encode()) == b"ok"
    # the right secret: a real QUERY through fedlora's ClientApp in the worker
    for key, value in {"_run_id": 1, "_node_id": 1, "_task_id": 1}.items():  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, key, value)
    msg = Message(RecordDict({}), 7, MessageType.QUERY)
    msg.metadata.__dict__["_message_id"] = "m1"  # as a message pulled from a SuperNode has
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    content, state = ch.forward(node_dir, {"app": "plain", "clock": {}}, msg, ctx)
    assert dict(content.config_records["fedlora.node"]) == {"partition-id": 2, "num-partitions": 3}


@pytest.mark.skipif(not hasattr(os, "setuid") or os.getuid() != 0, reason="needs root to act as another user")
def test_the_worker_refuses_another_user_even_with_the_secret(worker):
    node_dir, _ = worker
    secret = ch.read_secret(node_dir).encode()

    def as_nobody() -> str:
        """In a child running as uid 65534: try the socket; what happened."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    got = handshake(node_dir, secret)
                    out = "ok" if got == b"ok" else "refused"
                except PermissionError:
                    out = "no access"
            except BaseException as e:  # noqa: BLE001
                out = f"error {e!r}"
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            return f.read()

    assert as_nobody() == "no access"  # the folder (0700) and the socket (0600) keep other users out
    modes = {p: p.stat().st_mode & 0o777 for p in (node_dir, node_dir / ch.SOCKET)}
    try:
        for p in modes:
            p.chmod(0o777)  # even with the file permissions opened, the worker checks the peer's uid
        assert as_nobody() == "refused"
    finally:
        for p, m in modes.items():
            p.chmod(m)


# ---- a loopback deployment of resident nodes ---------------------------------------------------------


def catalog_model(name: str) -> str:
    from fedlora.assets import AssetError, resolve_model
    from fedlora.data import read_source

    try:
        read_source("sarcasm" if name == "minilm" else "gsm-symbolic")
        return resolve_model(name)
    except AssetError as e:
        pytest.skip(f"catalog assets unavailable: {e}")


def same_figures(a, b, where: str) -> None:
    """Equal nested metrics: numbers to float round-off, everything else (SmolLM2's generated
    samples) identical."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for k in b:
            same_figures(a[k], b[k], f"{where}/{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_figures(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    else:
        assert a == b, where


def rows_of(run_dir) -> list[dict]:
    return RunDir.open(run_dir).read_metrics()


@pytest.mark.slow
def test_resident_nodes_give_the_embedded_result_load_once_and_survive_a_killed_worker(tmp_path):
    catalog_model("minilm"), catalog_model("smollm2-135m")  # (the catalog's cache: FEDLORA_CACHE as set)
    model, data = make_tiny_model(tmp_path / "tiny-bert"), make_toy_data(tmp_path / "toy.jsonl")
    runs = tmp_path / "runs"
    common = {"run.output_dir": f'"{runs}"', "run.progress": "false", "partition.num_clients": "2",
              "partition.method": '"iid"', "model.device": '"cpu"', "eval.personalised": "false"}

    def cfg(name, base, **extra):
        values = {**common, **base, "run.name": f'"{name}"', **{k.replace("__", "."): str(v) for k, v in extra.items()}}
        return load_config(None, [f"{k}={v}" for k, v in values.items()])

    minilm = {"model.name": '"minilm"', "data.source": '"sarcasm"', "data.eval_examples": "32",
              "train.local_steps": "3", "train.lr": "5e-3", "strategy.name": '"fedrot"', "train.rounds": "1"}
    smollm = {"model.name": '"smollm2-135m"', "data.source": '"gsm-symbolic"', "data.task": '"causal_lm"',
              "data.max_length": "96", "data.eval_examples": "4", "train.local_steps": "1", "train.batch_size": "2",
              "data.task_options": "{max_new_tokens = 4, generate_examples = 1}", "strategy.name": '"fedit"',
              "train.rounds": "1", "data.train_examples": "40"}
    tiny = dict(a.split("=", 1) for a in tiny_overrides(runs, model, data))
    tiny = {k: v for k, v in tiny.items() if k not in common}
    tiny.update({"strategy.name": '"fedsa"', "train.rounds": "2", "eval.personalised": "true"})
    killed = {**tiny, "strategy.name": '"fedrot"', "train.rounds": "4"}
    bases = {"minilm": minilm, "smollm": smollm, "fedsa": tiny, "killed": killed}
    plans = {name: cfg(name, base) for name, base in bases.items()}
    apps = {}
    for name, c in plans.items():
        (tmp_path / f"{name}.toml").write_text(to_toml(c))
        apps[name] = write_app(tmp_path / f"app-{name}", tmp_path / f"{name}.toml", min_replies=1,
                               round_timeout=240, resident=True)

    # node 1's worker dies in round 3 of any run (only the 4-round run "killed" has one)
    dep = LocalDeployment(tmp_path / "deploy", num_nodes=2, resident=True,  # personal states kept in tmp_path
                          node_config={0: {"fedlora-state-dir": str(tmp_path / "nodes")},
                                       1: {"fedlora-state-dir": str(tmp_path / "nodes"), "fedlora-fault": "exit@3"}})
    started = []
    try:
        dep.start()
        first_workers = [dep.worker_pid(k) for k in range(2)]
        for name in plans:
            result = dep.run_app(apps[name], timeout=600)
            assert result.returncode == 0, (name, result.stdout[-3000:], dep.log("supernode-1")[-3000:])
        started = dep.all_pids()
        restarted = dep.worker_pid(1)
    finally:
        dep.stop()
    assert started and not [p for p in started + list(dep.known) if _alive(p)], "processes left running"

    # the embedded engine, same configs
    for name, c in plans.items():
        rounds = 2 if name == "killed" else c.train.rounds  # "killed": the rounds before the worker died
        torch.manual_seed(c.run.seed)
        engine = run(cfg(f"{name}-engine", {**bases[name], "train.rounds": str(rounds)}), progress=False,
                     log=lambda s: None)
        erows, frows = rows_of(engine["run_dir"]), rows_of(runs / name)
        for e, f in zip(erows, frows[:rounds]):
            assert f["clients"] == e["clients"] and not f["failed"], (name, f)
            assert f["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4), name
            same_figures(f["eval"], e["eval"], name)  # global and (fedsa) personal evaluation
            if e.get("diagnostics"):
                assert f["diagnostics"]["ideal_norm"] == pytest.approx(e["diagnostics"]["ideal_norm"], rel=1e-4)
        if name != "killed":  # a whole run: the same global adapter
            from safetensors.torch import load_file

            a, b = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
                    for d in (engine["run_dir"], runs / name))
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        assert frows[0]["model_loads"] == 2, name  # each node loads a new run's model with its first message

    # while a worker lives it never loads a run's model twice
    assert [r["model_loads"] for r in rows_of(runs / "fedsa")] == [2, 0]
    # "killed": node 1's worker died in round 3; the round completed with node 0, round 4 used a new worker
    rows = rows_of(runs / "killed")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [f["client"] for f in rows[2]["failed"]] == [1] and "died" in rows[2]["failed"][0]["error"]
    assert list(rows[2]["client_loss"]) == ["0"]
    assert not rows[3]["failed"] and sorted(rows[3]["client_loss"]) == ["0", "1"]
    pids = [{k: t["worker-pid"] for k, t in r["node_timing"].items()} for r in rows]
    assert pids[0] == pids[1] == {"0": first_workers[0], "1": first_workers[1]}
    assert pids[3]["1"] == restarted != first_workers[1] and pids[3]["0"] == first_workers[0]
    # the restarted worker loaded the model once, for round 3's personal evaluation (right after its
    # predecessor died)
    assert [r["model_loads"] for r in rows] == [2, 0, 1, 0]
    assert all("personal" in r["eval"] for r in rows)
    summary = json.loads((runs / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failed_client_rounds"] == 1
