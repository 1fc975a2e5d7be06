"""Atomic file writes, the one way fedlora writes a file a reader may see: the data goes to a
temporary file in the target folder, is flushed to disk, and replaces the target with ``os.replace``,
so a reader (or a run resumed after a crash or a signal) sees the old file or the new one, never
half of one. A failed write leaves no temporary file behind. New files get the usual permissions
(0666 less the umask), not ``mkstemp``'s private 0600."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path``, all or nothing."""
    raw = data.encode() if isinstance(data, str) else data
    return atomic_stream(path, lambda f: f.write(raw))


def atomic_json(path: str | os.PathLike, value: Any, **dumps: Any) -> Path:
    """Write ``value`` as JSON (``json.dumps`` keyword arguments; default indent 2) and a newline."""
    return atomic_write(path, json.dumps(value, **{"indent": 2, **dumps}) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path``, all or nothing."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getvalue())


def atomic_figure(fig, path: str | os.PathLike, **savefig: Any) -> Path:
    """A matplotlib figure as PNG (``savefig`` keyword arguments), all or nothing. The caller
    closes a pyplot figure."""
    return atomic_stream(path, lambda f: fig.savefig(f, format="png", **savefig))
