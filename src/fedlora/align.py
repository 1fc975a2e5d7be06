"""Gauge alignment of LoRA factors: the FedRot-LoRA family (methods-reference §1.2).

For any invertible G, (B·G)(G⁻¹·A) = B·A, so clients can re-gauge their factors before upload
without changing their update. FedRot-LoRA picks an orthogonal G = R by Procrustes against the
previous global factors; the ablations pick a random rotation or a scalar.

All rotations are computed in float32 (float64 if the factors are float64) whatever the factor
dtype, and lie in SO(r): the determinant is fixed to +1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError, ConfigError
from fedlora.factors import LoRAPair, svd


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _nearest_special_orthogonal(M: Tensor, what: str) -> Tensor:
    """argmax_{R ∈ SO(r)} tr(Rᵀ M): with M = U Σ Vᵀ, R = U·diag(1, …, 1, det(U Vᵀ))·Vᵀ.

    The same formula is the polar projection of M onto SO(r) (nearest rotation in Frobenius norm).
    Works on a batch (…, r, r): one batched SVD and determinant for all layers.
    """
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise AggregationInputError(f"{what}: the cross matrix must be r×r (or a batch of them), got {tuple(M.shape)}")
    U, _, Vh = svd(M, what)
    sign = torch.where(torch.linalg.det(U @ Vh) < 0, -1.0, 1.0).to(M.dtype)
    # flip the direction of the smallest singular value (the last row of Vᵀ) where det < 0
    Vh = torch.cat([Vh[..., :-1, :], Vh[..., -1:, :] * sign[..., None, None]], dim=-2)
    return U @ Vh


def procrustes(M: Tensor, what: str = "procrustes") -> Tensor:
    """The rotation R* ∈ SO(r) that maximises tr(Rᵀ M) for the r×r cross matrix M (or a batch of them).

    - Aligning A (min ‖Rᵀ A − A_ref‖_F): M = A·A_refᵀ.
    - Aligning B (min ‖B R − B_ref‖_F): M = Bᵀ·B_ref.
    - Aligning both at once (min ‖Rᵀ A − A_ref‖² + ‖B R − B_ref‖²): M = A·A_refᵀ + Bᵀ·B_ref.

    A non-square or non-finite M raises AggregationInputError naming ``what`` (e.g. the layers).
    """
    return _nearest_special_orthogonal(M.to(_work_dtype(M)), what)


def soft_rotation(R_star: Tensor, lam: float, what: str = "soft_rotation") -> Tensor:
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
    return _nearest_special_orthogonal((1 - lam) * eye + lam * R_star, what)


def check_lambda(lam: float) -> None:
    """Raise ConfigError unless ``lam`` is a number in [0, 1]."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ConfigError(f"strategy.options.lam = {lam!r}: FedRot's strength λ must be a number in [0, 1]")


