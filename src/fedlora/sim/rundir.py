"""The run directory: everything a run writes, each file written atomically.

::

    RUN_DIR/
      config.toml              the resolved config (what ran, after --set)
      partition.json, .png     per-client sizes and label counts, and their plot
      metrics.jsonl            one JSON row per completed round, flushed as it is written
      checkpoint.pt            the state after the last completed round (replaced atomically)
      summary.json             headline numbers; written at the end (or on Ctrl-C)
      adapter/                 the final global adapter in PEFT format:
        adapter_config.json      PeftModel.from_pretrained(base, RUN_DIR/adapter) loads it
        adapter_model.safetensors
      base_delta.safetensors   only for strategies that merge into the base (fedex, flora): the total
                               change to the frozen base weights, keyed by the base model's weight
                               names; add it to the base before loading the adapter
                               (``fedlora.sim.model.load_run_model`` does both)

A temporary file plus ``os.replace`` makes every write all-or-nothing: an interrupted run leaves
the previous complete version of each file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedlora.config import RunConfig, to_toml
from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies.base import GlobalState

CHECKPOINT_VERSION = 1


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back for the block, then raise KeyboardInterrupt after it if one came. Only the
    main thread can install a handler; elsewhere (e.g. a Flower ServerApp thread) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(*caught[0])  # Python's default handler raises KeyboardInterrupt
    elif caught and previous != signal.SIG_IGN:
        raise KeyboardInterrupt


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

    @classmethod
    def create(cls, cfg: RunConfig) -> RunDir:
        """A fresh run directory (``run.dir``, or ``output_dir/name``, suffixed -2, -3… if taken)."""
        if cfg.run.dir:
            path = Path(cfg.run.dir)
            if path.exists() and any(path.iterdir()):
                raise ConfigError(f"run.dir {str(path)!r} exists and is not empty; resume it with --resume or "
                                  "choose another")
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

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write(self.path / "config.toml", to_toml(cfg))

    def write_json(self, name: str, value: Any) -> None:
        atomic_write(self.path / name, json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")

    # ---- metrics --------------------------------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's row and flush it to disk before returning."""
        with open(self.metrics_path, "a") as f:
            f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete rows (a torn last line from a killed process is ignored)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def keep_metrics_before(self, round_index: int) -> list[dict[str, Any]]:
        """Drop rows of rounds ≥ ``round_index`` (written after the last checkpoint); returns the kept rows."""
        rows = [r for r in self.read_metrics() if r["round"] < round_index]
        atomic_write(self.metrics_path, "".join(dumps(r) + "\n" for r in rows))
        return rows

    # ---- one completed round -----------------------------------------------------------------------
    def commit_round(self, row: Mapping[str, Any], state: GlobalState, personal: Mapping[Any, Adapter | None],
                     base_merged: Mapping[str, Tensor], extra: Mapping[str, Any]) -> None:
        """Write a round's metrics row, then its checkpoint. Call it inside :func:`sigint_deferred`
        so that a Ctrl-C cannot leave metrics.jsonl a row ahead of the checkpoint."""
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
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(f".{self.checkpoint_path.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.checkpoint_path)

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
