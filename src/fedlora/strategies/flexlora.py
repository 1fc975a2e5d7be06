"""FlexLoRA: heterogeneous-rank federated LoRA by SVD of the exact aggregate.

Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024, arXiv 2402.11505 (methods-reference §4).

Clients train LoRA adapters of their own ranks r_k. The server forms the exact aggregate
ΔW_g = Σ_k p_k s_k B_k A_k (factored: never d_out×d_in), takes its SVD U·S·Vᵀ, and keeps the top
r_max components as the global adapter; each client then receives the rank-r_k truncation.
"""

from __future__ import annotations

import torch

from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair, compute_dtype, lowrank_svd
from fedlora.server_opt import ServerAdam
from fedlora.strategies._refactor import SVDRefactoring
from fedlora.strategies.base import ClientContext, GlobalState
from fedlora.strategies.registry import register


@register
class FlexLoRA(SVDRefactoring):
    """FlexLoRA (Bai et al., NeurIPS 2024): SVD of Σ p_k s_k B_k A_k, truncated per client rank.

    Server: the global adapter is the best rank-r_max approximation of the exact aggregate, with
    r_max the global adapter's rank, split B = U_r·S_r / s_g, A = V_rᵀ (the common implementation;
    the paper's split of S between the factors is not verified, methods-reference §4), at the global
    scaling s_g. No clip and no norm fix. Extras are weighted-averaged.

    Client: a client of rank r_k = ``ctx.rank`` starts from the rank-r_k truncation of the global
    update, rescaled so that its own s_k·B·A (s_k = α/r_k) equals that truncation. ``ctx.rank`` None
    or equal to r_max gets the global adapter itself; a rank above r_max is a ConfigError.

    Parameters:
        weighting: ``"samples"`` (default, p_k ∝ n_k as in the paper) or ``"uniform"``.

    Communication: each client uploads and downloads r_k·(d_in + d_out) per layer. Not secure-
    aggregation compatible: the server needs the sum of products B_k A_k, not of the factors.
    Computation: O((d_in + d_out)·(Σ r_k)²) per layer for the factored SVD (the paper's dense SVD is
    O(d³)).

    Differential privacy: client level is refused: the server re-factors the weighted sum of the dense
    products of each client's upload, so noise on the sum does not cover what it releases, and no sound
    mechanism (local noise on each upload, or noise on a dense aggregate with a bounded sensitivity
    before re-factoring) is implemented yet. Sample level (DP-SGD) works: each example's gradient is
    clipped and noised on the client, and the upload is post-processing.
    """

    name = "flexlora"
    heterogeneous_ranks = True
    split = "left"

    def __init__(self, *, weighting: str = "samples", server_optimizer: ServerAdam | None = None):
        # no clip: FlexLoRA keeps the aggregate's norm; a server optimiser is refused by the base class
        super().__init__(weighting=weighting, server_optimizer=server_optimizer)

    def client_start(self, state: GlobalState, personal: Adapter | None, ctx: ClientContext) -> Adapter:
        start = state.adapter.clone()
        if ctx.rank is None:
            return start
        layers = {}
        for name, g in start.layers.items():
            r = ctx.rank
            if r > g.rank:
                raise ConfigError(f"client {ctx.client_id}: rank {r} exceeds the global adapter's rank {g.rank} "
                                  f"at layer {name!r}; FlexLoRA's global rank must be the largest client rank")
            layers[name] = g if r == g.rank else self._truncate(g, r, state.scaling / self.scaling(ctx, r), name)
        return Adapter(layers, start.extras)

    @staticmethod
    def _truncate(g: LoRAPair, r: int, rescale: float, name: str) -> LoRAPair:
        """The rank-r pair with B·A = rescale × (best rank-r approximation of g.B·g.A).

        A zero product (PEFT's init, B = 0) keeps the first r rows of A and columns of B, so the
        client starts from the same random A a fresh rank-r adapter would have. Otherwise the SVD is
        recomputed from the factors (O(d·r²)): the global is usually already ordered by singular
        value after a FlexLoRA round, but a warm-start or resumed adapter need not be.
        """
        if torch.count_nonzero(g.B) == 0 or torch.count_nonzero(g.A) == 0:
            return LoRAPair(g.A[:r].clone(), g.B[:, :r] * rescale)
        dt = compute_dtype(g.A, g.B)
        pair = lowrank_svd(g.A.to(dt), g.B.to(dt), f"global layer {name!r}").truncate(r).split("left")
        return LoRAPair(pair.A.to(g.A.dtype), (pair.B * rescale).to(g.B.dtype))
