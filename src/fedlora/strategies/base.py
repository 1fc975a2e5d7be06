"""The strategy interface: what every federated-LoRA method says on the client and on the server.

A strategy never touches models, files or sockets: tensors in, tensors out. Engines (the embedded
simulator, Flower) own models, data and I/O, and call these hooks in this order each round t:

client k:  start = client_start(state, personal_k, ctx)     # what the client loads
           trainable(t), scaling(ctx), regularizer(...)      # how it trains
           adapter, info = before_upload(trained, start, ctx) # e.g. FedRot's rotation
           payload(adapter, t) → the wire;  personal_state(adapter) → kept on the client
server:    update_k = ClientUpdate(receive(payload_k, state), n_k, s_k, info_k)
           state = aggregate([update_k], state)              # new global state, round t + 1

``state.base_delta`` carries any change to the frozen base weights made by that aggregation (FedEx's
residual, FLoRA's merge), as effective factors already multiplied by their scaling: W₀ += B·A.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError, ConfigError
from fedlora.factors import Adapter, LoRAPair, check_uploads, normalize_weights
from fedlora.server_opt import ServerAdam

ALL_PARTS = frozenset({"A", "B", "extras"})


@dataclass
class ClientContext:
    """What a client knows about itself and the round it is training."""

    client_id: int | str
    round: int
    num_samples: int = 1
    rank: int | None = None  # this client's LoRA rank; None means the global adapter's rank
    alpha: float = 16.0  # LoRA alpha (PEFT's lora_alpha)
    num_clients: int = 1  # clients aggregated this round
    total_clients: int = 1  # clients in the federation
    seed: int = 0


@dataclass
class ClientUpdate:
    """One client's contribution to a round, as the server sees it.

    ``adapter`` is complete: factors the client did not upload are filled in from the global state
    by :meth:`Strategy.receive`. ``scaling`` is the LoRA scaling the client trained with.
    """

    client_id: int | str
    adapter: Adapter
    num_samples: int = 1
    scaling: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class GlobalState:
    """The server's state between rounds.

    - ``adapter``: the global factors and extras broadcast to clients.
    - ``round``: the index of the next round to train (0 before any aggregation).
    - ``scaling``: the LoRA scaling s the global adapter is meant to be used with.
    - ``base_delta``: per layer, the change to the frozen base weights made by the last aggregation
      (W₀ ← W₀ + B·A, scaling already applied); None when the strategy does not touch the base.
    - ``server_opt``: the server optimiser's moments.
    - ``info``: strategy-specific values (e.g. the seed of FFA's frozen A).
    """

    adapter: Adapter
    round: int = 0
    scaling: float = 1.0
    base_delta: dict[str, LoRAPair] | None = None
    server_opt: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class of every federated-LoRA method. Defaults are FedIT's (FedAvg of A and B).

    Parameters:
        weighting: ``"samples"`` (default) weights clients by their sample count, ``"uniform"``
            weights them equally.
        server_optimizer: optional :class:`~fedlora.server_opt.ServerAdam` (FedOpt, Reddi et al.
            2021) applied to the averaged factors; only for strategies with
            ``factor_averaging = True``. Default None (plain averaging).
    """

    name: ClassVar[str] = ""
    #: The server needs only Σ_k p_k·upload_k, so SecAgg can hide the individual uploads.
    secure_aggregation: ClassVar[bool] = True
    #: Clients may train different ranks.
    heterogeneous_ranks: ClassVar[bool] = False
    #: The server averages factors, so a server optimiser can act on the average.
    factor_averaging: ClassVar[bool] = True

    def __init__(self, *, weighting: str = "samples", server_optimizer: ServerAdam | None = None):
        if weighting not in ("samples", "uniform"):
            raise ConfigError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        if server_optimizer is not None and not self.factor_averaging:
            raise ConfigError(f"strategy {self.name!r} re-factors the aggregate and cannot use a server optimiser")
        self.weighting = weighting
        self.server_optimizer = server_optimizer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ---- client side ----------------------------------------------------------------------------
    def trainable(self, round: int) -> frozenset[str]:
        """Which factors train this round: a subset of {"A", "B"}. Extras train unless frozen by the engine."""
        return frozenset({"A", "B"})

    def trains_extras(self, round: int) -> bool:
        """Whether the extras (e.g. a classifier head) train this round. True unless a strategy freezes them."""
        return True

    def scaling(self, ctx: ClientContext, rank: int) -> float:
        """The LoRA scaling for a client of rank ``rank``: PEFT's lora_alpha / r by default."""
        return ctx.alpha / rank

    def client_start(self, state: GlobalState, personal: Adapter | None, ctx: ClientContext) -> Adapter:
        """The adapter a client loads at the start of the round (a fresh copy it may modify)."""
        return state.adapter.clone()

    def regularizer(self, live: Adapter, reference: Adapter, scaling: float) -> Tensor | None:
        """An extra loss term on the live (autograd-tracked) factors; None for no term."""
        return None

    def before_upload(self, adapter: Adapter, reference: Adapter, ctx: ClientContext) -> tuple[Adapter, dict]:
        """The client's transform after training and before upload; returns (adapter, info)."""
        return adapter, {}

    def upload_parts(self, round: int) -> frozenset[str]:
        """Which parts ("A", "B", "extras") the client uploads in this round."""
        return ALL_PARTS

    def personal_state(self, adapter: Adapter) -> Adapter | None:
        """What the client keeps for itself between rounds (FedSA's B); None for nothing."""
        return None

    # ---- the wire -------------------------------------------------------------------------------
    def payload(self, adapter: Adapter, round: int) -> dict[str, Tensor]:
        """The tensors a client sends, in PEFT key names."""
        return adapter.tensors(self.upload_parts(round))

    def upload_bytes(self, adapter: Adapter, round: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.payload(adapter, round).values())

    def download_bytes(self, state: GlobalState, ctx: ClientContext) -> int:
        """Bytes a client receives at the start of round ``ctx.round``: its start adapter's shared
        parts plus any base-weight change it must apply."""
        start = self.client_start(state, None, ctx)
        n = start.nbytes(self.download_parts(ctx.round))
        if state.base_delta is not None:
            n += sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size()
                     for p in state.base_delta.values())
        return n

    def download_parts(self, round: int) -> frozenset[str]:
        """Which parts of the global adapter the server broadcasts in this round."""
        return ALL_PARTS

    def receive(self, payload: Mapping[str, Tensor], state: GlobalState, round: int) -> Adapter:
        """Rebuild a complete client adapter from its payload; parts not sent come from the global state."""
        full = state.adapter.tensors()
        unexpected = sorted(set(payload) - set(full) - set(state.adapter.extras))
        if unexpected:
            raise AggregationInputError(f"payload has keys the global adapter lacks: {unexpected[:3]}")
        full.update(payload)
        return Adapter.from_state_dict(full)

    # ---- server side ----------------------------------------------------------------------------
    def init_state(self, adapter: Adapter, *, alpha: float = 16.0, seed: int = 0) -> GlobalState:
        """The round-0 global state from an initial adapter (PEFT's init: A random, B zero)."""
        rank = next(iter(adapter.layers.values())).rank if adapter.layers else 1
        ctx = ClientContext(client_id="server", round=0, alpha=alpha)
        return GlobalState(adapter=adapter.clone(), round=0, scaling=self.scaling(ctx, rank),
                           info={"seed": seed, "alpha": alpha})

    def weights(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """Normalised client weights p_k (float64)."""
        ids = [u.client_id for u in updates]
        if self.weighting == "uniform":
            return normalize_weights([1.0] * len(updates), ids)
        return normalize_weights([u.num_samples for u in updates], ids)

    def validate(self, updates: Sequence[ClientUpdate], state: GlobalState) -> None:
        """Reject an empty round, mismatched layers or shapes, NaN/Inf, bad ranks, naming the client."""
        if len(updates) == 0:
            raise AggregationInputError(f"empty round {state.round}: no client uploads to aggregate")
        check_uploads([state.adapter] + [u.adapter for u in updates], ["global"] + [u.client_id for u in updates],
                      same_ranks=not self.heterogeneous_ranks, check_extras=True)
        for u in updates:
            if not math.isfinite(u.scaling) or u.scaling == 0:
                raise AggregationInputError(f"client {u.client_id}: LoRA scaling {u.scaling} is not usable")

    def aggregate(self, updates: Sequence[ClientUpdate], state: GlobalState) -> GlobalState:
        """Validate the round, weigh the clients, and return the new global state (round + 1)."""
        self.validate(updates, state)
        new = self._aggregate(list(updates), self.weights(updates), state)
        new.round = state.round + 1
        return new

    def _aggregate(self, updates: list[ClientUpdate], weights: Tensor, state: GlobalState) -> GlobalState:
        """FedIT: average the uploaded parts (with the server optimiser if set)."""
        adapter, opt_state = self.average(updates, weights, state, self.upload_parts(state.round))
        return self.next_state(state, adapter, server_opt=opt_state)

    # ---- helpers for subclasses ---------------------------------------------------------------
    def average(self, updates: Sequence[ClientUpdate], weights: Tensor, state: GlobalState,
                parts: frozenset[str]) -> tuple[Adapter, dict[str, Tensor]]:
        """Weighted average of ``parts`` of the uploads; other parts stay as in ``state``.

        Computed in float32 (or wider), cast back to the global adapter's dtypes. If a server
        optimiser is set, the average is the target of one optimiser step from the previous
        global values. Returns (adapter, server optimiser state).
        """
        prev = state.adapter.tensors(parts)
        mean: dict[str, Tensor] = {}
        client_tensors = [u.adapter.tensors(parts) for u in updates]
        for key, old in prev.items():
            if not old.is_floating_point():
                mean[key] = client_tensors[0][key]
                continue
            dt = torch.promote_types(old.dtype, torch.float32)
            acc = torch.zeros(old.shape, dtype=dt, device=old.device)
            for w, ct in zip(weights.tolist(), client_tensors):
                acc.add_(ct[key].to(dt), alpha=w)
            mean[key] = acc
        opt_state = state.server_opt
        if self.server_optimizer is not None:
            mean, opt_state = self.server_optimizer.step(prev, mean, state.server_opt)
        full = state.adapter.tensors()
        full.update({k: v.to(prev[k].dtype) for k, v in mean.items()})
        return Adapter.from_state_dict(full), opt_state

    def next_state(self, state: GlobalState, adapter: Adapter, **changes: Any) -> GlobalState:
        """A new GlobalState carrying ``state``'s fields, with the new adapter and ``changes``."""
        fields = dict(adapter=adapter, round=state.round, scaling=state.scaling, base_delta=None,
                      server_opt=state.server_opt, info=dict(state.info))
        fields.update(changes)
        return GlobalState(**fields)
