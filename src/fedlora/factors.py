"""LoRA factor algebra: the Adapter type, the exact factored aggregate, and Gram-trick norms.

Notation (one adapted layer): A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r}, the layer's update is ΔW = s·B·A.

Nothing here ever forms a d_out×d_in matrix unless that is the cheaper route (when the stacked rank
Σr_k reaches min(d_out, d_in), a dense product costs no more than the factored one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError, ConfigError

LORA_A_MARK = ".lora_A."
LORA_B_MARK = ".lora_B."


class LoRAPair(NamedTuple):
    """The two factors of one adapted layer: ΔW = s·B·A."""

    A: Tensor  # r × d_in
    B: Tensor  # d_out × r

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the layer this pair adapts."""
        return self.B.shape[0], self.A.shape[1]


@dataclass
class Adapter:
    """An ordered mapping from layer name to its LoRA factors, plus extras.

    ``extras`` holds non-LoRA trainable tensors that travel with the adapter, such as a
    sequence-classification head (PEFT's ``modules_to_save``). Strategies average extras by
    weight unless they say otherwise (FedSA can keep the head local).
    """

    layers: dict[str, LoRAPair]
    extras: dict[str, Tensor] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> Adapter:
        """Build from a PEFT adapter state dict (``get_peft_model_state_dict``).

        ``x.lora_A.weight`` / ``x.lora_B.weight`` pairs become layer ``x``; every other key is an
        extra. A layer with only one of its two factors is an error that names the layer.
        """
        a_keys: dict[str, str] = {}
        b_keys: dict[str, str] = {}
        extras: dict[str, Tensor] = {}
        for key, value in state.items():
            if LORA_A_MARK in key:
                a_keys[key.split(LORA_A_MARK)[0]] = key
            elif LORA_B_MARK in key:
                b_keys[key.split(LORA_B_MARK)[0]] = key
            else:
                extras[key] = value
        for name in a_keys.keys() ^ b_keys.keys():
            missing = "lora_B" if name in a_keys else "lora_A"
            raise AggregationInputError(f"layer {name!r} has no {missing} weight in the state dict")
        layers = {name: LoRAPair(state[a_keys[name]], state[b_keys[name]]) for name in a_keys}
        return cls(layers, extras)

    def to_state_dict(self, suffix: str = "weight") -> dict[str, Tensor]:
        """The inverse of :meth:`from_state_dict`: PEFT key names, factors then extras."""
        out: dict[str, Tensor] = {}
        for name, pair in self.layers.items():
            out[f"{name}{LORA_A_MARK}{suffix}"] = pair.A
            out[f"{name}{LORA_B_MARK}{suffix}"] = pair.B
        out.update(self.extras)
        return out

    # ---- views --------------------------------------------------------------------------------
    def __iter__(self):
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    def map(self, fn: Callable[[str, LoRAPair], LoRAPair], extras: bool = True) -> Adapter:
        """A new adapter with ``fn`` applied to every layer; extras are copied by reference."""
        return Adapter({n: fn(n, p) for n, p in self.layers.items()}, dict(self.extras) if extras else {})

    def clone(self) -> Adapter:
        return Adapter(
            {n: LoRAPair(p.A.detach().clone(), p.B.detach().clone()) for n, p in self.layers.items()},
            {k: v.detach().clone() for k, v in self.extras.items()},
        )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Adapter:
        return Adapter(
            {n: LoRAPair(p.A.to(device=device, dtype=dtype), p.B.to(device=device, dtype=dtype))
             for n, p in self.layers.items()},
            {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
             for k, v in self.extras.items()},
        )

    def tensors(self, parts: Iterable[str] = ("A", "B", "extras")) -> dict[str, Tensor]:
        """Flat name → tensor for the given parts ("A", "B", "extras"), in PEFT key names."""
        parts = set(parts)
        out: dict[str, Tensor] = {}
        for name, pair in self.layers.items():
            if "A" in parts:
                out[f"{name}{LORA_A_MARK}weight"] = pair.A
            if "B" in parts:
                out[f"{name}{LORA_B_MARK}weight"] = pair.B
        if "extras" in parts:
            out.update(self.extras)
        return out

    def nbytes(self, parts: Iterable[str] = ("A", "B", "extras")) -> int:
        """Bytes of the given parts, at their stored dtype."""
        return sum(t.numel() * t.element_size() for t in self.tensors(parts).values())

    def ranks(self) -> dict[str, int]:
        return {n: p.rank for n, p in self.layers.items()}


