"""Server-side optimisers for factor-averaging strategies (FedOpt).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021: treat Δ = average − previous as a
pseudo-gradient step and feed it to an adaptive optimiser on the server. FedRot-LoRA's Table 16 runs
FedIT and FedRot-LoRA under this FedAdam server.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError, ConfigError


@dataclass
class ServerAdam:
    """FedAdam (Reddi et al. 2021, Algorithm 2), with no bias correction, as in the paper.

    m ← β₁·m + (1 − β₁)·Δ;  v ← β₂·v + (1 − β₂)·Δ²;  x ← x + η·m / (√v + τ),  Δ = mean − x.

    Parameters:
        lr: server learning rate η (default 1e-2).
        beta1: first-moment decay β₁ (default 0.9).
        beta2: second-moment decay β₂ (default 0.99).
        tau: adaptivity τ (default 1e-3).
    """

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        for name in ("lr", "beta1", "beta2", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"server optimiser {name}={value!r} must be a finite number")
        if not self.lr > 0:
            raise ConfigError(f"server optimiser lr={self.lr} must be positive")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"server optimiser {name}={getattr(self, name)} must be in [0, 1)")
        if not self.tau > 0:
            raise ConfigError(f"server optimiser tau={self.tau} must be positive")

    def step(self, prev: Mapping[str, Tensor], target: Mapping[str, Tensor],
             state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One step from ``prev`` toward ``target``; returns (new values, new moments).

        Moments are keyed ``m/<key>`` and ``v/<key>``; a key whose shape changed restarts at zero.
        """
        new, moments = {}, {}
        for key, x in prev.items():
            if key not in target or target[key].shape != x.shape:
                got = "nothing" if key not in target else f"shape {tuple(target[key].shape)}"
                raise AggregationInputError(f"server optimiser: {key!r} is {tuple(x.shape)} but the target has {got}")
            if not x.is_floating_point():
                new[key] = target[key]
                continue
            dt = torch.promote_types(x.dtype, torch.float32)
            delta = target[key].to(dt) - x.to(dt)
            m, v = state.get(f"m/{key}"), state.get(f"v/{key}")
            if m is None or m.shape != delta.shape:
                m, v = torch.zeros_like(delta), torch.zeros_like(delta)
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            new[key] = x.to(dt) + self.lr * m / (v.sqrt() + self.tau)
            moments[f"m/{key}"], moments[f"v/{key}"] = m, v
        return new, moments
