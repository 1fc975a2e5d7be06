"""The run directory: everything a run writes, each file written atomically.

::

    RUN_DIR/
      config.toml              the resolved config (what ran, after --set)
      partition.json, .png     per-client sizes and label counts, and their plot
      metrics.jsonl            one JSON row per completed round, flushed as it is written
      checkpoint.pt            the state after the last completed round (replaced atomically)
      summary.json             headline numbers and status; written at the end (or on Ctrl-C,
                               SIGTERM or a failed round)
      initial_eval.json        only with lora.init_adapter: the start adapter's global evaluation
      adapter/                 the final global adapter in PEFT format:
        adapter_config.json      PeftModel.from_pretrained(base, RUN_DIR/adapter) loads it
        adapter_model.safetensors
      base_delta.safetensors   only for strategies that merge into the base (fedex, flora): the total
                               change to the frozen base weights, keyed by the base model's weight
                               names; add it to the base before loading the adapter
                               (``fedlora.runtime.model.load_run_model`` does both)

A temporary file plus ``os.replace`` makes every write all-or-nothing: an interrupted run leaves
the previous complete version of each file. metrics.jsonl is appended to, a row then the
checkpoint, so a process killed between the two leaves one row ahead of the checkpoint, and one
killed mid-write a torn last line: :meth:`RunDir.resume_point` accepts exactly those two and
refuses anything else (a damaged row, rows the checkpoint does not explain).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedlora.config import RESUMABLE_KEYS, RunConfig, format_diff, load_config, settings_diff, to_toml
from fedlora.errors import ConfigError
from fedlora.files import atomic_torch_save, atomic_write
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies.base import GlobalState

__all__ = ["CHECKPOINT_VERSION", "ResumePoint", "RunDir", "dumps"]

CHECKPOINT_VERSION = 1
#: the global evaluation of the start adapter (``lora.init_adapter``), before round 1
INITIAL_EVAL = "initial_eval.json"


def _json_safe(value: Any) -> Any:
    """NaN and Inf become null (JSON has neither); tensors and numpy scalars become numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return _json_safe(value.tolist())
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return value


def dumps(value: Any) -> str:
    return json.dumps(_json_safe(value), allow_nan=False)


def _parse_row(line: bytes) -> dict[str, Any] | None:
    """A metrics row from one line, or None if it is not one (not JSON, or no integer round)."""
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    ok = isinstance(row, dict) and isinstance(row.get("round"), int) and not isinstance(row["round"], bool)
    return row if ok else None


@dataclass
class ResumePoint:
    """Where a resumed run continues (:meth:`RunDir.resume_point`)."""

    checkpoint: dict[str, Any] | None  # None: no round had completed
    lines: list[bytes]  # the metrics rows of the completed rounds, as written
    redone: int | None = None  # a round whose row was written after the checkpoint; it runs again
    torn_line: int | None = None  # the line number of a torn last line of metrics.jsonl

    @property
    def round(self) -> int:
        """The next round to run (= the rounds completed)."""
        return len(self.lines)


def _pairs_to_tensors(pairs: Mapping[str, LoRAPair] | None) -> dict[str, Tensor] | None:
    if pairs is None:
        return None
    return Adapter(dict(pairs)).to_state_dict()


