"""Whether the Hugging Face hub can be used now, and the one error fedlora raises when it cannot.

Models (:func:`fedlora.assets.resolve_model`) and datasets (:func:`fedlora.data.load_source`)
ask the same two questions here, so that a switched-off or unreachable hub fails at once, with the
same wording and the same hint: the catalog entries that play the same role offline.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

from fedlora.errors import ConfigError

# How long the reachability probe waits before treating the hub as unreachable. `datasets` and
# `transformers` retry a dead connection for ~20 s per file, which "fail at once" rules out.
HUB_PROBE_TIMEOUT_S = 3.0

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")


class HubUnavailableError(ConfigError):
    """A name that needs the Hugging Face hub was given while the hub is switched off or cannot be
    reached, and no local copy was found."""


def hub_offline(datasets: bool = False) -> bool:
    """True if hub access is switched off: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` in the
    environment now, or huggingface_hub's flag (read when it was imported, or set by code). With
    ``datasets``, also ``HF_DATASETS_OFFLINE`` and the datasets library's flag, which switch off
    only the dataset downloads."""
    modules = ("huggingface_hub.constants", "datasets.config") if datasets else ("huggingface_hub.constants",)
    variables = (*_OFFLINE_VARIABLES, "HF_DATASETS_OFFLINE") if datasets else _OFFLINE_VARIABLES
    if any(getattr(sys.modules.get(m), "HF_HUB_OFFLINE", False) for m in modules):
        return True
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in variables)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S, datasets: bool = False) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds; False at once
    when :func:`hub_offline` (``datasets`` as there)."""
    if hub_offline(datasets):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def why_unavailable(datasets: bool = False) -> str:
    """The end of "the hub …": switched off (and by what) or not reachable."""
    if hub_offline(datasets):
        return "is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE)"
    return "cannot be reached"


def is_network_error(exc: BaseException) -> bool:
    """Whether an exception from huggingface_hub/httpx/requests/datasets means 'hub unreachable'."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {
        "ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "ConnectionError",
        "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ReadTimeout", "ProxyError",
    })


def catalog_hint(name: str, kind: str) -> str:
    """" Closest catalog datasets: 'sarcasm', … (they work offline; …)." for a ``kind`` ("model" or
    "dataset") name, or a pointer to the catalog when nothing is close. Never raises."""
    try:
        from fedlora.assets.catalog import suggest

        close = suggest(name, kind)
    except Exception:  # the hint must never mask the real error
        close = []
    if close:
        return (f" Closest catalog {kind}s: {', '.join(repr(c) for c in close)} "
                f"(they work offline; see `fedlora assets list`).")
    return f" See `fedlora assets list` for the catalog {kind}s, which work offline."
