"""A node's personal states on its own disk, by round, so that a resumed run finds each client's
personal state (FedSA's B) as of the last round the server committed, and a node restarted between
rounds keeps it. Nothing personal leaves the node.

Where: ``node_config["fedlora-state-dir"]``, else ``$FEDLORA_CACHE/flower-nodes`` (default
``~/.cache/fedlora/flower-nodes``); one folder per run (the token the server sends with every
message, kept in its checkpoint), one file per client. A file holds the states by the round that
made them. A message for round t reads the newest state from a round before t (a state from round t
itself is a try of a round the server did not commit); saving round t's state keeps that one too.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from fedlora.factors import Adapter
from fedlora.files import atomic_write


def store_path(node_config, token: str, client: int) -> Path:
    """The file of ``client``'s personal states in the run ``token``."""
    root = node_config.get("fedlora-state-dir") or Path(
        os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora")) / "flower-nodes"
    if not token or not token.isalnum():
        raise ValueError(f"run token {token!r}: expected letters and digits")
    return Path(str(root)) / token / f"client-{client}.pt"


def _read(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    return torch.load(path, weights_only=True)


def load_personal(path: Path, round: int) -> Adapter | None:
    """The newest personal state saved in a round before ``round``; None if there is none."""
    entries = _read(path)
    before = [r for r in entries if r < round]
    return Adapter.from_state_dict(entries[max(before)]) if before else None


def save_personal(path: Path, round: int, adapter: Adapter) -> None:
    """Keep ``adapter`` as the state made in ``round``, and the newest one before it."""
    entries = _read(path)
    before = [r for r in entries if r < round]
    keep = {r: v for r, v in entries.items() if before and r == max(before)}
    keep[round] = {k: v.detach().to("cpu") for k, v in adapter.to_state_dict().items()}
    buf = io.BytesIO()
    torch.save(keep, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
