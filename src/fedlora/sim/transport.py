"""The in-process transport: every client of the round trained in this process, one after another,
on the one shared base model; the server keeps each client's personal state (FedSA's B)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedlora.factors import Adapter
from fedlora.runtime.evaluation import evaluate_client
from fedlora.runtime.federation import Federation, client_context
from fedlora.runtime.signals import raise_if_stopped
from fedlora.runtime.training import client_round
from fedlora.runtime.transport import RoundReplies
from fedlora.strategies import ClientUpdate, GlobalState


class InProcess:
    """``loss_fn(model, batch, client_id)`` replaces the task's loss (tests use it to inject failures)."""

    engine = "embedded"
    min_replies = 1
    resume_command = "fedlora run --resume"

    def __init__(self, loss_fn=None):
        self.loss_fn = loss_fn
        self.personal: dict[int, Adapter | None] = {}

    def open(self, fed: Federation, checkpoint: Mapping[str, Any] | None) -> None:
        self.fed = fed
        self.personal = dict(checkpoint["personal"]) if checkpoint is not None else {}

    def train(self, state: GlobalState, sampled: list[int], status: Callable[[str], None]) -> RoundReplies:
        fed, strategy, t = self.fed, self.fed.strategy, state.round
        out = RoundReplies()
        for i, k in enumerate(sampled):
            raise_if_stopped()  # an interrupt a finalizer swallowed still stops before the next client
            status(f"client {k} ({i + 1}/{len(sampled)})")
            ctx = client_context(fed, k, t, len(sampled))
            loss = (lambda m, b, k=k: self.loss_fn(m, b, k)) if self.loss_fn else None
            result, adapter, mine, info = client_round(fed, state, self.personal.get(k), ctx, loss)
            if adapter is None:
                out.failed.append({"client": k, "step": result.steps, "error": result.error})
                continue
            self.personal[k] = mine
            payload = strategy.payload(adapter, t)
            out.updates.append(ClientUpdate(k, strategy.receive(payload, state, t), ctx.num_samples,
                                            info["scaling"], info))
            out.contexts.append(ctx)
            out.losses[k] = (result.loss, ctx.num_samples)
        return out

    def evaluate_personal(self, state: GlobalState) -> dict[int, dict[str, Any]]:
        out = {}
        for k in range(self.fed.num_clients):
            metrics = evaluate_client(self.fed, state, self.personal.get(k), k)
            if metrics is not None:
                out[k] = metrics
        return out

    def personal_states(self) -> Mapping[int, Adapter | None]:
        return self.personal

    def state_dict(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
