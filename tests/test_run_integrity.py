"""`fedlora run` never reports a wrong result silently: failed rounds fail the run, a resume keeps
every row it has and refuses what it cannot continue, a bad output location stops the run before
anything loads, and SIGTERM stops a run as cleanly as Ctrl-C. Every test drives the real CLI, on
both transports (``run_command``: `fedlora run`, `fedlora flower sim --in-process`)."""

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

from fedlora.cli import main
from fedlora.config import load_config
from engines import COMMANDS
from sim_tiny import tiny_fixture, tiny_overrides

tiny = tiny_fixture("integrity")


def sets(tiny, run_dir: Path, **extra) -> list[str]:
    """``--set`` arguments for a tiny run in ``run_dir``."""
    root, model, data = tiny
    return [a for o in tiny_overrides(root / "runs", model, data, run__dir=f'"{run_dir}"', **extra)
            for a in ("--set", o)]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one message, one line: the console wraps at 80 otherwise


def fedlora(capsys, *args) -> tuple[int, str, str]:
    """``fedlora ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a run directory: its modification time and bytes."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ---- failed clients and failed rounds ------------------------------------------------------------


def test_a_run_whose_clients_all_fail_ends_failed_naming_the_first_error(tiny, tmp_path, capsys, run_command):
    """A huge learning rate makes every client's loss NaN: the run must not say "completed"."""
    run_dir = tmp_path / "all-nan"
    code, out, err = fedlora(capsys, *run_command, *sets(tiny, run_dir, train__lr="1e30", train__grad_clip="0"))
    assert code == 2
    assert "fedlora: error: round 1: every sampled client failed (3 of 3); the first: client 0: loss is nan" in err
    summary = summary_of(run_dir)
    assert summary["status"].startswith("failed: round 1: every sampled client failed")
    assert summary["rounds_completed"] == 0 and summary["failed_client_rounds"] == 3
    assert summary["first_failure"].startswith("round 1, client 0: loss is nan at local step")
    assert not (run_dir / "metrics.jsonl").exists()  # no round completed, so none is logged


def test_a_round_whose_clients_all_fail_fails_the_run_on_either_transport(tiny, tmp_path, engine):
    """The same rule through the API, in process and over Flower messages: RoundFailedError naming the
    first error, summary status "failed: …", every failed client counted, no row logged."""
    from fedlora.errors import RoundFailedError

    root, model, data = tiny
    cfg = load_config(None, tiny_overrides(root / "runs", model, data, run__dir=f'"{tmp_path / "nan"}"',
                                           train__lr="1e30", train__grad_clip="0"))
    with pytest.raises(RoundFailedError, match=r"round 1: every sampled client failed \(3 of 3\); the first: "
                                               r"client 0: loss is nan"):
        engine(cfg, log=lambda s: None)
    summary = summary_of(tmp_path / "nan")
    assert summary["status"].startswith("failed: round 1: every sampled client failed")
    assert summary["rounds_completed"] == 0 and summary["failed_client_rounds"] == 3
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()