class RunDir:
    """A run's folder. ``RunDir.create`` starts one; ``RunDir.open`` reopens one to resume."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @staticmethod
    def check_location(cfg: RunConfig) -> None:
        """Raise ConfigError, naming the key, if a new run directory cannot be made where ``cfg`` puts
        it: a file on the way, a folder that cannot be written, or a ``run.dir`` already in use.
        Cheap, so that a run checks it before loading a model."""
        key, path = ("run.dir", Path(cfg.run.dir)) if cfg.run.dir else ("run.output_dir", Path(cfg.run.output_dir))
        if cfg.run.dir and path.is_dir() and any(path.iterdir()):
            raise ConfigError(f"run.dir {str(path)!r} exists and is not empty; resume it with --resume or "
                              "choose another")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{key} = {str(path)!r}: {str(existing)!r} is a file, not a folder")
        try:  # the only sure test of "can a folder be made here" is making one
            os.rmdir(tempfile.mkdtemp(prefix=".fedlora-probe-", dir=existing))
        except OSError as e:
            raise ConfigError(f"{key} = {str(path)!r}: cannot create a folder in {str(existing)!r} "
                              f"({e.strerror})") from e

    @classmethod
    def create(cls, cfg: RunConfig) -> RunDir:
        """A fresh run directory (``run.dir``, or ``output_dir/name``, suffixed -2, -3… if taken)."""
        cls.check_location(cfg)
        if cfg.run.dir:
            path = Path(cfg.run.dir)
        else:
            base = Path(cfg.run.output_dir) / cfg.run.name
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        rd = cls(path)
        rd.write_config(cfg)
        return rd

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory, to resume; it must hold config.toml."""
        rd = cls(Path(path))
        if not (rd.path / "config.toml").is_file():
            raise ConfigError(f"--resume {str(path)!r}: no config.toml there, so it is not a fedlora run directory")
        return rd

    @staticmethod
    def command_config(config: str | None, overrides: list[str], resume: str | None) -> RunConfig:
        """The config a ``run`` / ``flower sim`` command line asks for: ``config`` with the overrides,
        or with ``--resume`` the run's own config.toml with them (a config file given too is ignored,
        and the command says so)."""
        if not resume:
            return load_config(config, overrides)
        if config:
            print(f"fedlora: --resume uses the config stored in {resume}; ignoring {config}")
        return load_config(RunDir.open(resume).path / "config.toml", overrides)

    # ---- resuming ----------------------------------------------------------------------------------
    def check_resume_config(self, cfg: RunConfig) -> None:
        """A resumed run may change only what leaves the trained model's shape and data alone (more
        rounds, the evaluation cadence, the display: ``RESUMABLE_KEYS``); anything else raises
        ConfigError naming each key, old → new."""
        diff = settings_diff(load_config(self.path / "config.toml"), cfg, ignore=RESUMABLE_KEYS)
        if diff:
            raise ConfigError(f"--resume {str(self.path)!r}: a resumed run keeps the settings it started with; "
                              f"this changes {format_diff(diff)}. Start a new run for other settings")

    def finished_summary(self, rounds: int) -> dict[str, Any] | None:
        """summary.json when it says the run completed exactly ``rounds`` rounds, else None."""
        try:
            summary = json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        done = isinstance(summary, dict) and summary.get("status") == "completed"
        return summary if done and summary.get("rounds_completed") == rounds else None

    def resume_point(self) -> ResumePoint:
        """Where the run continues: its checkpoint and the metrics rows of the rounds it covers.

        Reads only. Beyond those rows, metrics.jsonl may hold one row written after the last
        checkpoint (a kill between the two writes; that round is re-done) and a torn last line;
        :meth:`cut_metrics` removes both. Anything else (more rows ahead, rows missing for rounds
        the checkpoint covers, rows with no checkpoint at all) raises ConfigError naming the files:
        resuming would lose or contradict rows already written."""
        ckpt = self.load_checkpoint()
        done = ckpt["round"] if ckpt is not None else 0
        lines, torn = self._metrics_lines()
        where = f"{str(self.checkpoint_path)!r} is after round {done}" if ckpt is not None else \
            f"there is no {str(self.checkpoint_path)!r}"
        if len(lines) < done:
            raise ConfigError(f"{str(self.metrics_path)!r} has rows for {len(lines)} rounds but {where}: rows of "
                              "completed rounds are missing, so a resumed run would not match its metrics")
        if len(lines) > done + 1:
            raise ConfigError(f"{str(self.metrics_path)!r} has rows for {len(lines)} rounds but {where}; resuming "
                              "would re-run and drop rounds already logged. Move the directory aside and start "
                              "a new run")
        return ResumePoint(ckpt, lines[:done], redone=done if len(lines) > done else None, torn_line=torn)

    def cut_metrics(self, point: ResumePoint) -> None:
        """Cut metrics.jsonl back to ``point``'s rows (their bytes as written), if anything follows them."""
        if point.redone is not None or point.torn_line is not None:
            atomic_write(self.metrics_path, b"".join(point.lines))

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write(self.path / "config.toml", to_toml(cfg))

    def write_json(self, name: str, value: Any) -> None:
        atomic_write(self.path / name, json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")

    def read_json(self, name: str) -> Any:
        """A JSON file of the run (``write_json``'s), or None when there is none."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e

    # ---- metrics --------------------------------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's row and flush it to disk before returning."""
        with open(self.metrics_path, "a") as f:
            f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row, in round order; a torn last line (a process killed mid-write) is left out, a
        damaged row before it raises ConfigError naming the file and line."""
        return [json.loads(line) for line in self._metrics_lines()[0]]

    def _metrics_lines(self) -> tuple[list[bytes], int | None]:
        """The intact rows' lines (bytes, newline included) and the line number of a torn last line
        (None when the file ends cleanly). Row i must be round i."""
        if not self.metrics_path.is_file():
            return [], None
        lines = self.metrics_path.read_bytes().split(b"\n")
        ended = lines[-1] == b""  # every complete row ends with a newline
        if ended:
            lines.pop()
        out = []
        for number, line in enumerate(lines, 1):
            row = _parse_row(line)
            if number == len(lines) and (row is None or not ended):
                return out, number
            if row is None:
                raise ConfigError(f"{self.metrics_path}:{number}: not a metrics row (damaged); the rows after it "
                                  "cannot be trusted. Repair or remove the line by hand")
            if row["round"] != number - 1:
                raise ConfigError(f"{self.metrics_path}:{number}: holds round {row['round'] + 1}, expected round "
                                  f"{number}; the rows are out of order")
            out.append(line + b"\n")
        return out, None

    # ---- one completed round -----------------------------------------------------------------------
    def commit_round(self, row: Mapping[str, Any], state: GlobalState, personal: Mapping[Any, Adapter | None],
                     base_merged: Mapping[str, Tensor], extra: Mapping[str, Any]) -> None:
        """Write a round's metrics row, then its checkpoint. Call it inside
        :func:`fedlora.runtime.signals.signals_deferred` so that a Ctrl-C or SIGTERM cannot leave
        metrics.jsonl a row ahead of the checkpoint."""
        self.append_metrics(row)
        self.save_checkpoint(state, personal, base_merged, extra)

    # ---- checkpoint -----------------------------------------------------------------------------------
    def save_checkpoint(self, state: GlobalState, personal: Mapping[Any, Adapter | None],
                        base_merged: Mapping[str, Tensor], extra: Mapping[str, Any]) -> None:
        """The state after a completed round, written atomically. ``state.round`` is the next round."""
        blob = {
            "version": CHECKPOINT_VERSION,
            "round": state.round,
            "state": {"adapter": state.adapter.to_state_dict(), "scaling": state.scaling,
                      "base_delta": _pairs_to_tensors(state.base_delta), "server_opt": dict(state.server_opt),
                      "info": dict(state.info)},
            "personal": {k: (None if v is None else v.to_state_dict()) for k, v in personal.items()},
            "base_merged": dict(base_merged),
            "extra": dict(extra),
        }
        atomic_torch_save(blob, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint as {round, state: GlobalState, personal, base_merged, extra}; None if
        the run has none. An unreadable file raises ConfigError naming it."""
        if not self.checkpoint_path.is_file():
            return None
        try:
            blob = torch.load(self.checkpoint_path, weights_only=False, map_location="cpu")
            s = blob["state"]
            base_delta = None
            if s["base_delta"] is not None:
                base_delta = Adapter.from_state_dict(s["base_delta"]).layers
            state = GlobalState(adapter=Adapter.from_state_dict(s["adapter"]), round=int(blob["round"]),
                                scaling=float(s["scaling"]), base_delta=base_delta, server_opt=s["server_opt"],
                                info=s["info"])
            personal = {k: (None if v is None else Adapter.from_state_dict(v)) for k, v in blob["personal"].items()}
        except Exception as e:
            raise ConfigError(f"checkpoint {str(self.checkpoint_path)!r} is unreadable ({type(e).__name__}: {e}); "
                              "it may be truncated") from e
        return {"round": state.round, "state": state, "personal": personal, "base_merged": blob["base_merged"],
                "extra": blob.get("extra", {})}

    # ---- the final adapter ---------------------------------------------------------------------------
    def save_adapter(self, adapter: Adapter, *, scaling: float, base_model: str, task_type: str,
                     target_modules: list[str], dropout: float, base_delta: Mapping[str, Tensor]) -> Path:
        """Write ``adapter/`` in PEFT's format, plus ``base_delta.safetensors`` when the base changed.

        ``lora_alpha`` is written as scaling·r, so PEFT's alpha/r reproduces the scaling the global
        adapter was aggregated for (strategies may scale differently from alpha/r).
        """
        from peft import LoraConfig
        from safetensors.torch import save as save_safetensors

        ranks = set(adapter.ranks().values())
        if len(ranks) != 1:
            raise ConfigError(f"the global adapter has mixed ranks {sorted(ranks)}; cannot write one PEFT config")
        rank = ranks.pop()
        out = self.path / "adapter"
        out.mkdir(parents=True, exist_ok=True)
        cfg = LoraConfig(task_type=task_type, r=rank, lora_alpha=scaling * rank, lora_dropout=dropout,
                         target_modules=target_modules, base_model_name_or_path=base_model)
        config = cfg.to_dict()
        config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT; JSON needs a list
        atomic_write(out / "adapter_config.json", json.dumps(config, indent=2, default=list) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.to_state_dict().items()}
        atomic_write(out / "adapter_model.safetensors", save_safetensors(tensors, metadata={"format": "pt"}))
        if base_delta:
            atomic_write(self.path / "base_delta.safetensors",
                         save_safetensors({k: v.contiguous() for k, v in base_delta.items()}, metadata={"format": "pt"}))
        return out
