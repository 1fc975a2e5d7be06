"""FedRot-LoRA: rotational alignment of LoRA factors before aggregation.

Zhang, Kim, Cha, Vikalo, "FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA",
arXiv 2602.23638, ICML 2026 (methods-reference §1.2).

Each client, after local training and before upload, re-gauges every adapted layer with a rotation
R ∈ SO(r): A ← Rᵀ·A, B ← B·R. R is the Procrustes solution that aligns one factor (or, with
``align="joint"``, both at once) to the previous global factors (the reference the client started
from), softened by λ. Products B·A are unchanged, so is the communication; the server runs plain
FedAvg. Because the rotation happens on the client against factors it already holds, the server
needs only the weighted sum: secure-aggregation compatible.
"""

from __future__ import annotations

import zlib

import torch

from fedlora.align import alignment_rotation, check_lambda, guard_rotation, haar_rotation, rotate, scalar_gauge
from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair, check_uploads
from fedlora.strategies.base import ClientContext, Strategy
from fedlora.strategies.registry import register

ALIGN_MODES = ("alternate", "A", "B", "joint")
GAUGES = ("procrustes", "random", "scalar")


@register
class FedRot(Strategy):
    """FedRot-LoRA: soft Procrustes alignment on the client, FedAvg on the server.

    Parameters:
        lam: soft strength λ ∈ [0, 1] (default 0.4, the paper's best on MNLI, QQP, RTE and
            HumanEval). R' = (1 − λ)·I + λ·R*, projected to the nearest rotation. λ = 0 is exactly
            FedIT; λ = 1 is hard Procrustes in SO(r).
        align: which factor is matched to its reference. ``"alternate"`` (default): A in odd
            rounds, B in even rounds ≥ 2, as in the authors' code. ``"A"`` or ``"B"``: always that
            factor (the paper's single-factor ablations). ``"joint"``: every round ≥ 1, one
            Procrustes problem for both factors, min_{R ∈ SO(r)} ‖Rᵀ A − A_ref‖² + ‖B R − B_ref‖²,
            solved by the SVD of M = A A_refᵀ + Bᵀ B_ref (not in the paper; derivation in
            :func:`fedlora.align.alignment_rotation`). Not available with ``gauge="scalar"``.
        guard: ``False`` (default, the method as published) or ``True``: per layer, keep the
            rotation only if it leaves the factors, both counted, no further from their reference
            (‖RᵀA − A_ref‖² + ‖BR − B_ref‖² ≤ ‖A − A_ref‖² + ‖B − B_ref‖²), else send the layer
            unrotated. It answers the measured failure of aligning B against the small B_ref of the
            first rounds (docs/results §6); see :func:`fedlora.align.guard_rotation`. Procrustes
            gauge only. Not in the paper.
        gauge: ``"procrustes"`` (default, the method); ``"random"``, a Haar-random rotation per
            layer, client and round (the ablation that collapses); ``"scalar"``, the scalar gauge
            c* = ⟨Q, Q_ref⟩/‖Q‖² (the 1-degree-of-freedom ablation).
        weighting, server_optimizer: as in :class:`Strategy`.

    Round 0 is never aligned (the authors' ``state > 0``). Rotations are computed in float32
    whatever the factor dtype. The client's ``info`` reports the aligned factor ("A", "B" or
    "joint") and ‖R − I‖_F per layer; with the guard, also the layers it left unrotated
    (``guarded``).

    Differential privacy: client level (DP-FedAvg) clips the client's update, its rotated upload (RᵀA,
    BR and the head) minus the global values it started from, to L2 norm C; the server adds N(0, σ²C²)
    to the sum and divides by the fixed denominator. The server averages the rotated factors, so the
    noised average is the aggregate; the rotation is computed on the client from the global values,
    which are public. Sample level (DP-SGD) clips each example's gradient; the upload is post-
    processing.
    """

    name = "fedrot"

    def __init__(self, *, lam: float = 0.4, align: str = "alternate", gauge: str = "procrustes",
                 guard: bool = False, **kw):
        super().__init__(**kw)
        check_lambda(lam)
        if align not in ALIGN_MODES:
            raise ConfigError(f"fedrot align={align!r}; expected one of {ALIGN_MODES}")
        if gauge not in GAUGES:
            raise ConfigError(f"fedrot gauge={gauge!r}; expected one of {GAUGES}")
        if align == "joint" and gauge == "scalar":
            # the scalar gauge c* = ⟨Q, Q_ref⟩/‖Q‖² is defined for one factor Q only
            raise ConfigError("fedrot align='joint' needs gauge='procrustes' or 'random'; the scalar gauge aligns "
                              "one factor (align='A', 'B' or 'alternate')")
        if not isinstance(guard, bool):
            raise ConfigError(f"fedrot guard={guard!r}; expected true or false")
        if guard and gauge != "procrustes":
            raise ConfigError(f"fedrot guard=true needs gauge='procrustes', not {gauge!r}: the guard checks a "
                              "Procrustes alignment against its reference")
        self.lam, self.align, self.gauge, self.guard = float(lam), align, gauge, guard

    def aligned_factor(self, round: int) -> str | None:
        """The factor matched to its reference in ``round`` ("A", "B", or "joint" for both); None in round 0."""
        if round <= 0:
            return None
        if self.align != "alternate":
            return self.align
        return "A" if round % 2 == 1 else "B"

    def before_upload(self, adapter: Adapter, reference: Adapter, ctx: ClientContext) -> tuple[Adapter, dict]:
        """Rotate every layer (see the class); a trained adapter with NaN/Inf or with layers or
        shapes unlike the reference it started from raises AggregationInputError naming the layer."""
        check_uploads([reference, adapter], ["reference", ctx.client_id], check_extras=False,
                      first="the adapter it started from")
        factor = self.aligned_factor(ctx.round)
        if factor is None or (self.gauge == "procrustes" and self.lam == 0):
            return adapter, {}
        if self.gauge == "procrustes":
            layers, sizes, guarded = _procrustes_by_shape(adapter, reference, factor, self.lam, self.guard)
        else:
            layers, sizes, guarded = {}, {}, []
            gen = torch.Generator().manual_seed(zlib.crc32(f"{ctx.seed}/{ctx.client_id}/{ctx.round}".encode()))
            for name, pair in adapter.layers.items():
                if self.gauge == "scalar":
                    layers[name], c = scalar_gauge(pair, reference.layers[name], factor, f"layer {name!r}")
                    sizes[name] = abs(c - 1.0)
                    continue
                R = haar_rotation(pair.rank, gen, dtype=torch.float64 if pair.A.dtype == torch.float64 else torch.float32)
                layers[name] = rotate(pair, R)
                sizes[name] = float(torch.linalg.matrix_norm(R - torch.eye(R.shape[0], dtype=R.dtype)))
        info = {"aligned": factor, "rotation_size": sizes}
        if self.guard:
            info["guarded"] = guarded
        return Adapter({n: layers[n] for n in adapter.layers}, dict(adapter.extras)), info


