"""SVD redistribution: the exact aggregate, clipped, truncated and split symmetrically.

Senarath, Muralitharan, Asif, "Subspace-Constrained Federated Learning with Low-Rank Adaptation",
arXiv 2606.22724 (methods-reference §3.2, the baseline ``svd`` in the authors' code).
"""

from __future__ import annotations

from fedlora.strategies._refactor import SVDRefactoring
from fedlora.strategies.registry import register


@register
class SVDRedistribution(SVDRefactoring):
    """SVD redistribution (Senarath et al., arXiv 2606.22724, §3.2 ``svd``).

    Server, per layer: D = Σ_k p_k s_k B_k A_k (exact, factored); if ‖D‖_F > c, D ← D·c/‖D‖_F;
    unscale by s_g; rank-r truncated SVD U_r S_r V_rᵀ; symmetric split B = U_r S_r^{1/2},
    A = S_r^{1/2} V_rᵀ (so BᵀB = AAᵀ); norm fix: A and B both times √(‖D‖_F / ‖s_g·B·A‖_F), so the
    rebuilt update has the clipped target's norm. Extras are weighted-averaged. Clients train A and B
    with no extra term.

    Parameters:
        clip: the Frobenius bound c per layer (default None: no clip). The authors' runs use
            ``max_effective_lora_update_norm`` = 15.0 (RoBERTa) and 25.0 (SmolLM).
        weighting: as in :class:`~fedlora.strategies.base.Strategy`.

    Communication: r·(d_in + d_out) per layer each way. Not secure-aggregation compatible.

    Differential privacy: client level is refused: the server re-factors the dense products of each
    client's upload, so noise on the sum does not cover what it releases, and no sound mechanism (local
    noise on each upload, or noise on a dense aggregate with a bounded sensitivity before re-factoring)
    is implemented yet. Sample level (DP-SGD) works: each example's gradient is clipped and noised on
    the client, and the upload is post-processing.
    """

    name = "svd"
    split = "symmetric"
    norm_fix = True