def haar_rotation(r: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-random rotation in SO(r): QR of a Gaussian matrix with the sign fix, then det fix."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"a rotation needs a rank r ≥ 1, got {r!r}")
    G = torch.randn(r, r, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(R))  # makes the distribution Haar on O(r)
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q.to(dtype)


#: The factors ``alignment_rotation`` can match to their reference; "joint" matches both at once.
ALIGNABLE = ("A", "B", "joint")


def alignment_rotation(pair: LoRAPair, ref: LoRAPair, factor: str, lam: float = 1.0,
                       what: str = "alignment_rotation") -> Tensor:
    """The (soft) rotation that aligns ``factor`` ("A", "B" or "joint") of ``pair`` to ``ref``.

    R* maximises tr(Rᵀ M) over SO(r) (:func:`procrustes`), then is softened by λ
    (:func:`soft_rotation`). For an orthogonal R, ‖Rᵀ A‖ = ‖A‖ and ‖B R‖ = ‖B‖, so expanding the
    squares leaves one cross term per factor:

        ‖Rᵀ A − A_ref‖² = ‖A‖² + ‖A_ref‖² − 2 tr(A_refᵀ Rᵀ A) = const − 2 tr(Rᵀ · A A_refᵀ)
        ‖B R − B_ref‖²  = ‖B‖² + ‖B_ref‖² − 2 tr(B_refᵀ B R)  = const − 2 tr(Rᵀ · Bᵀ B_ref)

    "A" minimises the first (M = A A_refᵀ), "B" the second (M = Bᵀ B_ref), and "joint" their sum,
    whose cross terms add: M = A A_refᵀ + Bᵀ B_ref, one r×r SVD as for a single factor. In the joint
    problem each factor weighs in by its size: a small reference factor (B after its zero init)
    contributes a small term and leaves R to the other.

    The factors may carry leading batch dimensions (A: …×r×d_in, B: …×d_out×r): one rotation per
    batch entry, computed with batched linear algebra. Factors that do not match their reference
    in shape, or that are not finite, raise AggregationInputError naming ``what`` (e.g. the layers);
    an unknown ``factor`` raises ConfigError.
    """
    if factor not in ALIGNABLE:
        raise ConfigError(f"aligned factor must be one of {ALIGNABLE}, got {factor!r}")
    dt = _work_dtype(pair.A)
    M = 0
    for part in ("A", "B") if factor == "joint" else (factor,):
        Q, Q_ref = _aligned(pair, ref, part, what)
        Q, Q_ref = Q.to(dt), Q_ref.to(dt)
        M = M + (Q @ Q_ref.mT if part == "A" else Q.mT @ Q_ref)
    return soft_rotation(procrustes(M, what), lam, what)


def _aligned(pair: LoRAPair, ref: LoRAPair, factor: str, what: str) -> tuple[Tensor, Tensor]:
    """The factor to align and its reference, after checking that they have one shape."""
    if factor not in ("A", "B"):
        raise ConfigError(f"aligned factor must be 'A' or 'B', got {factor!r}")
    Q, Q_ref = getattr(pair, factor), getattr(ref, factor)
    if Q.shape != Q_ref.shape:
        raise AggregationInputError(f"{what}: factor {factor} of shape {tuple(Q.shape)} cannot be aligned to a "
                                    f"reference of shape {tuple(Q_ref.shape)}")
    return Q, Q_ref


def rotate(pair: LoRAPair, R: Tensor) -> LoRAPair:
    """Re-gauge one layer (or a batch): A ← Rᵀ·A, B ← B·R. The product B·A is unchanged.

    The multiplication happens in the rotation's dtype (≥ float32); the result is cast back to the
    factors' dtype.
    """
    r = pair.A.shape[-2]
    if R.shape[-2:] != (r, r):
        raise AggregationInputError(f"rotate: a rotation of shape {tuple(R.shape)} cannot re-gauge rank {r} factors")
    dt = R.dtype
    return LoRAPair((R.mT @ pair.A.to(dt)).to(pair.A.dtype), (pair.B.to(dt) @ R).to(pair.B.dtype))


def joint_distance(pair: LoRAPair, ref: LoRAPair) -> Tensor:
    """‖A − A_ref‖²_F + ‖B − B_ref‖²_F per layer (a scalar, or one value per batched layer), in
    float32 or float64: how far a layer's factors sit from the reference, both factors counted."""
    dt = _work_dtype(pair.A)
    dA = (pair.A.to(dt) - ref.A.to(dt)).square().sum(dim=(-2, -1))
    dB = (pair.B.to(dt) - ref.B.to(dt)).square().sum(dim=(-2, -1))
    return dA + dB


def guard_rotation(pair: LoRAPair, ref: LoRAPair, R: Tensor) -> tuple[Tensor, Tensor]:
    """(R with the identity put back wherever rotating would move that layer's factors, both
    counted, further from the reference; a bool mask of the layers so reset).

    Aligning one factor against a reference that is small (B in the first rounds after its zero
    initialisation) fixes R by noise and, because R also rotates the other factor, can push that
    factor far from its own reference. The guard keeps a layer's rotation only when
    :func:`joint_distance` after it is no larger than before, so it never makes the pair as a whole
    less aligned; the joint Procrustes rotation minimises that distance and is never reset (up to
    round-off, which the test allows for)."""
    before = joint_distance(pair, ref)
    after = joint_distance(rotate(pair, R), ref)
    reset = after > before
    if not bool(reset.any()):
        return R, reset
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    mask = reset.reshape(*reset.shape, 1, 1) if reset.dim() else reset
    return torch.where(mask, eye, R), reset


def scalar_gauge(pair: LoRAPair, ref: LoRAPair, factor: str, what: str = "scalar_gauge") -> tuple[LoRAPair, float]:
    """The scalar-gauge ablation: c* = ⟨Q, Q_ref⟩ / ‖Q‖² for Q the aligned factor.

    Aligning A gives (B/c, c·A); aligning B gives (c·B, A/c). A vanishing c (no overlap with the
    reference) leaves the pair unchanged, since the gauge would not be invertible. Mismatched
    shapes or a non-finite c raise AggregationInputError naming ``what``.
    """
    Q, Q_ref = _aligned(pair, ref, factor, what)
    dt = _work_dtype(pair.A)
    Q, Q_ref = Q.to(dt), Q_ref.to(dt)
    denom = (Q * Q).sum()
    c = float((Q * Q_ref).sum() / denom) if denom > 0 else 0.0
    if not math.isfinite(c):
        raise AggregationInputError(f"{what}: the scalar gauge is {c} (NaN or Inf in the factors)")
    if abs(c) < 1e-12:
        return pair, 1.0
    A, B = pair.A.to(dt), pair.B.to(dt)
    if factor == "A":
        A, B = c * A, B / c
    else:
        A, B = A / c, c * B
    return LoRAPair(A.to(pair.A.dtype), B.to(pair.B.dtype)), c
