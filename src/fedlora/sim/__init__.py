"""The embedded engine: every client simulated in one process on one shared base model.

``fedlora.sim.run(config)`` runs a federation (the shared round loop, :mod:`fedlora.runtime.loop`,
over the in-process transport, :mod:`fedlora.sim.transport`); ``fedlora run CONFIG.toml`` is its
command line (:mod:`fedlora.sim.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run(cfg, *, resume: str | Path | None = None, loss_fn=None, progress: bool | None = None,
        log=None) -> dict[str, Any]:
    """Run (or resume) ``cfg`` in this process; see :func:`fedlora.runtime.loop.run`.
    ``loss_fn(model, batch, client_id)`` replaces the task's loss (tests use it to inject failures)."""
    from fedlora.runtime.loop import run as run_loop
    from fedlora.sim.transport import InProcess

    return run_loop(cfg, InProcess(loss_fn), resume=resume, progress=progress, log=log)
