"""How a run stops on Ctrl-C or SIGTERM: cleanly, between rounds, with every completed round kept.

SIGTERM raises KeyboardInterrupt as Ctrl-C does, and both also set a flag that an interrupt
swallowed by a finalizer cannot lose (:func:`stop_signals_interrupt`); a round's commit holds
both back until its files agree (:func:`signals_deferred`); and a loop running in a thread that gets
no signals is stopped through :data:`stop_requested` (:func:`signals_set_stop`, :func:`raise_if_stopped`).
Handlers can be installed only from the main thread; elsewhere each block runs as is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


#: the signals that stop a run cleanly: Ctrl-C, and SIGTERM (``kill``, a batch scheduler, a container stop)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _handling(handler: Any, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[dict[int, Any]]:
    """``handler`` for ``signals`` within the block, the previous handlers back after it; yields
    those previous handlers (signal → handler)."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block, then act on the first that came: its previous
    handler runs (Python's SIGINT handler raises KeyboardInterrupt); a default handler becomes
    KeyboardInterrupt too, so that the caller stops as cleanly as on Ctrl-C. Only the main thread
    can install a handler; elsewhere (e.g. a Flower ServerApp thread) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    with _handling(lambda signum, frame: caught.append((signum, frame))) as previous:
        yield
    if not caught:
        return
    signum, frame = caught[0]
    handler = previous[signum]
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt


#: A stop asked for where no KeyboardInterrupt can be raised: the round loop runs in a thread that
#: gets no signals (a Flower simulation's ServerApp thread), so the main thread's handler sets this
#: and the loop (and a transport waiting for replies) raises KeyboardInterrupt at its next check.
stop_requested = threading.Event()


def raise_if_stopped() -> None:
    """KeyboardInterrupt if a stop was requested (see :data:`stop_requested`)."""
    if stop_requested.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_set_stop() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM set :data:`stop_requested` instead of raising, for a
    main thread that waits while another thread runs the loop (cleared on entry and exit). A second
    signal raises KeyboardInterrupt as usual. Main thread only."""
    stop_requested.clear()
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        finally:
            stop_requested.clear()
        return

    def handler(signum: int, frame: Any) -> None:
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()

    try:
        with _handling(handler):
            yield
    finally:
        stop_requested.clear()


def _interrupt(signum: int, frame: Any) -> None:
    stop_requested.set()  # kept even if the exception below is swallowed (see stop_signals_interrupt)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block (or the decorated function), SIGTERM raises KeyboardInterrupt as Ctrl-C
    does, so a terminated run stops the same way: complete rounds kept, summary written, resumable.

    Both signals also set :data:`stop_requested`. Python swallows an exception raised while it runs a
    finalizer or a weakref callback ("Exception ignored in …"), and torch runs many, so an interrupt
    can land where it is lost; the flag still stops the run at its next :func:`raise_if_stopped`
    (the round loop checks before every round, the in-process transport before every client). SIGINT
    is taken over only from Python's own handler: under :func:`signals_set_stop` it is left alone.
    The flag is cleared on entry and exit when the block owns SIGINT. Main thread only, as
    :func:`signals_deferred`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owns_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signals = STOP_SIGNALS if owns_sigint else (signal.SIGTERM,)
    if owns_sigint:
        stop_requested.clear()
    try:
        with _handling(_interrupt, signals):
            yield
    finally:
        if owns_sigint:
            stop_requested.clear()
