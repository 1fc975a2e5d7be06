"""Per-round aggregation diagnostics, computed from the uploads and the new global state.

Every quantity is a norm or an inner product of sums of low-rank products, so it comes from one
Gram matrix per layer (``factors.product_gram``): never a d_out×d_in matrix. Per layer the stack is

    [s_1·B_1A_1, …, s_N·B_NA_N, s_g·B_gA_g, B_dA_d]     (clients, new global, base-weight change)

and G_ij = ⟨X_i, X_j⟩_F. With p the normalised client weights, the ideal aggregate is
ΔW* = Σ_k p_k s_k B_k A_k and the global update is ΔW_g = s_g B_g A_g + B_d A_d, so

- ‖ΔW*‖² = pᵀ G_cc p, ‖ΔW_k‖² = G_kk, ⟨ΔW_k, ΔW*⟩ = (G_cc p)_k,
- ‖ΔW* − ΔW_g‖² = uᵀ G u with u = [p, −1, −1]  (the aggregation error, methods-reference §1.1).

The Gram is taken in float64 whatever the factor dtype: the error is a difference of large terms, and
float64 keeps its floor near 1e-8·‖ΔW*‖ (float32 would leave about 3e-4·‖ΔW*‖).

Only the LoRA factors count; extras (a classifier head) are not part of ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, check_uploads, normalize_weights, product_gram
from fedlora.strategies.base import ClientContext, ClientUpdate, GlobalState, Strategy, check_round, check_scaling


@dataclass
class RoundDiagnostics:
    """One round's aggregation diagnostics. Undefined values (a zero norm in a denominator) are None.

    Overall values:
        agg_error, agg_error_rel: ‖ΔW* − ΔW_g‖_F over all layers (square root of the sum of the
            per-layer squares), and the same divided by ‖ΔW*‖_F over all layers.
        ideal_norm, global_norm: ‖ΔW*‖_F and ‖ΔW_g‖_F over all layers.
        cancellation: ‖Σ_k p_k ΔW_k‖ / Σ_k p_k ‖ΔW_k‖ (global Frobenius norms, methods-reference §3.3).
        cos_client_global: mean over clients of cos(vec ΔW_k, vec ΔW*), all layers concatenated.
        cos_pairwise: mean over unordered client pairs of cos(vec ΔW_i, vec ΔW_j); None for one client.
        basis_overlap: mean over (layer, client) of ‖Q_kᵀ Q_g‖_F / √min(r_k, r_g), clipped to [0, 1],
            Q the QR bases of the client's B and of the new global B (§3.3, the code's version). Pairs
            where either B is exactly zero (round 0's B, FLoRA's reset) have no subspace and are skipped;
            ``basis_overlap_pairs`` counts the pairs used.
        rotation_size_mean, rotation_size_max: ‖R − I‖_F over (client, layer) from FedRot's
            ``info["rotation_size"]``; None when no client reported one (and left out of ``to_dict``).
        guarded_fraction: the share of (client, layer) rotations that FedRot's guard reset to the
            identity (``info["guarded"]`` over the layers in ``info["rotation_size"]``); None when no
            client ran the guard (and left out of ``to_dict``).
        aligned: the factor FedRot matched to its reference this round, from the clients'
            ``info["aligned"]`` ("A", "B" or "joint"), so a report can split rounds by it; None when
            no client aligned anything (round 0, other strategies; left out of ``to_dict``).
        personalised: the caller's flag that the strategy keeps personal factors (FedSA, SFed), so
            the "global" adapter is not the model every client uses; the error is still ΔW* − ΔW_g.
    per_layer: layer → {"agg_error", "agg_error_rel", "ideal_norm", "global_norm", "basis_overlap"}.
    """

    num_clients: int
    agg_error: float
    agg_error_rel: float | None
    ideal_norm: float
    global_norm: float
    cancellation: float | None
    cos_client_global: float | None
    cos_pairwise: float | None
    basis_overlap: float | None
    basis_overlap_pairs: int
    rotation_size_mean: float | None = None
    rotation_size_max: float | None = None
    guarded_fraction: float | None = None
    aligned: str | None = None
    personalised: bool = False
    per_layer: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self, per_layer: bool = True) -> dict[str, Any]:
        """A JSON-friendly dict: the overall values flat, ``per_layer`` nested (left out if False)."""
        out: dict[str, Any] = {
            "num_clients": self.num_clients,
            "agg_error": self.agg_error,
            "agg_error_rel": self.agg_error_rel,
            "ideal_norm": self.ideal_norm,
            "global_norm": self.global_norm,
            "cancellation": self.cancellation,
            "cos_client_global": self.cos_client_global,
            "cos_pairwise": self.cos_pairwise,
            "basis_overlap": self.basis_overlap,
            "basis_overlap_pairs": self.basis_overlap_pairs,
            "personalised": self.personalised,
        }
        if self.rotation_size_mean is not None:
            out["rotation_size_mean"] = self.rotation_size_mean
            out["rotation_size_max"] = self.rotation_size_max
        if self.guarded_fraction is not None:
            out["guarded_fraction"] = self.guarded_fraction
        if self.aligned is not None:
            out["aligned"] = self.aligned
        if per_layer:
            out["per_layer"] = {name: dict(vals) for name, vals in self.per_layer.items()}
        return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _f64(t: Tensor) -> Tensor:
    """A detached float64 CPU copy: diagnostics are measurements, never part of a training graph."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def _orthonormal_basis(B: Tensor) -> Tensor | None:
    """The QR basis of B's columns (the §3.3 code's choice); None for an all-zero B (no subspace)."""
    if not bool(B.any()):
        return None
    return torch.linalg.qr(_f64(B)).Q