def check_shapes(pair: LoRAPair, where: str) -> None:
    """Raise unless ``pair`` is a 2-D A (r×d_in) and B (d_out×r) with 1 ≤ r ≤ min(d_out, d_in)."""
    A, B = pair
    if A.dim() != 2 or B.dim() != 2:
        raise AggregationInputError(f"{where}: factors must be 2-D, got A{tuple(A.shape)} B{tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise AggregationInputError(
            f"{where}: rank mismatch, A is {tuple(A.shape)} (r×d_in) but B is {tuple(B.shape)} (d_out×r)")
    r, (d_out, d_in) = A.shape[0], pair.shape
    if r < 1:
        raise AggregationInputError(f"{where}: rank 0 (empty factors A{tuple(A.shape)} B{tuple(B.shape)})")
    if r > min(d_out, d_in):
        raise AggregationInputError(f"{where}: rank {r} exceeds the layer's dimensions {d_out}×{d_in}")


def check_pair(pair: LoRAPair, where: str) -> None:
    """Shape and finiteness checks for one layer; ``where`` names the client and layer."""
    check_shapes(pair, where)
    for label, t in (("A", pair.A), ("B", pair.B)):
        if not torch.isfinite(t).all():
            raise AggregationInputError(f"{where}: factor {label} contains NaN or Inf")


