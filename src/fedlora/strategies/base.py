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
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError, ConfigError
from fedlora.factors import Adapter, LoRAPair, check_uploads, normalize_weights
from fedlora.server_opt import ServerAdam

ALL_PARTS = frozenset({"A", "B", "extras"})


def check_alpha(alpha: float, who: str) -> None:
    """Raise ConfigError unless the LoRA alpha is a positive finite number (α ≤ 0 flips or kills the update)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{who}: LoRA alpha must be a positive finite number, got {alpha!r}")


def check_rank(rank: int, who: str) -> None:
    """Raise ConfigError unless the LoRA rank is an integer ≥ 1 (every scaling divides by it)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ConfigError(f"{who}: LoRA rank must be an integer ≥ 1, got {rank!r}")


def check_scaling(scaling: float, who: str) -> None:
    """Raise AggregationInputError unless a LoRA scaling is a positive finite number."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling) or scaling <= 0:
        raise AggregationInputError(f"{who}: LoRA scaling {scaling!r} is not a positive finite number")


def check_flag(value: object, option: str, strategy: str) -> bool:
    """``value`` if it is a bool; else ConfigError (``bool("false")`` would silently be True)."""
    if not isinstance(value, bool):
        raise ConfigError(f"strategy {strategy!r}: {option} must be true or false, got {value!r}")
    return value


@dataclass
class ClientContext:
    """What a client knows about itself and the round it is training. A non-positive ``alpha`` or
    ``rank`` raises ConfigError naming the client."""

    client_id: int | str
    round: int
    num_samples: int = 1
    rank: int | None = None  # this client's LoRA rank; None means the global adapter's rank
    alpha: float = 16.0  # LoRA alpha (PEFT's lora_alpha)
    num_clients: int = 1  # clients aggregated this round
    total_clients: int = 1  # clients in the federation
    seed: int = 0

    def __post_init__(self):
        check_alpha(self.alpha, f"client {self.client_id}")
        if self.rank is not None:
            check_rank(self.rank, f"client {self.client_id}")


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


def check_round(updates: Sequence[ClientUpdate], round: int) -> None:
    """Reject a round's updates that no aggregate can come from, naming the client: none at all, a
    client id twice, a sample count or a scaling that is not a positive finite number."""
    if len(updates) == 0:
        raise AggregationInputError(f"empty round {round}: no client uploads to aggregate")
    seen = set()
    for u in updates:
        if u.client_id in seen:
            raise AggregationInputError(f"client {u.client_id} appears twice in round {round}'s updates")
        seen.add(u.client_id)
        n = u.num_samples
        # checked whatever the weighting: a client that trained on no examples has nothing to add
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n <= 0:
            shown = float(n) if isinstance(n, numbers.Real) else repr(n)
            raise AggregationInputError(f"client {u.client_id}: weight {shown} (its sample count) must be "
                                        "positive and finite")
        check_scaling(u.scaling, f"client {u.client_id}")


def check_result(new: GlobalState, round: int) -> None:
    """Raise AggregationInputError naming the layer if an aggregate is not finite: finite uploads can
    still overflow (float32 factors near 1e19 square past its range), and a NaN global state would
    silently poison every later round."""
    where = f"round {round}'s aggregate"
    check_uploads([new.adapter], first=where)
    for name, pair in (new.base_delta or {}).items():
        if not (torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all()):
            raise AggregationInputError(f"{where}, layer {name!r}: the base-weight change contains NaN or Inf "
                                        "(the uploads overflowed)")
    check_scaling(new.scaling, where)


class Strategy:
    """Base class of every federated-LoRA method. Defaults are FedIT's (FedAvg of A and B).

    Parameters:
        weighting: ``"samples"`` (default) weights clients by their sample count, ``"uniform"``
            weights them equally.
        server_optimizer: optional :class:`~fedlora.server_opt.ServerAdam` (FedOpt, Reddi et al.
            2021) applied to the averaged factors; only for strategies with
            ``factor_averaging = True``. Default None (plain averaging).

    Differential privacy (:mod:`fedlora.privacy`): every strategy states, in its docstring, what is
    clipped and where the noise goes. Client-level DP-FedAvg needs ``secure_aggregation``: the
    server's aggregate must be a function of the sum of the uploads, so that the loop can hand it
    one noised mean of the clipped updates instead of the individual uploads; strategies without it
    refuse client-level DP. Sample-level DP-SGD works for every strategy (it is local training).
    """

    name: ClassVar[str] = ""
    #: The server needs only Σ_k p_k·upload_k, so SecAgg can hide the individual uploads.
    secure_aggregation: ClassVar[bool] = True
    #: Clients may train different ranks.
    heterogeneous_ranks: ClassVar[bool] = False
    #: The server averages factors, so a server optimiser can act on the average.
    factor_averaging: ClassVar[bool] = True
    #: The aggregate weighs each client's B_k·A_k by its own scaling s_k, so clients may train with
    #: different scalings (different ranks or alphas). False: factors are averaged as they are, which
    #: only means something when every client used the same s.
    mixed_scalings: ClassVar[bool] = False
    #: Clients keep factors of their own between rounds (:meth:`personal_state` returns them), so no
    #: single global model is what every client uses, and each client's own model is evaluated.
    personalised: ClassVar[bool] = False

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
        check_rank(rank, f"client {ctx.client_id}")
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
        """Rebuild a complete client adapter from its payload; parts not sent come from the global state.

        The payload must hold exactly what :meth:`payload` sends this round: a missing key would
        otherwise be filled in silently from the global state, as if the client had not trained it.
        """
        full = state.adapter.tensors()
        unexpected = sorted(set(payload) - set(full) - set(state.adapter.extras))
        if unexpected:
            raise AggregationInputError(f"payload has keys the global adapter lacks: {unexpected[:3]}")
        missing = sorted(set(state.adapter.tensors(self.upload_parts(round))) - set(payload))
        if missing:
            raise AggregationInputError(f"payload lacks {missing[:3]}{' …' if len(missing) > 3 else ''}: strategy "
                                        f"{self.name!r} uploads {sorted(self.upload_parts(round))} of every layer "
                                        f"in round {round}")
        full.update(payload)
        return Adapter.from_state_dict(full)

    # ---- server side ----------------------------------------------------------------------------
    def init_state(self, adapter: Adapter, *, alpha: float = 16.0, seed: int = 0,
                   start_scaling: float | None = None) -> GlobalState:
        """The round-0 global state from an initial adapter: PEFT's init (A random, B zero), or, with
        ``start_scaling``, a trained adapter to start from (``lora.init_adapter``) whose factors were
        trained at that LoRA scaling.

        A trained adapter keeps its ΔW = s·B·A exactly: where this strategy's scaling s' differs
        (e.g. SFed-LoRA's γ/r, or an rsLoRA adapter), B is rescaled by s/s'. ``info["start_adapter"]``
        records that the run started from one.

        An adapter with NaN/Inf or malformed factors, or a non-positive ``alpha``, raises an error
        naming the layer or the value.
        """
        check_uploads([adapter], first="the initial adapter")
        check_alpha(alpha, "init_state")
        rank = next(iter(adapter.layers.values())).rank if adapter.layers else 1
        ctx = ClientContext(client_id="server", round=0, alpha=alpha)
        state = GlobalState(adapter=adapter.clone(), round=0, scaling=self.scaling(ctx, rank),
                            info={"seed": seed, "alpha": alpha})
        if start_scaling is not None:
            state.info["start_adapter"] = True
            ratio = float(start_scaling) / state.scaling
            if ratio != 1.0:
                state.adapter = state.adapter.map(lambda name, p: LoRAPair(p.A, p.B * ratio))
        return state

    def weights(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """Normalised client weights p_k (float64)."""
        ids = [u.client_id for u in updates]
        if self.weighting == "uniform":
            return normalize_weights([1.0] * len(updates), ids)
        return normalize_weights([u.num_samples for u in updates], ids)

    def validate(self, updates: Sequence[ClientUpdate], state: GlobalState) -> None:
        """Reject what the round cannot be aggregated from, naming the client, layer or value: an empty
        round, a client id twice, a sample count or scaling that is not positive and finite, scalings
        that differ where the strategy cannot combine them, mismatched layers, shapes or ranks, and
        NaN/Inf in an upload or in the global state."""
        check_round(updates, state.round)
        check_scaling(state.scaling, "the global state")
        check_uploads([state.adapter] + [u.adapter for u in updates], ["global"] + [u.client_id for u in updates],
                      same_ranks=not self.heterogeneous_ranks, check_extras=True, first="the global adapter")
        for key, t in state.server_opt.items():
            if not torch.isfinite(t).all():
                raise AggregationInputError(f"the global state's server optimiser moment {key!r} contains NaN or Inf")
        first = updates[0]
        for u in updates:
            if not self.mixed_scalings and not math.isclose(u.scaling, first.scaling, rel_tol=1e-6):
                raise AggregationInputError(
                    f"client {u.client_id} trained with LoRA scaling {u.scaling:g} but client {first.client_id} "
                    f"with {first.scaling:g}: strategy {self.name!r} averages the factors as they are and cannot "
                    "combine different scalings (give every client the same LoRA rank and alpha)")

    def aggregate(self, updates: Sequence[ClientUpdate], state: GlobalState) -> GlobalState:
        """Validate the round, weigh the clients, and return the new global state (round + 1)."""
        self.validate(updates, state)
        new = self._aggregate(list(updates), self.weights(updates), state)
        new.round = state.round + 1
        check_result(new, state.round)
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
