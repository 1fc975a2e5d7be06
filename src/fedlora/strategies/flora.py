"""FLoRA: stacking-based exact aggregation with heterogeneous ranks, merged into the base weights.

Wang, Shen, Han, Zhou, Yuan, Liu, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976; code ATP-1010/FederatedLLM
(methods-reference §4).

The server stacks the clients' factors, B_cat = [B_1 … B_N] and A_cat = [p_1 A_1; …; p_N A_N],
so B_cat·A_cat = Σ p_k B_k A_k exactly, whatever each client's rank. The stacked update is merged
into the frozen base weights on the clients and every client starts the next round from a fresh
LoRA (A random, B = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair, stack_factors
from fedlora.strategies.base import ClientContext, ClientUpdate, GlobalState, Strategy
from fedlora.strategies.ffa import seeded_kaiming_A
from fedlora.strategies.registry import register


def client_terms(updates: Sequence[ClientUpdate], weights: Tensor,
                 layer: str) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """(B_k, A_k, p_k·s_k) for one layer: the terms of the exact update Σ_k p_k s_k B_k A_k.

    Each client's own scaling s_k is used, since clients of different ranks train with different
    α/r_k. Pass the result to :func:`~fedlora.factors.stack_factors`.
    """
    Bs = [u.adapter.layers[layer].B for u in updates]
    As = [u.adapter.layers[layer].A for u in updates]
    coefs = [float(p) * u.scaling for p, u in zip(weights.tolist(), updates)]
    return Bs, As, coefs


def fresh_adapter(template: Adapter, rank: int | None, seed: int, round: int, client: object = "server") -> Adapter:
    """A PEFT-style fresh LoRA shaped like ``template``: A = :func:`seeded_kaiming_A` keyed by (seed,
    round, layer), B = 0, extras copied. ``rank`` None keeps each layer's rank.

    The same (seed, round) gives the same A on the server and every client, and a lower rank gets
    the first rows of a higher-rank draw.
    """
    layers = {}
    for name, p in template.layers.items():
        r = p.rank if rank is None else rank
        d_out, d_in = p.shape
        if not 1 <= r <= min(d_out, d_in):
            raise ConfigError(f"client {client}, layer {name!r}: rank {r} is outside [1, {min(d_out, d_in)}]")
        A = seeded_kaiming_A(r, d_in, "flora", seed, round, name, dtype=p.A.dtype, device=p.A.device)
        layers[name] = LoRAPair(A, p.B.new_zeros(d_out, r))
    return Adapter(layers, {k: v.detach().clone() for k, v in template.extras.items()})


@register
class FLoRA(Strategy):
    """FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stack, merge into the base, restart LoRA.

    Parameters: ``weighting`` as in :class:`Strategy` (default ``"samples"``). No server optimiser:
    the aggregate is not an average of factors.

    Server, each round: ``base_delta[layer]`` = the stacked effective factors, B_cat = [B_1 … B_N]
    (d_out × Σr_k) and A_cat = [p_1 s_1 A_1; …; p_N s_N A_N] (Σr_k × d_in, in at least float32), so
    the merged change is exactly Σ p_k s_k B_k A_k (each client with its own scaling s_k = α/r_k).
    The global LoRA is then re-initialised: A re-drawn by :func:`fresh_adapter` keyed by (seed,
    next round), B = 0; extras are averaged by weight. :meth:`init_state` does the same for round 0.

    Started from a trained adapter (``lora.init_adapter``): round 0 is not re-initialised; clients
    train on from the adapter, and round 1's merge (the clients' whole adapters, stacked) carries
    the start's ΔW into the base once, after which LoRA restarts fresh as every round. Clients must
    then all have the adapter's rank in round 0 (a fresh lower-rank start would drop its share).

    Client: ranks may differ. :meth:`client_start` hands a client whose ``ctx.rank`` differs from the
    global rank a fresh rank-``ctx.rank`` adapter (the same seeded draw, B = 0).

    Communication per layer: upload r_k·(d_in + d_out); download the stacked delta
    Σr_k·(d_in + d_out) (at float32) plus the fresh adapter r·(d_in + d_out). The fresh adapter is
    reproducible from (seed, round), so an engine may skip sending it; :meth:`download_bytes`
    counts it (what a generic engine sends).

    Not secure-aggregation compatible: the stacked factors are each client's own B_k and p_k·A_k,
    so the server (and every client that downloads them) sees every individual update.

    Differential privacy: client level is refused: the server stacks each client's upload, so noise on
    the sum does not cover what it releases, and no sound mechanism (local noise on each upload, or
    noise on a dense aggregate with a bounded sensitivity before re-factoring) is implemented yet.
    Sample level (DP-SGD) works: each example's gradient is clipped and noised on the client, and the
    upload is post-processing.
    """

    name = "flora"
    secure_aggregation = False
    heterogeneous_ranks = True
    factor_averaging = False
    mixed_scalings = True

    def init_state(self, adapter: Adapter, *, alpha: float = 16.0, seed: int = 0,
                   start_scaling: float | None = None) -> GlobalState:
        state = super().init_state(adapter, alpha=alpha, seed=seed, start_scaling=start_scaling)
        if start_scaling is None:
            state.adapter = fresh_adapter(state.adapter, None, seed, 0)
        return state

    def client_start(self, state: GlobalState, personal: Adapter | None, ctx: ClientContext) -> Adapter:
        ranks = set(state.adapter.ranks().values())
        if ctx.rank is None or ranks == {ctx.rank}:
            return state.adapter.clone()
        if state.round == 0 and state.info.get("start_adapter"):
            raise ConfigError(f"client {ctx.client_id}: rank {ctx.rank} differs from the start adapter's rank "
                              f"{sorted(ranks)[0]} (lora.init_adapter); FLoRA would restart it from a fresh "
                              "adapter and lose its share of the start. Use one rank with lora.init_adapter")
        return fresh_adapter(state.adapter, ctx.rank, state.info.get("seed", 0), state.round, ctx.client_id)

    def _aggregate(self, updates: list[ClientUpdate], weights: Tensor, state: GlobalState) -> GlobalState:
        base_delta = {name: stack_factors(*client_terms(updates, weights, name), f"layer {name!r}")
                      for name in state.adapter.layers}
        averaged, _ = self.average(updates, weights, state, frozenset({"extras"}))
        fresh = fresh_adapter(averaged, None, state.info.get("seed", 0), state.round + 1)
        return self.next_state(state, fresh, base_delta=base_delta)
