"""Experiment tracking: each metrics row, as it is committed, to TensorBoard and/or MLflow.

``run.trackers = ["tensorboard", "mlflow"]`` (either or both; default none). metrics.jsonl stays the
record of a run; a tracker is a view of it, under the same names in both (:func:`flat_metrics`):

    train_loss, bytes_up, bytes_down, train_s, eval_s, wall_s    the row's own numbers
    eval/global/accuracy, eval/global/loss, …                    the global evaluation
    eval/personal/accuracy_weighted, …                           the personal models' summary
    diagnostics/agg_error_rel, diagnostics/basis_overlap,
    diagnostics/rotation_size_mean, …                            the round's diagnostics
    privacy/epsilon, …                                           any numeric value of any block

with the round number (0-based, as in metrics.jsonl) as the step. The resolved config is logged
once per process start: TensorBoard gets it as hparams (the HParams tab) and as the text of
config.toml; MLflow as parameters (``train.lr``, ``strategy.options.lam``: the keys of
:func:`fedlora.config.flat_settings`, values as strings) and a ``config.toml`` artifact.

Where they write:

- TensorBoard: ``RUN_DIR/tensorboard/``; open with ``tensorboard --logdir runs/`` (one TensorBoard
  run per run directory). Scalars are TensorBoard's 32-bit floats, i.e. metrics.jsonl's values to
  about 7 significant digits (its default loader shows no 64-bit scalars); MLflow keeps 64 bits.
- MLflow: ``run.tracking_uri``, or by default a SQLite store beside the run directories,
  ``sqlite:///<parent of RUN_DIR>/mlflow.db`` (artifacts in ``<parent>/mlartifacts/``); open with
  ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. MLflow 3.18's plain folder store
  (``file:``/``mlruns/``) refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true`` (it is in
  maintenance mode), so the default is the local database, which needs no server and works
  offline. Every run goes to the experiment ``fedlora``, as an MLflow run named after the run
  directory; its id is kept in ``RUN_DIR/trackers.json``.

A resumed run continues what its trackers hold: MLflow the same MLflow run (its id from
trackers.json), given the rows it misses (e.g. a round committed just before a crash, or every
round when the tracker is new to the run); TensorBoard's event files are rewritten from
metrics.jsonl (a round cut on resume must not show twice). A tracker that fails mid-run (a
database locked, a full disk) is switched off with a :class:`TrackerWarning`; the run goes on.

Both are optional (``pip install 'fedlora[tracking]'``) and imported only by a run that asks for
them: this module imports neither at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedlora.errors import ConfigError

__all__ = ["TRACKERS", "MLflowTracker", "TensorBoardTracker", "Tracker", "TrackerWarning", "Trackers",
           "flat_metrics", "open_trackers", "require_trackers"]

#: tracker name → the modules it needs
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
}
#: what the default MLflow store (SQLite) needs beyond mlflow-skinny
SQLITE_MODULES = ("sqlalchemy", "alembic")
#: blocks of a row that hold per-client or per-layer detail: kept in metrics.jsonl, not tracked
DETAIL_KEYS = frozenset({"client_loss", "per_client", "per_layer"})
#: a row's keys that are no metric: the step, and who took part
SKIP_KEYS = frozenset({"round", "clients", "failed"})
#: the MLflow experiment every run goes to
EXPERIMENT = "fedlora"
#: the TensorBoard scalars shown as metric columns in the HParams tab (absent ones stay empty)
HPARAM_METRICS = ("eval/global/accuracy", "eval/global/loss", "eval/personal/accuracy_weighted", "train_loss")
TRACKERS_FILE = "trackers.json"


class TrackerWarning(UserWarning):
    """A tracker failed; it is off for the rest of the run, and metrics.jsonl has every row."""


def flat_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's numbers as ``{name: float}``, nested keys joined by ``/``
    (``eval/personal/accuracy_weighted``, ``diagnostics/agg_error_rel``, ``privacy/epsilon``).

    Left out: the round (it is the step), the sampled and failed clients, per-client and per-layer
    detail (``client_loss``, ``per_client``, ``per_layer``), and anything not a finite number
    (None, NaN, booleans, strings, lists)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                if str(k) not in DETAIL_KEYS:
                    walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    walk("", {k: v for k, v in row.items() if k not in SKIP_KEYS})
    return out


def require_trackers(cfg) -> None:
    """Raise ConfigError for a tracker name that is unknown or whose package is missing (cheap:
    nothing is imported), so that a run fails before loading its model."""
    names = list(cfg.run.trackers)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"run.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        modules = TRACKERS[name] + (SQLITE_MODULES if name == "mlflow" and not cfg.run.tracking_uri else ())
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"run.trackers = {names!r}: {name!r} needs {', '.join(missing)}, which is not "
                              "installed: pip install 'fedlora[tracking]'")


class Tracker(Protocol):
    """One experiment tracker. :func:`open_trackers` calls ``log_params`` once, ``catch_up`` with the
    rows already in metrics.jsonl, then ``log_row`` per committed round, and ``close`` at the end
    with the run's status (``"completed"``, ``"interrupted"`` or ``"failed"``)."""

    name: str

    def log_params(self, cfg) -> None: ...

    def catch_up(self, rows: list[dict[str, Any]]) -> None: ...

    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def close(self, status: str = "completed") -> None: ...


