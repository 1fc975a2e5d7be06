"""LoRA-FAIR: FedAvg of the factors plus a server-side residual on B toward the ideal update.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv 2411.14961 (methods-reference §4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair, stack_factors
from fedlora.server_opt import ServerAdam
from fedlora.strategies._refactor import effective_weights
from fedlora.strategies.base import ClientUpdate, GlobalState, Strategy
from fedlora.strategies.registry import register


class CosineObjective:
    """f(ΔB) = −cos(ΔW, (B̄ + ΔB)·Ā) + λ‖ΔB‖_F for one layer, from r×r and d×r pieces only.

    With ΔW = B_cat·A_cat (stacked client factors) and B' = B̄ + ΔB:
    ⟨ΔW, B'Ā⟩ = tr(B'ᵀ·B_cat·A_cat·Āᵀ) = ⟨B', M⟩ with M = B_cat·(A_cat·Āᵀ) (d_out×r), and
    ‖B'Ā‖² = tr((B'ᵀB')(ĀĀᵀ)). ‖ΔW‖² = tr((B_catᵀB_cat)(A_catA_catᵀ)). No d_out×d_in matrix.
    """

    def __init__(self, ideal: LoRAPair, A_bar: Tensor, B_bar: Tensor, lam: float):
        A_cat, B_cat = ideal
        self.B_bar, self.lam = B_bar, lam
        self.M = B_cat @ (A_cat @ A_bar.T)
        self.G = A_bar @ A_bar.T
        self.ideal_norm = ((B_cat.T @ B_cat) * (A_cat @ A_cat.T)).sum().clamp_min(0).sqrt()

    def product_norm(self, delta: Tensor) -> Tensor:
        """‖(B̄ + ΔB)·Ā‖_F."""
        Bp = self.B_bar + delta
        return ((Bp.T @ Bp) * self.G).sum().clamp_min(0).sqrt()

    def cosine(self, delta: Tensor) -> Tensor:
        """cos(ΔW, (B̄ + ΔB)·Ā); 0 where either side is zero."""
        denom = self.ideal_norm * self.product_norm(delta)
        return ((self.B_bar + delta) * self.M).sum() / denom if denom > 0 else denom * 0

    def __call__(self, delta: Tensor) -> Tensor:
        return -self.cosine(delta) + self.lam * torch.linalg.matrix_norm(delta)


def correct_b(ideal: LoRAPair, A_bar: Tensor, B_bar: Tensor, *, lam: float, steps: int, lr: float
              ) -> tuple[Tensor, dict[str, float]]:
    """The residual ΔB ≈ argmin −cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖_F, by ``steps`` gradient steps from 0.

    ``ideal`` is ΔW as stacked factors (A_cat, B_cat). Each step is a gradient step of size ``lr``,
    halved until the objective decreases (at most 40 halvings, then the search stops): the objective
    never rises, so the corrected cosine is at least cos(ΔW, B̄Ā) + λ‖ΔB‖. A zero ΔW or B̄Ā leaves
    ΔB = 0. Computed in float64 (float32 on MPS). Returns ΔB and {cos_before, cos_after, delta_norm, b_norm}.
    """
    # float64: near the optimum successive objective values differ by less than float32 resolves,
    # and the descent test would stall (MPS has no float64: float32 there)
    dt = torch.float32 if B_bar.device.type == "mps" else torch.float64
    f = CosineObjective(LoRAPair(ideal.A.to(dt), ideal.B.to(dt)), A_bar.to(dt), B_bar.to(dt), lam)
    delta = torch.zeros_like(f.B_bar)
    before = float(f.cosine(delta))
    if f.ideal_norm > 0 and f.product_norm(delta) > 0:  # otherwise the cosine has no gradient
        step = lr
        for _ in range(steps):
            d = delta.detach().requires_grad_(True)
            loss = f(d)
            (grad,) = torch.autograd.grad(loss, d)
            with torch.no_grad():
                for _ in range(40):
                    candidate = delta - step * grad
                    if f(candidate) < loss:
                        delta = candidate
                        break
                    step /= 2
                else:
                    break  # no descent at any step size: a (numerical) stationary point
    with torch.no_grad():
        after = float(f.cosine(delta))
    return delta, {"cos_before": before, "cos_after": after, "delta_norm": float(delta.norm()),
                   "b_norm": float(f.B_bar.norm())}


@register
class LoRAFAIR(Strategy):
    """LoRA-FAIR (Bian et al., ICCV 2025): averaged factors, B corrected toward the ideal update.

    Server, per layer: Ā = Σ p_k A_k, B̄ = Σ p_k B_k (:meth:`Strategy.average`), the ideal update
    ΔW = Σ_k p_k s_k B_k A_k (stacked, exact; = Σ p_k B_k A_k up to the common scaling), and a
    residual ΔB minimising −cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖_F by server-side gradient steps from ΔB = 0
    (:func:`correct_b`). Broadcast Ā and B̄' = B̄ + ΔB; clients start the next round from them
    ("Avg-Initial"). Extras are weighted-averaged. The new state's ``info["correction"]`` holds, per
    layer, the cosine before and after, ‖ΔB‖_F and ‖B̄‖_F.

    Parameters:
        lam: λ, the weight of ‖ΔB‖_F (default 0.01, the paper's default; λ = 0 loses accuracy there).
        steps: gradient steps on the server per layer (default 50).
        lr: initial step size (default 0.01), halved whenever a step would not lower the objective.
        weighting: as in :class:`Strategy`.

    ``steps``, ``lr``, the plain (not squared) Frobenius norm and the step-halving safeguard are our
    choices: the paper solves the problem "with SGD on the server" and the values were not found
    (methods-reference §4). ``factor_averaging`` is False: the correction is defined on the plain
    average, and a server optimiser moving Ā and B̄ away from it is not part of the method.

    Communication: as FedIT, r·(d_in + d_out) per layer each way. Not secure-aggregation compatible
    (the server needs Σ p_k B_k A_k).

    Differential privacy: client level is refused: the server fits its correction to the individual
    products in each client's upload, so noise on the sum does not cover what it releases, and no sound
    mechanism (local noise on each upload, or noise on a dense aggregate with a bounded sensitivity
    before re-factoring) is implemented yet. Sample level (DP-SGD) works: each example's gradient is
    clipped and noised on the client, and the upload is post-processing.
    """

    name = "lorafair"
    secure_aggregation = False
    factor_averaging = False

    def __init__(self, *, lam: float = 0.01, steps: int = 50, lr: float = 0.01, weighting: str = "samples",
                 server_optimizer: ServerAdam | None = None):
        super().__init__(weighting=weighting, server_optimizer=server_optimizer)
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"strategy 'lorafair': lam must be a finite number ≥ 0, got {lam!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"strategy 'lorafair': steps must be an integer ≥ 0, got {steps!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"strategy 'lorafair': lr must be a positive finite number, got {lr!r}")
        self.lam, self.steps, self.lr = float(lam), steps, float(lr)

    def _aggregate(self, updates: list[ClientUpdate], weights: Tensor, state: GlobalState) -> GlobalState:
        averaged, _ = self.average(updates, weights, state, frozenset({"A", "B", "extras"}))
        ws = effective_weights(updates, weights)
        layers, report = {}, {}
        for name, (A_bar, B_bar) in averaged.layers.items():
            ideal = self.ideal_update(name, updates, ws)
            delta, report[name] = correct_b(ideal, A_bar, B_bar, lam=self.lam, steps=self.steps, lr=self.lr)
            layers[name] = LoRAPair(A_bar, (B_bar.to(delta.dtype) + delta).to(B_bar.dtype))
        new = self.next_state(state, Adapter(layers, averaged.extras))
        new.info["correction"] = report
        return new

    @staticmethod
    def ideal_update(name: str, updates: Sequence[ClientUpdate], weights: Sequence[float]) -> LoRAPair:
        """ΔW = Σ_k w_k B_k A_k for layer ``name`` as stacked factors (A_cat, B_cat)."""
        pairs = [u.adapter.layers[name] for u in updates]
        return stack_factors([p.B for p in pairs], [p.A for p in pairs], weights)