def _subspace_overlap(Qk: Tensor, Qg: Tensor) -> float:
    r = min(Qk.shape[1], Qg.shape[1])
    return min(1.0, max(0.0, float(torch.linalg.matrix_norm(Qk.T @ Qg)) / math.sqrt(r)))


def _check_inputs(updates: Sequence[ClientUpdate], weights: Sequence[float] | Tensor, new_state: GlobalState) -> Tensor:
    """Everything :func:`round_diagnostics` reads, checked as the strategies check a round (names the
    client, layer or value); returns the normalised weights."""
    check_round(updates, max(new_state.round - 1, 0))  # the round that produced new_state
    check_scaling(new_state.scaling, "the new global state")
    # the new global adapter goes last: the clients' layers and shapes are compared among themselves
    check_uploads([u.adapter for u in updates] + [new_state.adapter], [u.client_id for u in updates] + ["global"],
                  same_ranks=False, check_extras=False)
    for name, pair in (new_state.base_delta or {}).items():
        if name not in new_state.adapter.layers:
            raise AggregationInputError(f"base_delta layer {name!r} is not a layer of the global adapter")
        if pair.shape != new_state.adapter.layers[name].shape or pair.A.shape[0] != pair.B.shape[1]:
            raise AggregationInputError(
                f"base_delta layer {name!r}: factors A{tuple(pair.A.shape)} B{tuple(pair.B.shape)} do not "
                f"make the layer's {new_state.adapter.layers[name].shape} update")
        if not (torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all()):
            raise AggregationInputError(f"base_delta layer {name!r}: contains NaN or Inf")
    n_weights = torch.as_tensor(weights).numel() if isinstance(weights, Tensor) else len(weights)
    if n_weights != len(updates):
        raise AggregationInputError(f"{n_weights} weights for {len(updates)} client updates")
    return normalize_weights(weights, [u.client_id for u in updates])


