"""The on-disk cache of tokenised splits, shared by the task types.

A split is tokenised once per (tokenizer, max length, task, task settings, texts) and stored under
:func:`fedlora.tasks.base.cache_dir`; the key is a SHA-256 over all of them, so any change to the
data or the settings tokenises afresh. A damaged cache file is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedlora.files import atomic_torch_save
from fedlora.tasks.base import cache_dir


def cache_key(tokenizer, max_length: int, task: str, settings: Iterable[str], texts: Iterable[object]) -> str:
    """A hex digest naming one tokenised split."""
    h = hashlib.sha256()
    for part in (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
                 str(max_length), task, *settings):
        h.update(str(part).encode() + b"\0")
    for t in texts:
        h.update(str(t).encode() + b"\0")
    return h.hexdigest()[:32]


def cached_features(task: str, key: str, build: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``build()``'s features, read from the cache when present; returns (features, meta)."""
    path = cache_dir() / f"{task}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)["features"], {"cache": str(path), "cached": True}
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    features = build()
    atomic_torch_save({"features": features}, path)
    return features, {"cache": str(path), "cached": False}
