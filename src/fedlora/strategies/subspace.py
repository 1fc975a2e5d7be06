"""Subspace-Reg: SVD redistribution with an orthonormal-B gauge, plus client proximal terms.

Senarath, Muralitharan, Asif, "Subspace-Constrained Federated Learning with Low-Rank Adaptation",
arXiv 2606.22724 (methods-reference §3.1–3.2, ``subspace_reg`` in the authors' code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.errors import ConfigError, FedLoRAError
from fedlora.factors import Adapter, lowrank_sq_norm
from fedlora.strategies._refactor import SVDRefactoring
from fedlora.strategies.registry import register


@register
class SubspaceReg(SVDRefactoring):
    """Subspace-Reg (Senarath et al., arXiv 2606.22724).

    Server, per layer (§3.2): the same pipeline as ``svd`` — D = Σ_k p_k s_k B_k A_k, optional clip
    to c, unscale by s_g, rank-r truncated SVD — with the split B = U_r (orthonormal columns),
    A = S_r V_rᵀ, then the norm fix, which multiplies both factors by the same √f: B's columns then
    have equal norms √f ≥ 1 (BᵀB = f·I). Extras are weighted-averaged.

    Client (§3.1, the authors' ``_regularization_term``), added to the task loss, the mean over
    adapted layers of

        ½μ‖s·B·A − s·B_g·A_g‖_F² + ½α_b‖B − B_g‖_F² + ½λ(‖A‖_F² + ‖B‖_F²),

    with (A_g, B_g) the global pair the client started from this round and s its LoRA scaling.

    Parameters:
        mu: μ, the proximal weight on the effective update (default 0.05, the shipped runs'
            ``args.json``; the report's Table 1 says 0.1).
        alpha_b: α, the pull of B toward the global basis B_g (default 0.01).
        lam: λ, weight decay on both factors (default 1e-5).
        clip: optional Frobenius bound c on D per layer (default None; the authors use 15.0 for
            RoBERTa and 25.0 for SmolLM).
        weighting: as in :class:`~fedlora.strategies.base.Strategy`.

    Communication: r·(d_in + d_out) per layer each way. Not secure-aggregation compatible.

    Differential privacy: client level is refused: the server re-factors the dense products of each
    client's upload, so noise on the sum does not cover what it releases, and no sound mechanism (local
    noise on each upload, or noise on a dense aggregate with a bounded sensitivity before re-factoring)
    is implemented yet. Sample level (DP-SGD) works: each example's gradient is clipped and noised on
    the client, and the upload is post-processing. Its proximal terms depend on the factors only, so
    under DP-SGD their gradient is added after the noise, at no privacy cost.
    """

    name = "subspace"
    split = "orthonormal_b"
    norm_fix = True

    def __init__(self, *, mu: float = 0.05, alpha_b: float = 0.01, lam: float = 1e-5, **kw):
        super().__init__(**kw)
        for label, v in (("mu", mu), ("alpha_b", alpha_b), ("lam", lam)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"strategy 'subspace': {label} must be a finite number ≥ 0, got {v!r}")
        self.mu, self.alpha_b, self.lam = float(mu), float(alpha_b), float(lam)

    def regularizer(self, live: Adapter, reference: Adapter, scaling: float) -> Tensor | None:
        """The mean over layers of the three terms above, differentiable in ``live``'s factors.

        The μ term never forms a d_out×d_in matrix. It writes B·A − B_g·A_g = (B − B_g)·A + B_g·(A − A_g)
        as one stacked product [B − B_g, B_g]·[A; A − A_g] and takes its squared norm through the Gram
        identity ‖X·Y‖_F² = tr((XᵀX)(YYᵀ)) (:func:`~fedlora.factors.lowrank_sq_norm`). Every Gram
        entry then carries a difference, so near the reference the value has no cancellation of
        large terms (the plain expansion ‖BA‖² − 2⟨BA, B_gA_g⟩ + ‖B_gA_g‖² would).
        """
        if not live.layers:
            return None
        terms = []
        for name, (A, B) in live.layers.items():
            if name not in reference.layers:
                raise FedLoRAError(f"subspace regularizer: layer {name!r} has no reference factors")
            A_g, B_g = (t.detach().to(device=A.device, dtype=A.dtype) for t in reference.layers[name])
            if A_g.shape != A.shape or B_g.shape != B.shape:
                raise FedLoRAError(f"subspace regularizer: layer {name!r} has factors A{tuple(A.shape)} "
                                   f"B{tuple(B.shape)} but its reference has A{tuple(A_g.shape)} B{tuple(B_g.shape)}")
            prox = scaling ** 2 * lowrank_sq_norm(torch.cat([A, A - A_g], 0), torch.cat([B - B_g, B_g], 1))
            basis = (B - B_g).square().sum()
            decay = A.square().sum() + B.square().sum()
            terms.append(0.5 * (self.mu * prox + self.alpha_b * basis + self.lam * decay))
        return torch.stack(terms).mean()