def round_diagnostics(updates: Sequence[ClientUpdate], weights: Sequence[float] | Tensor,
                      new_state: GlobalState, *, personalised: bool = False) -> RoundDiagnostics:
    """Aggregation diagnostics of one round (see :class:`RoundDiagnostics` for each value).

    Args:
        updates: the round's client updates with complete adapters (as after ``Strategy.receive``);
            client k's update is ΔW_k = s_k·B_k·A_k with s_k = ``update.scaling``.
        weights: the aggregation weights p_k (normalised here).
        new_state: the global state the aggregation returned; its update is
            s_g·B_g·A_g + base_delta (base_delta's factors already scaled, as FedEx and FLoRA fold
            part of the aggregate into the frozen base).
        personalised: set for strategies whose clients keep personal factors (FedSA's B, SFed), e.g.
            ``personalised=keeps_personal_state(strategy)``; the error is computed by the same
            formula and the flag is recorded with it.

    Ranks may differ between clients and from the global rank. Raises AggregationInputError naming
    the client, layer or value for mismatched layers or shapes, NaN/Inf, a client id twice, or a
    weight, sample count or scaling that is not positive and finite.
    """
    p = _check_inputs(updates, weights, new_state)
    adapters = [u.adapter for u in updates]
    n = len(updates)
    scal = torch.tensor([float(u.scaling) for u in updates], dtype=torch.float64)
    s_g = float(new_state.scaling)
    base = new_state.base_delta or {}
    f64 = torch.float64

    sq_client = torch.zeros(n, dtype=f64)  # Σ_layers ‖ΔW_k‖²
    cross_client = torch.zeros(n, n, dtype=f64)  # Σ_layers ⟨ΔW_i, ΔW_j⟩
    err_sq = ideal_sq = global_sq = 0.0
    overlaps: list[float] = []
    per_layer: dict[str, dict[str, float | None]] = {}
    for name, g_pair in new_state.adapter.layers.items():
        Bs = [_f64(ad.layers[name].B) for ad in adapters] + [_f64(g_pair.B)]
        As = [s * _f64(ad.layers[name].A) for s, ad in zip(scal.tolist(), adapters)] + [s_g * _f64(g_pair.A)]
        if name in base:
            Bs.append(_f64(base[name].B))
            As.append(_f64(base[name].A))
        G = product_gram(Bs, As)
        u = torch.cat([p, -torch.ones(len(Bs) - n, dtype=f64)])
        g_u = u.clone()
        g_u[:n] = 0  # the global update alone: s_g B_g A_g + base delta
        l_err = float((u @ G @ u).clamp_min(0).sqrt())
        l_ideal = float((p @ G[:n, :n] @ p).clamp_min(0).sqrt())
        l_glob = float((g_u @ G @ g_u).clamp_min(0).sqrt())
        sq_client += G.diagonal()[:n]
        cross_client += G[:n, :n]
        err_sq += l_err**2
        ideal_sq += l_ideal**2
        global_sq += l_glob**2

        Qg = _orthonormal_basis(g_pair.B)
        layer_overlaps = []
        if Qg is not None:
            for ad in adapters:
                Qk = _orthonormal_basis(ad.layers[name].B)
                if Qk is not None:
                    layer_overlaps.append(_subspace_overlap(Qk, Qg))
        overlaps += layer_overlaps
        per_layer[name] = {"agg_error": l_err, "agg_error_rel": _ratio(l_err, l_ideal), "ideal_norm": l_ideal,
                           "global_norm": l_glob, "basis_overlap": _mean(layer_overlaps)}

    ideal_norm = math.sqrt(ideal_sq)
    client_norms = sq_client.clamp_min(0).sqrt()
    with_ideal = cross_client @ p  # ⟨vec ΔW_k, vec ΔW*⟩ over all layers
    cos_cg = [float(with_ideal[k]) / (float(client_norms[k]) * ideal_norm)
              for k in range(n) if client_norms[k] > 0 and ideal_norm > 0]
    cos_pw = [float(cross_client[i, j]) / float(client_norms[i] * client_norms[j])
              for i in range(n) for j in range(i + 1, n) if client_norms[i] > 0 and client_norms[j] > 0]
    rot = rotation_sizes(updates)
    return RoundDiagnostics(
        num_clients=n,
        agg_error=math.sqrt(err_sq),
        agg_error_rel=_ratio(math.sqrt(err_sq), ideal_norm),
        ideal_norm=ideal_norm,
        global_norm=math.sqrt(global_sq),
        cancellation=_ratio(ideal_norm, float(p @ client_norms)),
        cos_client_global=_mean(cos_cg),
        cos_pairwise=_mean(cos_pw),
        basis_overlap=_mean(overlaps),
        basis_overlap_pairs=len(overlaps),
        rotation_size_mean=_mean(rot),
        rotation_size_max=max(rot) if rot else None,
        guarded_fraction=guarded_fraction(updates),
        aligned=aligned_factor(updates),
        personalised=personalised,
        per_layer=per_layer,
    )


def keeps_personal_state(strategy: Strategy) -> bool:
    """Whether the strategy's clients keep factors of their own between rounds (its declared
    ``personalised``), so no single global model is what every client uses."""
    return strategy.personalised