def _config_text(cfg) -> str:
    from fedlora.config import to_toml

    return to_toml(cfg)


class TensorBoardTracker:
    """Scalars, hparams and the config's text in ``RUN_DIR/tensorboard/`` (a SummaryWriter). On
    resume the folder's event files are replaced: :meth:`catch_up` writes every row of
    metrics.jsonl again, so TensorBoard shows exactly those rows."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "tensorboard"
        if resume and self.path.is_dir():
            for old in self.path.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.path))
        self.step = 0  # the step the config is shown at

    def log_params(self, cfg) -> None:
        from fedlora.config import flat_settings
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                  for k, v in flat_settings(cfg).items() if v is not None}
        for summary in hparams(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config.toml", "```toml\n" + _config_text(cfg) + "```", self.step)
        self.writer.flush()

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._write(row)
        self.writer.flush()

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._write(row)
        self.writer.flush()

    def _write(self, row: Mapping[str, Any]) -> None:
        for name, value in flat_metrics(row).items():
            self.writer.add_scalar(name, value, row["round"])  # float32: TensorBoard's loader reads no float64

    def close(self, status: str = "completed") -> None:
        self.writer.close()


#: fedlora's end of a run → MLflow's run status
MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


def default_tracking_uri(run_dir: Path) -> str:
    """The local MLflow store beside ``run_dir``: ``sqlite:///<its parent>/mlflow.db``."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db').as_posix()}"