def _procrustes_by_shape(adapter: Adapter, reference: Adapter, factor: str, lam: float, guard: bool = False):
    """Align every layer, batching layers of the same shape and dtype into one batched SVD and bmm.

    Per-layer work is a handful of tiny r×r operations, so a loop over layers is dominated by
    dispatch overhead; stacking same-shaped layers (e.g. every query and value of a transformer)
    makes it a few batched calls. Returns (layer → rotated pair, layer → ‖R − I‖_F, the layers the
    guard left unrotated).
    """
    groups: dict[tuple, list[str]] = {}
    for name, pair in adapter.layers.items():
        key = (tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype, pair.B.dtype, pair.A.device)
        groups.setdefault(key, []).append(name)
    layers, sizes, guarded = {}, {}, []
    for names in groups.values():
        stack = lambda src, i: torch.stack([src.layers[n][i] for n in names])  # noqa: E731
        pairs = LoRAPair(stack(adapter, 0), stack(adapter, 1))
        refs = LoRAPair(stack(reference, 0), stack(reference, 1))
        R = alignment_rotation(pairs, refs, factor, lam, f"layers {names}")
        if guard:
            R, reset = guard_rotation(pairs, refs, R)
            guarded += [n for n, r in zip(names, reset.tolist()) if r]
        rotated = rotate(pairs, R)
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
        for n, A, B, size in zip(names, rotated.A, rotated.B, torch.linalg.matrix_norm(R - eye).tolist()):
            layers[n], sizes[n] = LoRAPair(A, B), size
    return layers, sizes, guarded