def test_a_partly_failed_run_counts_its_failed_clients_in_the_last_line_and_summary(tiny, tmp_path, engine):
    def client_1_fails(model, batch, client):  # the task's loss, NaN for client 1
        loss = torch.nn.functional.cross_entropy(
            model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        return loss * float("nan") if client == 1 else loss

    root, model, data = tiny
    lines: list[str] = []
    cfg = load_config(None, tiny_overrides(root / "runs", model, data, run__dir=f'"{tmp_path / "partial"}"'))
    summary = engine(cfg, loss_fn=client_1_fails, log=lines.append)
    assert summary["status"] == "completed" and summary["failed_client_rounds"] == 2
    assert summary["first_failure"] == "round 1, client 1: loss is nan at local step 0"
    assert summary_of(tmp_path / "partial")["first_failure"] == summary["first_failure"]
    assert lines[-1] == "completed 2 rounds; 2 client-rounds failed (first: round 1, client 1: loss is nan at local step 0)"


# ---- resuming ------------------------------------------------------------------------------------


@pytest.fixture
def two_rounds(tiny, tmp_path, capsys, run_command):
    """A completed two-round tiny run (its directory), on each transport; resuming it needs
    ``train.rounds=3``."""
    run_dir = tmp_path / "two"
    assert fedlora(capsys, *run_command, *sets(tiny, run_dir))[0] == 0
    return run_dir


def test_a_damaged_row_mid_file_stops_the_resume_naming_file_and_line(two_rounds, capsys, run_command):
    metrics = two_rounds / "metrics.jsonl"
    lines = metrics.read_bytes().split(b"\n")
    lines[0] = lines[0][:-1] + b"x"  # the first row's JSON is broken; the second is intact
    metrics.write_bytes(b"\n".join(lines))
    before = snapshot(two_rounds)
    code, out, err = fedlora(capsys, *run_command, "--resume", two_rounds, "--set", "train.rounds=3")
    assert code == 2 and f"{metrics}:1: not a metrics row (damaged)" in err
    assert snapshot(two_rounds) == before


def test_a_torn_last_line_is_cut_and_the_resume_continues(two_rounds, capsys, run_command):
    metrics = two_rounds / "metrics.jsonl"
    intact = metrics.read_bytes()
    metrics.write_bytes(intact + b'{"round": 2, "clients": [0, 1')  # a kill mid-write
    code, out, err = fedlora(capsys, *run_command, "--resume", two_rounds, "--set", "train.rounds=3")
    assert code == 0, err
    assert "cut the torn last line of metrics.jsonl (line 3, a write cut short)" in out
    after = metrics.read_bytes()
    assert after.startswith(intact)  # the two complete rows are kept byte for byte
    assert [json.loads(line)["round"] for line in after.splitlines()] == [0, 1, 2]


def test_rows_without_a_checkpoint_are_an_error_not_a_restart(two_rounds, capsys, run_command):
    (two_rounds / "checkpoint.pt").unlink()
    before = snapshot(two_rounds)
    code, out, err = fedlora(capsys, *run_command, "--resume", two_rounds, "--set", "train.rounds=3")
    assert code == 2
    assert f"{str(two_rounds / 'metrics.jsonl')!r} has rows for 2 rounds but there is no " \
           f"{str(two_rounds / 'checkpoint.pt')!r}" in err
    assert snapshot(two_rounds) == before


def test_a_row_logged_after_the_last_checkpoint_is_said_to_be_re_done(tiny, tmp_path, capsys, run_command):
    """The window between a round's row and its checkpoint: the checkpoint of round 1 with the rows
    of rounds 1 and 2. Round 2 runs again; round 1's row stays as it was."""
    run_dir = tmp_path / "ahead"
    assert fedlora(capsys, *run_command, *sets(tiny, run_dir, train__rounds=1))[0] == 0
    first_ckpt = (run_dir / "checkpoint.pt").read_bytes()
    assert fedlora(capsys, *run_command, "--resume", run_dir, "--set", "train.rounds=2")[0] == 0
    (run_dir / "checkpoint.pt").write_bytes(first_ckpt)
    row_1 = (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)[0]
    code, out, err = fedlora(capsys, *run_command, "--resume", run_dir, "--set", "train.rounds=3")
    assert code == 0, err
    assert "resuming" in out and "round 2 was logged after the last checkpoint, so it is run again" in out
    rows = (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert rows[0] == row_1 and [json.loads(r)["round"] for r in rows] == [0, 1, 2]


def test_resuming_a_finished_run_says_so_and_touches_nothing(two_rounds, capsys, run_command):
    before = snapshot(two_rounds)
    time.sleep(0.01)  # a rewrite would show in the modification times
    code, out, err = fedlora(capsys, *run_command, "--resume", two_rounds)
    assert code == 0, err
    assert f"run {two_rounds} is already complete: 2 of 2 rounds; add rounds with --set train.rounds=N" in out
    assert snapshot(two_rounds) == before


def test_resuming_with_fewer_rounds_than_done_is_an_error(two_rounds, capsys, run_command):
    before = snapshot(two_rounds)
    code, out, err = fedlora(capsys, *run_command, "--resume", two_rounds, "--set", "train.rounds=1")
    assert code == 2 and "train.rounds = 1: the run in" in err and "has already completed 2 rounds" in err
    assert snapshot(two_rounds) == before


@pytest.mark.slow
def test_minilm_resume_refuses_a_changed_model_setting_and_accepts_more_rounds(tmp_path, capsys, run_command):
    """On the real MiniLM: `--resume --set lora.r=8` fails before anything loads, naming lora.r,
    and leaves the run as it was; `--set train.rounds=2` then continues it."""
    from fedlora.assets import AssetError, resolve_model
    from fedlora.data import read_source

    try:
        read_source("sarcasm")
        resolve_model("minilm")
    except AssetError as e:
        pytest.skip(f"catalog assets unavailable: {e}")
    run_dir = tmp_path / "minilm"
    cheap = ["model.name=minilm", "data.source=sarcasm", "data.train_examples=120", "data.eval_examples=16",
             "partition.method=\"iid\"", "partition.num_clients=2", "train.rounds=1", "train.local_steps=2",
             "train.batch_size=8", "eval.client_examples=4", f"run.dir=\"{run_dir}\"", "run.progress=false"]
    assert fedlora(capsys, *run_command, *[a for s in cheap for a in ("--set", s)])[0] == 0
    before = snapshot(run_dir)
    code, out, err = fedlora(capsys, *run_command, "--resume", run_dir, "--set", "lora.r=8")
    assert code == 2 and "this changes lora.r: 4 → 8" in err
    assert out == ""  # nothing loaded: prepare's partition table is not printed
    assert snapshot(run_dir) == before
    code, out, err = fedlora(capsys, *run_command, "--resume", run_dir, "--set", "train.rounds=2")
    assert code == 0, err
    rows = (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert rows[0] == before["metrics.jsonl"][1].splitlines(keepends=True)[0] and len(rows) == 2
    assert summary_of(run_dir)["status"] == "completed" and summary_of(run_dir)["rounds_completed"] == 2


# ---- where a run writes --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["output_dir is a file", "output_dir under a file", "dir is a file",
                                   "output_dir cannot be created"])
def test_an_unusable_output_location_fails_before_anything_loads(tiny, tmp_path, capsys, where, run_command):
    """The model named does not exist: an error about the location proves it came first."""
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    key, value, blocker = {
        "output_dir is a file": ("run.output_dir", afile, afile),
        "output_dir under a file": ("run.output_dir", afile / "runs", afile),
        "dir is a file": ("run.dir", afile, afile),
        "output_dir cannot be created": ("run.output_dir", Path("/proc/fedlora-runs"), Path("/proc")),
    }[where]
    if where == "output_dir cannot be created" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    root, model, data = tiny
    overrides = tiny_overrides(root / "runs", tmp_path / "no-such-model", data, **{key.replace(".", "__"): f'"{value}"'})
    code, out, err = fedlora(capsys, *run_command, *[a for o in overrides for a in ("--set", o)])
    assert code == 2 and f"fedlora: error: {key} = {str(value)!r}: " in err and repr(str(blocker)) in err
    assert afile.read_text() == "not a folder"


# ---- signals -------------------------------------------------------------------------------------


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tiny, tmp_path, capsys, run_command):
    """A real SIGTERM to `fedlora run` once round 1 is logged: a non-zero exit, the complete rounds
    and an "interrupted" summary on disk; `fedlora run --resume` then finishes the run."""
    root = tiny[0]
    run_dir = tmp_path / "sigterm"
    cmd = [sys.executable, "-m", "fedlora.cli", *run_command, *sets(tiny, run_dir, train__rounds=200)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FEDLORA_CACHE=str(root / "cache")))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_bytes()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = summary_of(run_dir)
    done = summary["rounds_completed"]
    assert summary["status"] == "interrupted" and 1 <= done < 200
    assert len(metrics.read_text().splitlines()) == done
    code, out, err = fedlora(capsys, *run_command, "--resume", run_dir, "--set", f"train.rounds={done + 1}")
    assert code == 0, err
    assert summary_of(run_dir)["status"] == "completed" and summary_of(run_dir)["rounds_completed"] == done + 1
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == list(range(done + 1))