class MLflowTracker:
    """Metrics, params and config.toml of one MLflow run, through ``mlflow.tracking.MlflowClient``
    (no global MLflow state is touched). The run id is kept in ``RUN_DIR/trackers.json``; a resume
    with the same tracking URI continues that run, anything else starts a new one."""

    name = "mlflow"

    def __init__(self, run_dir: Path, tracking_uri: str, resume: bool):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.uri = tracking_uri or default_tracking_uri(self.run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        stored = self._stored() if resume else {}
        self.run_id = None
        if stored.get("tracking_uri") == self.uri and stored.get("run_id"):
            with contextlib.suppress(Exception):  # deleted, or another store: start a new MLflow run
                run = self.client.get_run(stored["run_id"])
                if run.info.lifecycle_stage == "active":
                    self.run_id = run.info.run_id
                    self.client.update_run(self.run_id, status="RUNNING")
        if self.run_id is None:
            self.run_id = self.client.create_run(self._experiment_id(tracking_uri == ""),
                                                 run_name=self.run_dir.name,
                                                 tags={"fedlora.run_dir": str(self.run_dir.resolve())}).info.run_id
            self._store()

    def _experiment_id(self, local: bool) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        where = (self.run_dir.resolve().parent / "mlartifacts").as_uri() if local else None
        return self.client.create_experiment(EXPERIMENT, artifact_location=where)

    def _stored(self) -> dict[str, Any]:
        try:
            value = json.loads((self.run_dir / TRACKERS_FILE).read_text()).get("mlflow", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return value if isinstance(value, dict) else {}

    def _store(self) -> None:
        from fedlora.files import atomic_write

        path = self.run_dir / TRACKERS_FILE
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data["mlflow"] = {"tracking_uri": self.uri, "run_id": self.run_id}
        atomic_write(path, json.dumps(data, indent=2) + "\n")

    def log_params(self, cfg) -> None:
        """Params not yet in the run are logged; MLflow params cannot change, so a resume's changed
        values (e.g. more rounds) go to the tag ``fedlora.changed_params`` and config.toml is replaced."""
        from mlflow.entities import Param, RunTag

        from fedlora.config import flat_settings

        logged = self.client.get_run(self.run_id).data.params
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat_settings(cfg).items()}
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [f"{k}: {logged[k]} → {v}" for k, v in values.items() if k in logged and logged[k] != v]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=[RunTag("fedlora.changed_params", "; ".join(changed))])
        self.client.log_text(self.run_id, _config_text(cfg), "config.toml")

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """Log the rows whose round the MLflow run does not hold yet (every row has ``wall_s``)."""
        done = {m.step for m in self.client.get_metric_history(self.run_id, "wall_s")}
        for row in rows:
            if row["round"] not in done:
                self.log_row(row)

    def log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(k, v, ms, row["round"]) for k, v in flat_metrics(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, status: str = "completed") -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


class Trackers:
    """The run's trackers as one: each call goes to every tracker still on. A tracker that raises is
    closed and switched off with one :class:`TrackerWarning`; the run is never stopped by one."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:
                self.trackers.remove(t)
                warnings.warn(f"the {t.name} tracker failed ({type(e).__name__}: {e}); it is off for the rest "
                              "of this run; metrics.jsonl has every row", TrackerWarning, stacklevel=3)
                if method != "close":
                    with contextlib.suppress(Exception):
                        t.close("failed")

    def log_params(self, cfg) -> None:
        self._each("log_params", cfg)

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        self._each("catch_up", rows)

    def log_row(self, row: Mapping[str, Any]) -> None:
        """Log one committed round's row."""
        self._each("log_row", row)

    def close(self, status: str = "completed") -> None:
        """Close every tracker; ``status`` is ``"completed"``, ``"interrupted"`` or anything else (failed)."""
        self._each("close", status)
        self.trackers = []


def open_trackers(cfg, run_dir: str | Path, resume: bool) -> Trackers:
    """The trackers ``cfg.run.trackers`` asks for, on the run directory ``run_dir`` (which exists),
    each given the config and the rows metrics.jsonl already holds. None asked for: an empty
    :class:`Trackers`, and nothing imported. An unknown name or a missing package raises ConfigError
    (:func:`require_trackers`); a tracker that cannot open is left out with a TrackerWarning."""
    require_trackers(cfg)
    run_dir = Path(run_dir)
    opened = []
    for name in cfg.run.trackers:
        try:
            opened.append(TensorBoardTracker(run_dir, resume) if name == "tensorboard" else
                          MLflowTracker(run_dir, cfg.run.tracking_uri, resume))
        except Exception as e:
            warnings.warn(f"the {name} tracker could not open ({type(e).__name__}: {e}); the run goes on "
                          "without it; metrics.jsonl has every row", TrackerWarning, stacklevel=2)
    trackers = Trackers(opened)
    if trackers:
        from fedlora.runtime.rundir import RunDir

        trackers.log_params(cfg)
        trackers.catch_up(RunDir(run_dir).read_metrics())
    return trackers
