"""``--quiet`` (or ``run.progress = false``) for the libraries a run calls: the progress bars of
``datasets`` (its map, filter, split generation and cast bars), ``transformers`` (e.g. "Loading
weights") and ``huggingface_hub`` (downloads). fedlora's own bar is :class:`~fedlora.runtime.records.Display`.

The round loop (:func:`fedlora.runtime.loop.run`) is decorated with :func:`quiet_unless_progress`, so
every command that runs a federation (``fedlora run``, ``compare``, ``quickstart``, ``flower sim``)
silences the bars the same way, before data loading starts, and puts the libraries' settings back
when the run returns. A Flower run never shows a progress display (it logs lines), so its library bars
are always off. Each library is imported only when it is already installed and the run is quiet.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any


def _switches() -> list[tuple[Callable[[], bool], Callable[[], None], Callable[[], None]]]:
    """(is on, turn off, turn on) for each installed library that draws progress bars."""
    out = []
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        out.append((lambda: not datasets.are_progress_bars_disabled(), datasets.disable_progress_bars,
                    datasets.enable_progress_bars))
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        out.append((hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar,
                    hf_logging.enable_progress_bar))
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub import utils as hub_utils

        out.append((lambda: not hub_utils.are_progress_bars_disabled(), hub_utils.disable_progress_bars,
                    hub_utils.enable_progress_bars))
    return out


@contextlib.contextmanager
def library_bars_off(quiet: bool = True) -> Iterator[None]:
    """Within the block, no progress bar from datasets, transformers or huggingface_hub (when
    ``quiet``; otherwise the block runs as is). Bars that were on are turned back on after it;
    bars already off (e.g. ``HF_DATASETS_DISABLE_PROGRESS_BARS=1``) stay off."""
    if not quiet:
        yield
        return
    were_on = []
    for is_on, off, on in _switches():
        if is_on():
            off()
            were_on.append(on)
    try:
        yield
    finally:
        for on in were_on:
            on()


def quiet_unless_progress(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``run(cfg, …, progress=None, …)``: a call without a progress display (``progress``
    False, or None with ``cfg.run.progress`` false) runs within :func:`library_bars_off`."""

    @functools.wraps(run)
    def wrapper(cfg, *args: Any, progress: bool | None = None, **kwargs: Any) -> Any:
        show = cfg.run.progress if progress is None else progress
        with library_bars_off(not show):
            return run(cfg, *args, progress=progress, **kwargs)

    return wrapper
