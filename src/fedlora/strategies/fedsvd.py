"""FedSVD: clients train B only; the server re-factors B̄·A by SVD with an orthonormal A.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025, arXiv 2505.12805 (methods-reference §4; the variant with clip and norm fix follows
the Subspace-Reg authors' implementation, §3.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.factors import LowRank, compute_dtype, lowrank_svd
from fedlora.strategies._refactor import SVDRefactoring, effective_weights
from fedlora.strategies.base import ClientUpdate, GlobalState
from fedlora.strategies.registry import register


@register
class FedSVD(SVDRefactoring):
    """FedSVD (Lee et al., NeurIPS 2025): train and upload B; the server re-orthogonalises A.

    Client: A is frozen at the global A; only B (and the extras) train and travel up.
    Server, per layer: D = s·B̄·A_g with B̄ = Σ_k p_k B_k and A_g the previous global A (in general
    D = (Σ_k p_k s_k B_k)·A_g, the same when every client has scaling s); optional clip; unscale;
    SVD (rank ≤ r, so the truncation is exact); A = V_rᵀ (orthonormal rows), B = U_r S_r; norm fix
    (a factor 1 up to rounding, since nothing is truncated). Both A and B are broadcast.

    Parameters:
        clip: optional Frobenius bound c on D per layer (default None).
        weighting: as in :class:`~fedlora.strategies.base.Strategy`.

    Communication: r·d_out per layer up, r·(d_in + d_out) down. Secure-aggregation compatible: the
    server needs only Σ_k p_k s_k B_k (and the averaged extras), a weighted sum of the uploads; A_g
    is its own.

    Differential privacy: client level (DP-FedAvg) clips the client's update, its uploaded B and head
    minus the global values it started from, to L2 norm C; the server adds N(0, σ²C²) to the sum and
    divides by the fixed denominator. The server's SVD of B̄A (A the public previous global) is post-
    processing of the noised B̄, so it costs no privacy (FedSVD's point: an orthonormal A keeps B's
    gradients bounded under DP-SGD). Sample level (DP-SGD) clips each example's gradient (of B and the
    head); the upload is post-processing.
    """

    name = "fedsvd"
    secure_aggregation = True
    split = "left"
    norm_fix = True

    def trainable(self, round: int) -> frozenset[str]:
        return frozenset({"B"})

    def upload_parts(self, round: int) -> frozenset[str]:
        return frozenset({"B", "extras"})

    def effective_aggregate(self, name: str, updates: Sequence[ClientUpdate], weights: Tensor,
                            state: GlobalState) -> LowRank:
        """SVD of (Σ_k p_k s_k B_k)·A_g with the previous global A (never a client's copy of it)."""
        A_g = state.adapter.layers[name].A
        Bs = [u.adapter.layers[name].B for u in updates]
        dt = compute_dtype(A_g, *Bs)
        B_bar = torch.zeros(Bs[0].shape, dtype=dt, device=Bs[0].device)
        for w, B in zip(effective_weights(updates, weights), Bs):
            B_bar.add_(B.to(dt), alpha=w)
        # B̄·A_g has rank ≤ r: the QR route costs O((d_in + d_out)·r²)
        return lowrank_svd(A_g.to(dt), B_bar, f"layer {name!r}")