def check_uploads(adapters: Sequence[Adapter], client_ids: Sequence[object] | None = None,
                  same_ranks: bool = True, check_extras: bool = True, first: str | None = None) -> None:
    """Validate a round's client adapters against each other (and against ``adapters[0]``).

    Raises :class:`AggregationInputError` naming the client, the layer (or key) and the problem:
    an empty round, layer names that differ, shapes that differ, NaN or Inf, or a rank outside
    [1, the layer's dimensions]. Ranks may differ between clients when ``same_ranks`` is False.
    ``first`` names ``adapters[0]`` when it is not a client's (e.g. "the global adapter").
    """
    if len(adapters) == 0:
        raise AggregationInputError("empty round: no client uploads to aggregate")
    ids = list(client_ids) if client_ids is not None else list(range(len(adapters)))
    if len(ids) != len(adapters):
        raise AggregationInputError(f"{len(ids)} client ids for {len(adapters)} adapters")
    names = [f"client {cid}" for cid in ids]
    if first is not None:
        names[0] = first
    ref, ref_id = adapters[0], names[0]
    for cid, ad in zip(names, adapters):
        if list(ad.layers) != list(ref.layers):
            missing = [n for n in ref.layers if n not in ad.layers]
            extra = [n for n in ad.layers if n not in ref.layers]
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else "a different order"
            raise AggregationInputError(f"{cid}: layer names differ from {ref_id}'s: {detail}")
        for name, pair in ad.layers.items():
            where = f"{cid}, layer {name!r}"
            check_pair(pair, where)
            rp = ref.layers[name]
            if pair.shape != rp.shape:
                raise AggregationInputError(
                    f"{where}: layer shape {pair.shape} differs from {ref_id}'s {rp.shape}")
            if same_ranks and pair.rank != rp.rank:
                raise AggregationInputError(
                    f"{where}: rank {pair.rank} differs from {ref_id}'s rank {rp.rank}, and this "
                    "strategy needs equal ranks")
        if not check_extras:
            continue
        if set(ad.extras) != set(ref.extras):
            diff = sorted(set(ad.extras) ^ set(ref.extras))
            raise AggregationInputError(f"{cid}: extra keys differ from {ref_id}'s: {diff[:3]}")
        for key, t in ad.extras.items():
            if t.shape != ref.extras[key].shape:
                raise AggregationInputError(
                    f"{cid}, key {key!r}: shape {tuple(t.shape)} differs from {ref_id}'s "
                    f"{tuple(ref.extras[key].shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AggregationInputError(f"{cid}, key {key!r}: contains NaN or Inf")


def normalize_weights(weights: Sequence[float] | Tensor, client_ids: Sequence[object] | None = None) -> Tensor:
    """Weights p_k summing to one (float64). Zero, negative or non-finite weights name the client."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise AggregationInputError(f"client weights must be numbers, got {weights!r}") from e
    if w.numel() == 0:
        raise AggregationInputError("empty round: no client weights")
    ids = list(client_ids) if client_ids is not None else list(range(w.numel()))
    if len(ids) != w.numel():
        raise AggregationInputError(f"{w.numel()} client weights for {len(ids)} client ids")
    for cid, wk in zip(ids, w.tolist()):
        if not math.isfinite(wk) or wk <= 0:
            raise AggregationInputError(f"client {cid}: weight {wk} must be positive and finite")
    w = w / w.max()  # first to at most 1, so that the sum of huge finite weights cannot overflow
    return w / w.sum()


# ---- the exact aggregate, factored ---------------------------------------------------------------


class LowRank(NamedTuple):
    """A thin SVD U·diag(S)·Vh of a d_out×d_in matrix that is never formed."""

    U: Tensor  # d_out × q, orthonormal columns
    S: Tensor  # q, non-increasing, non-negative
    Vh: Tensor  # q × d_in, orthonormal rows

    def truncate(self, r: int) -> LowRank:
        """The best rank-r approximation (Eckart–Young), padded with zeros if q < r."""
        if r < 1:
            raise ConfigError(f"cannot truncate to rank {r}: the rank must be at least 1")
        q = self.S.shape[0]
        if r <= q:
            return LowRank(self.U[:, :r], self.S[:r], self.Vh[:r])
        pad = r - q
        return LowRank(
            torch.cat([self.U, self.U.new_zeros(self.U.shape[0], pad)], 1),
            torch.cat([self.S, self.S.new_zeros(pad)]),
            torch.cat([self.Vh, self.Vh.new_zeros(pad, self.Vh.shape[1])], 0),
        )

    def split(self, how: str) -> LoRAPair:
        """Factor U·S·Vh as B·A.

        - ``"left"``: B = U·S, A = Vh (FlexLoRA's common split; FedSVD's orthonormal A).
        - ``"symmetric"``: B = U·√S, A = √S·Vh (SVD redistribution).
        - ``"orthonormal_b"``: B = U, A = S·Vh (Subspace-Reg's orthonormal-B gauge).
        """
        if how == "left":
            return LoRAPair(self.Vh, self.U * self.S)
        if how == "symmetric":
            root = self.S.sqrt()
            return LoRAPair(root[:, None] * self.Vh, self.U * root)
        if how == "orthonormal_b":
            return LoRAPair(self.S[:, None] * self.Vh, self.U)
        raise ConfigError(f"unknown split {how!r}; expected 'left', 'symmetric' or 'orthonormal_b'")

    def dense(self) -> Tensor:
        """The full matrix; for tests and small shapes only."""
        return (self.U * self.S) @ self.Vh

    def frobenius(self) -> Tensor:
        return self.S.norm()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: half-precision factors are aggregated in float32."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def check_terms(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor | None = None,
                what: str = "the terms") -> None:
    """Raise unless the products B_k·A_k exist and are all of one layer's shape, with one weight each.

    Inner dimensions (ranks) may differ and exceed the layer's (a stacked base delta). ``what``
    names the layer (or the caller) in the message.
    """
    if len(Bs) == 0:
        raise AggregationInputError(f"{what}: no factors to combine")
    if len(As) != len(Bs):
        raise AggregationInputError(f"{what}: {len(Bs)} B factors but {len(As)} A factors")
    if weights is not None and len(weights) != len(Bs):
        raise AggregationInputError(f"{what}: {len(weights)} weights for {len(Bs)} pairs of factors")
    shape = None
    for k, (B, A) in enumerate(zip(Bs, As)):
        pair = LoRAPair(A, B)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AggregationInputError(f"{what}, term {k}: B{tuple(B.shape)}·A{tuple(A.shape)} is not a matrix product")
        shape = shape or pair.shape
        if pair.shape != shape:
            raise AggregationInputError(f"{what}, term {k}: layer shape {pair.shape} differs from term 0's {shape}")


def stack_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor,
                  what: str = "stack_factors") -> LoRAPair:
    """FLoRA's stacking: B_cat = [B_1 … B_N], A_cat = [w_1·A_1; …; w_N·A_N], so B_cat·A_cat = Σ w_k B_k A_k.

    Exact for any ranks per client. Computed in at least float32. ``what`` names the layer in errors.
    """
    check_terms(Bs, As, weights, what)
    dt = compute_dtype(*Bs, *As)
    w = torch.as_tensor(weights, dtype=dt)
    B_cat = torch.cat([B.to(dt) for B in Bs], dim=1)
    A_cat = torch.cat([wk * A.to(dt) for wk, A in zip(w, As)], dim=0)
    return LoRAPair(A_cat, B_cat)


def svd(M: Tensor, what: str, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd``, with its failure (NaN or Inf in ``M``, or no convergence) raised as an
    AggregationInputError that names ``what`` (the layer) instead of a bare LinAlgError."""
    try:
        return torch.linalg.svd(M, full_matrices=full_matrices)
    except torch.linalg.LinAlgError as e:
        cause = "it holds NaN or Inf" if not torch.isfinite(M).all() else "the SVD did not converge"
        raise AggregationInputError(f"{what}: cannot take the SVD of a {tuple(M.shape)} matrix, {cause} "
                                    "(the factors overflowed or were not finite)") from e


def lowrank_svd(A: Tensor, B: Tensor, what: str = "lowrank_svd") -> LowRank:
    """Thin SVD of B·A without forming it (design.md, "Numerics").

    QR both factors (B = Q_b R_b, Aᵀ = Q_a R_a), take the SVD of the small core R_b·R_aᵀ = U'SV'ᵀ,
    then U = Q_b U', Vh = V'ᵀ Q_aᵀ. Cost O((d_out + d_in)·R²) for inner dimension R. When R reaches
    min(d_out, d_in) the dense SVD is no more expensive and is used instead. ``what`` names the
    layer in the AggregationInputError raised for mismatched or non-finite factors.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise AggregationInputError(f"{what}: B{tuple(B.shape)}·A{tuple(A.shape)} is not a matrix product")
    d_out, d_in, R = B.shape[0], A.shape[1], A.shape[0]
    if R >= min(d_out, d_in):
        return LowRank(*svd(B @ A, what))
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = svd(Rb @ Ra.T, what)
    return LowRank(Qb @ Uc, S, Vch @ Qa.T)


def factored_aggregate(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor,
                       what: str = "factored_aggregate") -> LowRank:
    """The SVD of the exact aggregate ΔW = Σ_k w_k B_k A_k, from the stacked factors.

    Ranks may differ between clients. Never forms a d_out×d_in matrix unless Σr_k ≥ min(d_out, d_in).
    ``what`` names the layer in error messages.
    """
    A_cat, B_cat = stack_factors(Bs, As, weights, what)
    return lowrank_svd(A_cat, B_cat, what)


# ---- norms and inner products through Gram matrices ---------------------------------------------


def product_gram(Bs: Sequence[Tensor], As: Sequence[Tensor]) -> Tensor:
    """G_ij = ⟨B_i A_i, B_j A_j⟩_F for every pair, without forming any product.

    ⟨B_i A_i, B_j A_j⟩ = tr(A_iᵀ B_iᵀ B_j A_j) = tr((B_iᵀ B_j)(A_j A_iᵀ)) = Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ).
    One (Σr)² Gram of each stacked factor, then block sums. Returned in float64.
    """
    check_terms(Bs, As, None, "product_gram")
    dt = compute_dtype(*Bs, *As)
    B_cat = torch.cat([B.to(dt) for B in Bs], dim=1)
    A_cat = torch.cat([A.to(dt) for A in As], dim=0)
    H = (B_cat.T @ B_cat) * (A_cat @ A_cat.T)  # elementwise: (B_iᵀB_j)_{ab} (A_i A_jᵀ)_{ab}
    ranks = torch.tensor([A.shape[0] for A in As])
    idx = torch.repeat_interleave(torch.arange(len(As)), ranks)
    n = len(As)
    # block sums: G = Pᵀ H P with P the R×N block indicator
    P = torch.zeros(H.shape[0], n, dtype=H.dtype)
    P[torch.arange(H.shape[0]), idx] = 1
    return (P.T @ H @ P).to(torch.float64)


def sum_sq_norm(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """‖Σ_k w_k B_k A_k‖_F² = wᵀ G w through the Gram matrix (float64, clamped at zero)."""
    check_terms(Bs, As, weights, "sum_sq_norm")
    w = torch.as_tensor(weights, dtype=torch.float64)
    return (w @ product_gram(Bs, As) @ w).clamp_min(0)


def lowrank_inner(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> Tensor:
    """⟨B1·A1, B2·A2⟩_F = tr((B1ᵀB2)(A2A1ᵀ))."""
    check_terms([B1, B2], [A1, A2], None, "lowrank_inner")
    dt = compute_dtype(A1, B1, A2, B2)
    return ((B1.to(dt).T @ B2.to(dt)) * (A1.to(dt) @ A2.to(dt).T)).sum()


def lowrank_sq_norm(A: Tensor, B: Tensor) -> Tensor:
    """‖B·A‖_F² = tr((BᵀB)(AAᵀ))."""
    return lowrank_inner(A, B, A, B).clamp_min(0)
