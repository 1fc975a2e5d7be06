"""What an engine provides to the round loop: a way to reach the clients, and nothing else.

The loop (:mod:`fedlora.runtime.loop`) never asks which transport it has. A transport trains the
sampled clients of a round from a global state and returns their updates, losses and failures; it
evaluates the clients' personal models; and it says what it must keep in a checkpoint to resume
exactly. ``fedlora.sim.transport.InProcess`` runs every client in this process;
``fedlora.flower.serverapp.FlowerTransport`` sends Flower messages to SuperNodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedlora.factors import Adapter
from fedlora.runtime.federation import Federation
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState


@dataclass
class RoundReplies:
    """What came back from a round's sampled clients, valid updates in increasing client id.

    losses: client → (train loss, samples). failed: ``{"client", "error"[, "step"]}`` per client
    that sent nothing usable. secure: the one update a secure-aggregation server holds (the
    weighted average of the uploads), aggregated instead of ``updates``. row: transport-specific
    keys of the round's metrics row (e.g. the bytes Flower actually carried)."""

    updates: list[ClientUpdate] = field(default_factory=list)
    contexts: list[ClientContext] = field(default_factory=list)
    losses: dict[int, tuple[float, int]] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    secure: ClientUpdate | None = None
    row: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    """engine: the name written to ``summary.json``. min_replies: valid updates a round needs."""

    engine: str
    min_replies: int

    def open(self, fed: Federation, checkpoint: Mapping[str, Any] | None) -> None:
        """Get ready to run ``fed``; ``checkpoint`` is the run's last one when resuming (see
        :meth:`state_dict`), else None."""

    def train(self, state: GlobalState, sampled: list[int], status: Callable[[str], None]) -> RoundReplies:
        """Train the ``sampled`` clients from ``state`` (round ``state.round``)."""

    def evaluate_personal(self, state: GlobalState) -> dict[int, dict[str, Any]]:
        """Every client's personal model on its held-out slice (``runtime.evaluation.evaluate_client``):
        client → metrics, leaving out clients whose slice is empty."""

    def personal_states(self) -> Mapping[int, Adapter | None]:
        """The personal states the server holds for the checkpoint (none where the nodes keep them)."""

    def state_dict(self) -> dict[str, Any]:
        """Whatever else this transport needs to resume exactly (the checkpoint's ``extra["transport"]``)."""

    def close(self) -> None:
        """The run is over (completed, failed or interrupted)."""
