"""Gauge alignment of LoRA factors: the FedRot-LoRA family (methods-reference §1.2).

For any invertible G, (B·G)(G⁻¹·A) = B·A, so clients can re-gauge their factors before upload
without changing their update. FedRot-LoRA picks an orthogonal G = R by Procrustes against the
previous global factors; the ablations pick a random rotation or a scalar.

All rotations are computed in float32 (float64 if the factors are float64) whatever the factor
dtype, and lie in SO(r): the determinant is fixed to +1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.factors import LoRAPair


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _nearest_special_orthogonal(M: Tensor) -> Tensor:
    """argmax_{R ∈ SO(r)} tr(Rᵀ M): with M = U Σ Vᵀ, R = U·diag(1, …, 1, det(U Vᵀ))·Vᵀ.

    The same formula is the polar projection of M onto SO(r) (nearest rotation in Frobenius norm).
    Works on a batch (…, r, r): one batched SVD and determinant for all layers.
    """
    U, _, Vh = torch.linalg.svd(M)
    sign = torch.where(torch.linalg.det(U @ Vh) < 0, -1.0, 1.0).to(M.dtype)
    # flip the direction of the smallest singular value (the last row of Vᵀ) where det < 0
    Vh = torch.cat([Vh[..., :-1, :], Vh[..., -1:, :] * sign[..., None, None]], dim=-2)
    return U @ Vh


def procrustes(M: Tensor) -> Tensor:
    """The rotation R* ∈ SO(r) that maximises tr(Rᵀ M) for the r×r cross matrix M (or a batch of them).

    - Aligning A (min ‖Rᵀ A − A_ref‖_F): M = A·A_refᵀ.
    - Aligning B (min ‖B R − B_ref‖_F): M = Bᵀ·B_ref.
    """
    return _nearest_special_orthogonal(M.to(_work_dtype(M)))


def soft_rotation(R_star: Tensor, lam: float) -> Tensor:
    """FedRot's soft rotation: R' = (1 − λ)·I + λ·R*, projected to the nearest rotation.

    λ = 0 returns the identity exactly (plain FedIT); λ = 1 returns R* (hard Procrustes).
    The paper's Lemma A.1 bounds ‖R_soft − I‖_F ≤ 2λ‖R* − I‖_F.
    """
    check_lambda(lam)
    eye = torch.eye(R_star.shape[-1], dtype=R_star.dtype, device=R_star.device)
    if lam == 0:
        return eye.expand_as(R_star).clone()
    if lam == 1:
        return R_star
    return _nearest_special_orthogonal((1 - lam) * eye + lam * R_star)


def check_lambda(lam: float) -> None:
    if not (0.0 <= float(lam) <= 1.0):
        raise ConfigError(f"fedrot strength lambda={lam} is outside [0, 1]")


def haar_rotation(r: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-random rotation in SO(r): QR of a Gaussian matrix with the sign fix, then det fix."""
    G = torch.randn(r, r, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(R))  # makes the distribution Haar on O(r)
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q.to(dtype)


def alignment_rotation(pair: LoRAPair, ref: LoRAPair, factor: str, lam: float = 1.0) -> Tensor:
    """The (soft) rotation that aligns ``factor`` ("A" or "B") of ``pair`` to ``ref``.

    The factors may carry leading batch dimensions (A: …×r×d_in, B: …×d_out×r): one rotation per
    batch entry, computed with batched linear algebra.
    """
    dt = _work_dtype(pair.A)
    if factor == "A":
        M = pair.A.to(dt) @ ref.A.to(dt).mT
    elif factor == "B":
        M = pair.B.to(dt).mT @ ref.B.to(dt)
    else:
        raise ConfigError(f"aligned factor must be 'A' or 'B', got {factor!r}")
    if M.shape[-1] != M.shape[-2]:
        raise ConfigError(f"cannot align rank {pair.A.shape[-2]} factors to a rank {ref.A.shape[-2]} reference")
    return soft_rotation(procrustes(M), lam)


def rotate(pair: LoRAPair, R: Tensor) -> LoRAPair:
    """Re-gauge one layer (or a batch): A ← Rᵀ·A, B ← B·R. The product B·A is unchanged.

    The multiplication happens in the rotation's dtype (≥ float32); the result is cast back to the
    factors' dtype.
    """
    dt = R.dtype
    return LoRAPair((R.mT @ pair.A.to(dt)).to(pair.A.dtype), (pair.B.to(dt) @ R).to(pair.B.dtype))


def scalar_gauge(pair: LoRAPair, ref: LoRAPair, factor: str) -> tuple[LoRAPair, float]:
    """The scalar-gauge ablation: c* = ⟨Q, Q_ref⟩ / ‖Q‖² for Q the aligned factor.

    Aligning A gives (B/c, c·A); aligning B gives (c·B, A/c). A vanishing c (no overlap with the
    reference) leaves the pair unchanged, since the gauge would not be invertible.
    """
    if factor not in ("A", "B"):
        raise ConfigError(f"aligned factor must be 'A' or 'B', got {factor!r}")
    dt = _work_dtype(pair.A)
    Q = (pair.A if factor == "A" else pair.B).to(dt)
    Q_ref = (ref.A if factor == "A" else ref.B).to(dt)
    denom = (Q * Q).sum()
    c = float((Q * Q_ref).sum() / denom) if denom > 0 else 0.0
    if abs(c) < 1e-12:
        return pair, 1.0
    A, B = pair.A.to(dt), pair.B.to(dt)
    if factor == "A":
        A, B = c * A, B / c
    else:
        A, B = A / c, c * B
    return LoRAPair(A.to(pair.A.dtype), B.to(pair.B.dtype)), c
