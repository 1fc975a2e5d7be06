"""Re-factoring an exact aggregate into one rank-r LoRA pair by truncated SVD.

Not a strategy: the server pipeline that FlexLoRA, SVD redistribution, Subspace-Reg and FedSVD share
(methods-reference §3.2 and §4). Per adapted layer, with D the effective aggregate (scaling applied):

1. ‖D‖_F from D's singular values (D is never formed: its SVD comes from the stacked factors);
2. optional Frobenius clip: if ‖D‖_F > c, D ← D·c/‖D‖_F;
3. unscale: D / s_g, so that the global pair is used with the global scaling s_g;
4. rank-r truncation U_r·S_r·V_rᵀ (the best rank-r approximation, Eckart–Young);
5. split into B·A (``"left"``, ``"symmetric"`` or ``"orthonormal_b"``, see :meth:`LowRank.split`);
6. optional norm fix: A and B both times √(‖D‖_F / ‖s_g·B·A‖_F), so the rebuilt update has the
   clipped target's norm (Subspace-Reg's code compensates the energy lost to truncation this way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair, LowRank, factored_aggregate
from fedlora.strategies.base import ClientUpdate, GlobalState, Strategy


def refactor(agg: LowRank, rank: int, scaling: float, split: str, *, clip: float | None = None,
             norm_fix: bool = False) -> tuple[LoRAPair, dict[str, float]]:
    """Steps 1–6 above for one layer: the rank-``rank`` pair (B, A) with ``scaling``·B·A ≈ D.

    ``agg`` is the thin SVD of the effective aggregate D. Returns the pair (in ``agg``'s dtype) and a
    report: ``norm`` ‖D‖_F before the clip, ``clip_factor`` (1 when not clipped), ``retained``
    ‖truncated‖_F / ‖clipped D‖_F, and ``norm_fix`` (the factor on s·B·A; 1 when off).
    """
    norm = float(agg.S.norm())
    clip_factor = clip / norm if clip is not None and norm > clip else 1.0
    target = norm * clip_factor
    top = agg.truncate(rank)
    kept = float(top.S.norm()) * clip_factor  # = ‖s·B·A‖_F for every split, since B·A = U_r·S_r·V_rᵀ / s
    pair = LowRank(top.U, top.S * (clip_factor / scaling), top.Vh).split(split)
    fix = 1.0
    if norm_fix and kept > 0:
        fix = target / kept
        # both factors by the square root: the orthonormal-B gauge then has columns of equal norm √fix
        root = math.sqrt(fix)
        pair = LoRAPair(pair.A * root, pair.B * root)
    return pair, {"norm": norm, "clip_factor": clip_factor, "retained": kept / target if target > 0 else 1.0,
                  "norm_fix": fix}


def effective_weights(updates: Sequence[ClientUpdate], weights: Tensor) -> list[float]:
    """p_k·s_k: the weights that make Σ_k (p_k s_k)·B_k A_k the aggregate of the effective updates."""
    return [w * u.scaling for w, u in zip(weights.tolist(), updates)]


class SVDRefactoring(Strategy):
    """Base class of the strategies that re-factor an exact aggregate by truncated SVD each round.

    The server computes, per layer, the SVD of the effective aggregate D (default: Σ_k p_k s_k B_k A_k,
    exact and factored, :func:`fedlora.factors.factored_aggregate`) and keeps
    :func:`refactor`'s rank-r pair at the global scaling, r being the global adapter's rank. Extras
    are weighted-averaged. Subclasses choose ``split`` and ``norm_fix`` and may override
    :meth:`effective_aggregate`. The new state's ``info["refactor"]`` holds :func:`refactor`'s report
    per layer.

    Parameters:
        clip: optional bound c on ‖D‖_F per layer (default None: no clip).
        weighting: as in :class:`Strategy`. No server optimiser: the global factors are an SVD
            re-factoring, not an average.
    """

    factor_averaging = False
    #: the server needs Σ p_k s_k B_k A_k, a sum of products, not of the uploads
    secure_aggregation = False
    mixed_scalings = True
    split: ClassVar[str] = "left"
    norm_fix: ClassVar[bool] = False

    def __init__(self, *, clip: float | None = None, **kw):
        super().__init__(**kw)
        if clip is not None and (isinstance(clip, bool) or not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0)):
            raise ConfigError(f"strategy {self.name!r}: clip must be a positive finite number or None, got {clip!r}")
        self.clip = None if clip is None else float(clip)

    def effective_aggregate(self, name: str, updates: Sequence[ClientUpdate], weights: Tensor,
                            state: GlobalState) -> LowRank:
        """Thin SVD of layer ``name``'s D = Σ_k p_k s_k B_k A_k, from the stacked factors."""
        pairs = [u.adapter.layers[name] for u in updates]
        return factored_aggregate([p.B for p in pairs], [p.A for p in pairs], effective_weights(updates, weights),
                                  f"layer {name!r}")

    def _aggregate(self, updates: list[ClientUpdate], weights: Tensor, state: GlobalState) -> GlobalState:
        averaged, _ = self.average(updates, weights, state, frozenset({"extras"}))
        layers: dict[str, LoRAPair] = {}
        report: dict[str, dict[str, float]] = {}
        for name, g in state.adapter.layers.items():
            pair, report[name] = refactor(self.effective_aggregate(name, updates, weights, state), g.rank,
                                          state.scaling, self.split, clip=self.clip, norm_fix=self.norm_fix)
            layers[name] = LoRAPair(pair.A.to(g.A.dtype), pair.B.to(g.B.dtype))
        new = self.next_state(state, Adapter(layers, averaged.extras))
        new.info["refactor"] = report
        return new

