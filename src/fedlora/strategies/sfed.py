"""SFed-LoRA: FedSA-LoRA with a scaling factor that accounts for the number of aggregated clients.

Huang, Wu, He, Lao et al., "Mitigating the Side Effect of Client Size and Rank via the Scaling
Factor" (SFed-LoRA), arXiv 2603.08058 (methods-reference §2).

Averaging N clients' A factors shrinks the variance of the aggregate by N, which collapses the
gradients of high-rank adapters; γ = α·√(N/r) keeps the forward and backward moments Θ(1) in
both N and r. Only the scaling changes: the framework is FedSA-LoRA (A shared, B personal).
"""

from __future__ import annotations

from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.strategies.base import ClientContext, ClientUpdate, GlobalState, check_rank
from fedlora.strategies.fedsa import FedSA
from fedlora.strategies.registry import register

N_MODES = ("round", "total")


@register
class SFed(FedSA):
    """SFed-LoRA (Huang et al., arXiv 2603.08058): FedSA-LoRA with scaling γ = α·√(N/r).

    Parameters:
        n: what N is (default ``"round"``). ``"round"``: the number of clients aggregated in this
            round (``ClientContext.num_clients``); ``"total"``: the federation's size
            (``ClientContext.total_clients``). The paper leaves N unspecified; its analysis averages
            over the N aggregated clients, which suggests ``"round"`` under partial participation
            (an inference, methods-reference §2.1). With full participation the two agree.
        keep_head_local, weighting, server_optimizer: as in :class:`FedSA` (defaults False,
            ``"samples"``, None). FedSA's ``rslora`` is not an option: γ replaces it.

    γ replaces α/r in each client's forward pass (h = W₀x + γ·B_k·A_k·x); no server-side
    rescaling. The global state's ``scaling`` is set after each round to the γ the clients
    trained with; before round 0 it is α/√r (N = 1), as the server cannot know N yet.

    Communication and secure aggregation: as FedSA-LoRA (upload r·d_in per layer; the server needs
    only Σ p_k A_k, so SecAgg-compatible).

    Differential privacy: client level (DP-FedAvg) clips the client's update, its uploaded A (as FedSA-
    LoRA) minus the global values it started from, to L2 norm C; the server adds N(0, σ²C²) to the sum
    and divides by the fixed denominator. γ only scales the local product; Ā is the noised average.
    Sample level (DP-SGD) clips each example's gradient; the upload is post-processing.
    """

    name = "sfed"

    def __init__(self, *, n: str = "round", **kw):
        if "rslora" in kw:
            raise ConfigError("sfed: 'rslora' is not an option; SFed-LoRA's scaling α·√(N/r) replaces it")
        super().__init__(**kw)
        if n not in N_MODES:
            raise ConfigError(f"sfed n={n!r}; expected one of {N_MODES}")
        self.n = n

    def scaling(self, ctx: ClientContext, rank: int) -> float:
        check_rank(rank, f"client {ctx.client_id}")
        N = ctx.num_clients if self.n == "round" else ctx.total_clients
        if N < 1:
            raise ConfigError(f"client {ctx.client_id}: sfed needs N ≥ 1 clients (n={self.n!r}), got {N}")
        return ctx.alpha * (N / rank) ** 0.5

    def _aggregate(self, updates: list[ClientUpdate], weights: Tensor, state: GlobalState) -> GlobalState:
        new = super()._aggregate(updates, weights, state)
        new.scaling = updates[0].scaling  # the γ this round's clients used (validate made them equal)
        return new