def guarded_fraction(updates: Sequence[ClientUpdate]) -> float | None:
    """The share of the clients' (client, layer) rotations that FedRot's guard left as the identity:
    Σ len(info["guarded"]) / Σ len(info["rotation_size"]) over the clients that ran the guard."""
    reset = total = 0
    for u in updates:
        names = u.info.get("guarded") if u.info else None
        if names is None:
            continue
        if not isinstance(names, (list, tuple)):
            raise AggregationInputError(f"client {u.client_id}: info['guarded'] must list layer names, "
                                        f"got {type(names).__name__}")
        reset += len(names)
        total += len(u.info.get("rotation_size") or {})
    return reset / total if total else None


def rotation_sizes(updates: Sequence[ClientUpdate]) -> list[float]:
    """Every ‖R − I‖_F the clients reported in ``info["rotation_size"]`` (FedRot), over (client, layer)."""
    sizes: list[float] = []
    for u in updates:
        reported = u.info.get("rotation_size") if u.info else None
        if reported is None:
            continue
        if not isinstance(reported, Mapping):
            raise AggregationInputError(
                f"client {u.client_id}: info['rotation_size'] must map layer → ‖R − I‖_F, got {type(reported).__name__}")
        try:
            sizes += [float(v) for v in reported.values()]
        except (TypeError, ValueError) as e:
            raise AggregationInputError(f"client {u.client_id}: info['rotation_size'] holds a value that is not a "
                                        f"number ({e})") from e
    return sizes


def aligned_factor(updates: Sequence[ClientUpdate]) -> str | None:
    """The factor the round's clients aligned, from ``info["aligned"]`` (FedRot: "A", "B" or "joint");
    None when none reported one. Every client of a round runs the same schedule, so clients that
    disagree (or some that report a factor and some that do not) mean mixed uploads: refused, naming
    the clients of each answer."""
    by_value: dict[str | None, list[str]] = {}
    for u in updates:
        value = u.info.get("aligned") if u.info else None
        if value is not None and not isinstance(value, str):
            raise AggregationInputError(f"client {u.client_id}: info['aligned'] must be a factor name, got "
                                        f"{type(value).__name__}")
        by_value.setdefault(value, []).append(str(u.client_id))
    if len(by_value) > 1:
        said = "; ".join(f"{value if value is not None else 'nothing'} by client(s) {', '.join(ids)}"
                         for value, ids in by_value.items())
        raise AggregationInputError(f"the round's clients disagree on the aligned factor: {said}")
    return next(iter(by_value), None)


def communication_bytes(strategy: Strategy, start_state: GlobalState,
                        clients: Sequence[ClientUpdate | Adapter],
                        contexts: Sequence[ClientContext] | None = None) -> dict[str, Any]:
    """Bytes each client uploaded and downloaded in the round that started from ``start_state``.

    Upload: ``strategy.upload_bytes(adapter, start_state.round)`` of the client's trained adapter.
    Download: ``strategy.download_bytes(start_state, ctx)``. Without ``contexts``, client k's context
    is ClientContext(client id, round=start_state.round, its sample count, rank=its adapter's rank).

    Returns {"bytes_up": {client: n}, "bytes_down": {client: n}, "bytes_up_mean", "bytes_down_mean",
    "bytes_up_total", "bytes_down_total"}.
    """
    if len(clients) == 0:
        raise AggregationInputError("empty round: no clients to count bytes for")
    if contexts is not None and len(contexts) != len(clients):
        raise AggregationInputError(f"{len(contexts)} client contexts for {len(clients)} clients")
    up: dict[str, int] = {}
    down: dict[str, int] = {}
    for k, c in enumerate(clients):
        adapter = c.adapter if isinstance(c, ClientUpdate) else c
        if contexts is not None:
            ctx = contexts[k]
        else:
            cid = c.client_id if isinstance(c, ClientUpdate) else k
            ranks = set(adapter.ranks().values())
            ctx = ClientContext(client_id=cid, round=start_state.round,
                                num_samples=c.num_samples if isinstance(c, ClientUpdate) else 1,
                                rank=ranks.pop() if len(ranks) == 1 else None, num_clients=len(clients))
        key = str(ctx.client_id)
        if key in up:
            raise AggregationInputError(f"client {ctx.client_id}: appears twice in the round")
        up[key] = int(strategy.upload_bytes(adapter, start_state.round))
        down[key] = int(strategy.download_bytes(start_state, ctx))
    return {"bytes_up": up, "bytes_down": down,
            "bytes_up_mean": sum(up.values()) / len(up), "bytes_down_mean": sum(down.values()) / len(down),
            "bytes_up_total": sum(up.values()), "bytes_down_total": sum(down.values())}