# ---- the two command lines write the same run ------------------------------------------------------


def schema(value, path: str = "") -> set[str]:
    """A JSON value's shape: every key path, and the JSON type at each leaf (lists by their items)."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in schema(v, f"{path}.{k}")} or {f"{path}: {{}}"}
    if isinstance(value, list):
        return {p for v in value for p in schema(v, f"{path}[]")} or {f"{path}: []"}
    kind = {bool: "bool", int: "number", float: "number", str: "str", type(None): "null"}[type(value)]
    return {f"{path}: {kind}"}


def test_flower_in_process_writes_what_fedlora_run_writes(tiny, tmp_path, capsys):
    """`fedlora flower sim --in-process` and `fedlora run` on one config: the same files in the run
    directory, the same summary and checkpoint keys, metrics rows of the same shape (plus the bytes
    Flower carried), and the same last line."""
    pytest.importorskip("flwr")
    dirs = {name: tmp_path / name for name in COMMANDS}
    for name, command in COMMANDS.items():
        code, out, err = fedlora(capsys, *command, *sets(tiny, dirs[name]))
        assert code == 0, err
        assert out.splitlines()[-1] == f"run directory: {dirs[name]}"
    e, f = dirs["embedded"], dirs["flower"]
    files = [sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) for d in (e, f)]
    assert files[0] == files[1] and "metrics.jsonl" in files[0]
    assert set(summary_of(f)) == set(summary_of(e)) and summary_of(f)["engine"] == "flower"
    assert set(torch.load(f / "checkpoint.pt", weights_only=False)) == \
        set(torch.load(e / "checkpoint.pt", weights_only=False))
    erows, frows = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (e, f))
    assert [r["round"] for r in frows] == [r["round"] for r in erows] == [0, 1]
    for erow, frow in zip(erows, frows):
        timing = {k for k in schema(frow) if k.startswith(".node_timing.")}  # each node's times (Flower only)
        assert schema(frow) - timing == schema(erow) | {".bytes_up_sent: number", ".bytes_down_sent: number",
                                                        ".model_loads: number"}
        assert {k.split(".")[2] for k in timing} == {str(c) for c in frow["clients"]}
