"""Experiment tracking (``run.trackers``) and ``--quiet``, on the tiny random BERT.

TensorBoard's event files are read back with TensorBoard's own EventAccumulator and MLflow's runs
with MlflowClient; both must hold exactly the numbers of metrics.jsonl, flattened here from the
rows themselves (not from what a tracker wrote), with the round as the step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedlora.config import flat_settings, load_config
from fedlora.errors import ConfigError
from fedlora.sim import run
from sim_tiny import tiny_fixture, tiny_overrides

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no hub is reachable here (conftest), nor is MLflow's

tiny = tiny_fixture("tracking")

#: what the trackers must not log: the step and who took part (a row's own keys), and per-client and
#: per-layer detail (at any depth)
NOT_TRACKED_TOP = {"round", "clients", "failed"}
NOT_TRACKED = {"client_loss", "per_client", "per_layer"}


def cfg_for(tiny, name, *more, **extra):
    root, model, data = tiny
    return load_config(None, [*tiny_overrides(root / "runs", model, data, run__name=f'"{name}"', **extra), *more])


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def expected_series(rows) -> dict[str, dict[int, float]]:
    """name → {round: value} for every finite number in the rows, recomputed from metrics.jsonl."""
    out: dict[str, dict[int, float]] = {}

    def walk(prefix, value, step):
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in NOT_TRACKED:
                    walk(f"{prefix}/{k}" if prefix else k, v, step)
        elif type(value) in (int, float) and math.isfinite(value):
            out.setdefault(prefix, {})[step] = float(value)

    for r in rows:
        walk("", {k: v for k, v in r.items() if k not in NOT_TRACKED_TOP}, r["round"])
    return out


def tensorboard_series(run_dir) -> dict[str, dict[int, float]]:
    """name → {step: value} of every scalar in RUN_DIR/tensorboard, as TensorBoard reads it; a
    step logged twice fails (a resumed run must not show a round twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def as_float32(series: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """TensorBoard's scalars are 32-bit floats: the values metrics.jsonl's numbers round to."""
    return {k: {step: float(np.float32(v)) for step, v in s.items()} for k, s in series.items()}


def mlflow_run(run_dir):
    """(client, run) of the MLflow run whose id trackers.json holds."""
    from mlflow.tracking import MlflowClient

    stored = json.loads((Path(run_dir) / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=stored["tracking_uri"])
    return client, client.get_run(stored["run_id"])


def mlflow_series(client, mlrun) -> dict[str, dict[int, float]]:
    out = {}
    for key in mlrun.data.metrics:
        history = client.get_metric_history(mlrun.info.run_id, key)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
        out[key] = {m.step: m.value for m in history}
    return out


def mlflow_param(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def test_flat_metrics_names_and_what_is_left_out():
    from fedlora.tracking import flat_metrics

    row = {"round": 3, "clients": [0, 1], "failed": [{"client": 2, "error": "nan"}], "train_loss": 0.5,
           "client_loss": {"0": 0.4}, "bytes_up": 10, "wall_s": 1.5, "engine_note": "x", "skipped": None,
           "eval": {"global": {"accuracy": 0.75, "loss": float("nan"), "samples": ["a"]},
                    "personal": {"accuracy_weighted": 0.6, "per_client": {"0": 0.6}}},
           "diagnostics": {"agg_error_rel": 0.01, "personalised": False, "aligned": True, "rotation_size_mean": 0.2,
                           "per_layer": {"q": {"agg_error": 1.0}}},
           "privacy": {"epsilon": 2.5, "delta": 1e-5}}
    assert flat_metrics(row) == {
        "train_loss": 0.5, "bytes_up": 10.0, "wall_s": 1.5, "eval/global/accuracy": 0.75,
        "eval/personal/accuracy_weighted": 0.6, "diagnostics/agg_error_rel": 0.01,
        "diagnostics/rotation_size_mean": 0.2, "privacy/epsilon": 2.5, "privacy/delta": 1e-5}
    assert flat_metrics({"round": 0, "eval": None, "diagnostics": None, "train_loss": None}) == {}


def test_tensorboard_and_mlflow_hold_the_rows_of_metrics_jsonl(tiny):
    """fedrot (rotation sizes), evaluation every 2nd of 3 rounds (rows without eval): every scalar
    of both trackers equals metrics.jsonl at its round, and the params equal the config."""
    root = tiny[0]
    cfg = cfg_for(tiny, "both", 'run.trackers=["tensorboard", "mlflow"]', strategy__name='"fedrot"', train__rounds=3,
                  eval__every=2)
    summary = run(cfg, log=lambda s: None)
    d = Path(summary["run_dir"])
    rows = rows_of(d)
    want = expected_series(rows)
    assert [r["round"] for r in rows] == [0, 1, 2] and "eval/global/accuracy" in want
    assert set(want["eval/global/accuracy"]) == {1, 2}  # round 0 was not evaluated: no value at step 0
    for name in ("eval/global/accuracy", "eval/global/loss", "eval/personal/accuracy_weighted", "train_loss",
                 "diagnostics/agg_error_rel", "diagnostics/basis_overlap", "diagnostics/rotation_size_mean",
                 "bytes_up", "bytes_down"):
        assert name in want, name

    assert tensorboard_series(d) == as_float32(want)

    # the default MLflow store: a SQLite database beside the run directories
    stored = json.loads((d / "trackers.json").read_text())["mlflow"]
    assert stored["tracking_uri"] == f"sqlite:///{(root / 'runs' / 'mlflow.db').resolve().as_posix()}"
    client, mlrun = mlflow_run(d)
    assert mlflow_series(client, mlrun) == want
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == d.name
    assert client.get_experiment(mlrun.info.experiment_id).name == "fedlora"
    stored_cfg = load_config(d / "config.toml")
    assert mlrun.data.params == {k: mlflow_param(v) for k, v in flat_settings(stored_cfg).items()}
    assert mlrun.data.params["strategy.name"] == "fedrot" and mlrun.data.params["train.rounds"] == "3"


def test_resume_continues_the_same_mlflow_run_and_a_new_tracker_gets_the_earlier_rows(tiny):
    """Ctrl-C in round 2 (the MLflow run is KILLED), resumed with TensorBoard added, resumed again."""
    cfg = cfg_for(tiny, "resumed", 'run.trackers=["mlflow"]', train__rounds=2)
    from fedlora.runtime.federation import prepare

    task, calls = prepare(cfg, log=lambda s: None).task, [0]

    def stop_in_round_2(model, batch, client):  # the task's own loss, until one step into round 2
        calls[0] += 1
        if calls[0] > 3 * 2 + 1:  # a round: 3 clients × 2 steps
            raise KeyboardInterrupt
        return task.loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(cfg, loss_fn=stop_in_round_2, log=lambda s: None)
    d = sorted((tiny[0] / "runs").glob("resumed*"))[-1]
    assert len(rows_of(d)) == 1 and not (d / "tensorboard").exists()
    client, mlrun = mlflow_run(d)
    assert mlrun.info.status == "KILLED" and mlflow_series(client, mlrun) == expected_series(rows_of(d))
    run_id = mlrun.info.run_id

    more = load_config(d / "config.toml", ["train.rounds=3", 'run.trackers=["mlflow", "tensorboard"]'])
    run(more, resume=d, log=lambda s: None)
    rows = rows_of(d)
    want = expected_series(rows)
    assert [r["round"] for r in rows] == [0, 1, 2]
    client, mlrun = mlflow_run(d)
    assert mlrun.info.run_id == run_id  # the same MLflow run, with the rows of both sessions once each
    assert mlflow_series(client, mlrun) == want
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.rounds"] == "2"  # MLflow params are immutable: the change is a tag
    assert "train.rounds: 2 → 3" in mlrun.data.tags["fedlora.changed_params"]
    assert tensorboard_series(d) == as_float32(want)  # tensorboard, new on resume, has round 0 too

    # resumed again with both trackers: TensorBoard is rewritten, not appended to
    run(load_config(d / "config.toml", ["train.rounds=4"]), resume=d, log=lambda s: None)
    want = expected_series(rows_of(d))
    assert set(want["train_loss"]) == {0, 1, 2, 3}
    assert tensorboard_series(d) == as_float32(want)
    client, mlrun = mlflow_run(d)
    assert mlrun.info.run_id == run_id and mlflow_series(client, mlrun) == want


def test_a_failed_run_ends_its_mlflow_run_failed(tiny):
    """A NaN loss in round 2 with train.fail_fast: the run raises, the MLflow run is FAILED and holds round 1."""
    from fedlora.errors import FedLoRAError
    from fedlora.runtime.federation import prepare

    cfg = cfg_for(tiny, "failed", 'run.trackers=["mlflow"]', train__fail_fast="true")
    task, calls = prepare(cfg, log=lambda s: None).task, [0]

    def nan_in_round_2(model, batch, client):
        calls[0] += 1
        loss = task.loss(model, batch)
        return loss * float("nan") if calls[0] > 3 * 2 else loss

    with pytest.raises(FedLoRAError):
        run(cfg, loss_fn=nan_in_round_2, log=lambda s: None)
    d = sorted((tiny[0] / "runs").glob("failed*"))[-1]
    client, mlrun = mlflow_run(d)
    assert mlrun.info.status == "FAILED" and len(rows_of(d)) == 1
    assert mlflow_series(client, mlrun) == expected_series(rows_of(d))


def test_unknown_or_repeated_tracker_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match=r"run\.trackers = \['wandb'\]: each must be one of tensorboard, mlflow"):
        cfg_for(tiny, "bad", 'run.trackers=["wandb"]')
    with pytest.raises(ConfigError, match=r"run\.trackers = \['mlflow', 'mlflow'\]: names a tracker twice"):
        cfg_for(tiny, "bad", 'run.trackers=["mlflow", "mlflow"]')
    with pytest.raises(ConfigError, match=r"run\.trackers: expected a list of strings"):
        cfg_for(tiny, "bad", 'run.trackers="mlflow"')


def test_a_missing_tracker_package_names_the_extra_before_anything_is_written(tiny, monkeypatch):
    import importlib.util

    import fedlora.tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(fedlora.tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    root = tiny[0]
    cfg = cfg_for(tiny, "missing", 'run.trackers=["mlflow"]', run__output_dir=f'"{root / "missing-out"}"')
    with pytest.raises(ConfigError, match=r"'mlflow' needs mlflow, which is not installed: "
                                          r"pip install 'fedlora\[tracking\]'"):
        run(cfg, log=lambda s: None)
    assert not (root / "missing-out").exists()  # refused before the run directory (or the model)


def test_a_failing_tracker_warns_once_and_the_run_completes(tiny, monkeypatch):
    from fedlora.tracking import TensorBoardTracker, TrackerWarning

    calls = []

    def broken(self, row):
        calls.append(row["round"])
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log_row", broken)
    cfg = cfg_for(tiny, "broken", 'run.trackers=["tensorboard"]', train__rounds=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(cfg, log=lambda s: None)
    ours = [w for w in caught if issubclass(w.category, TrackerWarning)]
    assert len(ours) == 1 and "tensorboard tracker failed (OSError: disk full)" in str(ours[0].message)
    assert calls == [0]  # switched off after its first failure
    assert summary["status"] == "completed" and len(rows_of(summary["run_dir"])) == 3


def _no_tracker_modules() -> str:
    return ("bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard') "
            "or m.startswith('torch.utils.tensorboard'))\nassert not bad, bad\n")


@pytest.mark.slow
def test_no_tracker_module_is_imported_without_trackers(tiny):
    """Importing fedlora, and a whole run with ``run.trackers = []``, import neither tracker."""
    root, model, data = tiny
    overrides = tiny_overrides(root / "runs", model, data, run__name='"no-trackers"', train__rounds=1)
    script = ("import sys, json\n"
              "import fedlora, fedlora.cli, fedlora.sim, fedlora.runtime.loop, fedlora.tracking, fedlora.config\n"
              + _no_tracker_modules() +
              "from fedlora.config import load_config\nfrom fedlora.sim import run\n"
              "summary = run(load_config(None, json.loads(sys.argv[1])), log=lambda s: None)\n"
              "assert summary['status'] == 'completed'\n" + _no_tracker_modules())
    done = subprocess.run([sys.executable, "-c", script, json.dumps(overrides)], capture_output=True, text=True,
                          env={**os.environ, "FEDLORA_CACHE": str(root / "cache")}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


BAR_MARKS = ("%|", "it/s", "examples/s", "Map", "Generating", "Casting", "Loading weights", "━", "ETA")


@pytest.mark.slow
def test_quiet_cli_prints_no_progress_bar(tiny, tmp_path):
    """``fedlora run`` as a subprocess, with a fresh datasets cache (datasets draws its split
    generation and cast bars) and rich forced to draw as on a terminal: the command without --quiet
    shows both kinds of bar; with --quiet, or run.progress = false, neither stream holds any."""
    root, model, data = tiny

    def fedlora_run(name, *args):
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / f"hf-{name}"), "FEDLORA_CACHE": str(tmp_path / name),
               "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1", "COLUMNS": "120"}
        env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
        env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        overrides = tiny_overrides(tmp_path / "runs", model, data, run__name=f'"{name}"', run__progress="true",
                                   train__rounds=2)
        cmd = [sys.executable, "-m", "fedlora.cli", "run", *[a for o in overrides for a in ("--set", o)], *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "completed 2 rounds" in done.stdout
        return done.stdout + done.stderr

    noisy = fedlora_run("noisy")
    assert "%|" in noisy and "Generating train split" in noisy  # datasets' bars
    assert "━" in noisy  # fedlora's own rich bar
    for name, args in (("quiet", ["--quiet"]), ("no-progress", ["--set", "run.progress=false"])):
        out = fedlora_run(name, *args)
        shown = [mark for mark in BAR_MARKS if mark in out]
        assert not shown, f"progress bar output {shown} with {args}:\n{out[-3000:]}"
