"""Client-level DP-FedAvg's two halves: the client clips its update, the server noises the sum.

A client's update is its upload minus its start, over the parts it uploads this round
(``Strategy.upload_parts``: "A", "B", "extras"), taken as one flat vector: its L2 norm is the root of
the summed squares of every uploaded tensor's difference. Pure torch; no privacy package needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from fedlora.factors import Adapter, LoRAPair


def _parts(adapter: Adapter, parts: frozenset[str]) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor) of the uploaded parts, in a fixed order (layers sorted, then extras sorted)."""
    for name in sorted(adapter.layers):
        pair = adapter.layers[name]
        if "A" in parts:
            yield f"{name}::A", pair.A
        if "B" in parts:
            yield f"{name}::B", pair.B
    if "extras" in parts:
        for key in sorted(adapter.extras):
            yield key, adapter.extras[key]


def update_norm(upload: Adapter, start: Adapter, parts: frozenset[str]) -> float:
    """‖upload − start‖₂ over ``parts``, as one vector (float64 sums)."""
    total = 0.0
    for (_, u), (_, s) in zip(_parts(upload, parts), _parts(start, parts)):
        total += float(((u.detach().double() - s.detach().to(u.device).double()) ** 2).sum())
    return math.sqrt(total)


def _with(start: Adapter, parts: frozenset[str], values: dict[str, Tensor]) -> Adapter:
    """``start`` with the uploaded parts replaced by ``values`` (keyed as :func:`_parts`)."""
    layers = {}
    for name, pair in start.layers.items():
        layers[name] = LoRAPair(values.get(f"{name}::A", pair.A), values.get(f"{name}::B", pair.B))
    extras = {k: values.get(k, v) for k, v in start.extras.items()}
    return Adapter(layers, extras)


def clip_update(upload: Adapter, start: Adapter, parts: frozenset[str], clip: float) -> tuple[Adapter, float]:
    """``start + δ·min(1, C/‖δ‖)`` with δ = upload − start over ``parts``; the other parts as in
    ``upload``. Returns the clipped upload and ‖δ‖ before clipping."""
    norm = update_norm(upload, start, parts)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    values = {}
    for (key, u), (_, s) in zip(_parts(upload, parts), _parts(start, parts)):
        s = s.to(device=u.device, dtype=u.dtype)
        values[key] = s + (u - s) * factor if factor < 1.0 else u
    clipped = _with(upload, parts, values)
    return clipped, norm


def noised_mean(uploads: Sequence[Adapter], start: Adapter, parts: frozenset[str], *, clip: float, sigma: float,
                denominator: float, generator: torch.Generator) -> Adapter:
    """The server's release: ``start + (Σ_k clip_C(upload_k − start) + N(0, σ²C²·I)) / denominator``
    over ``parts``; the other parts are ``start``'s. Each update is clipped again here (a no-op for
    a client that clipped, up to round-off), so the sum's sensitivity is C whatever a client sent.
    The noise is drawn on the CPU in float64 from ``generator``, in the fixed order of the keys, so
    the same seed gives the same noise on any engine; zero uploads (an empty Poisson round) release
    noise alone."""
    sums: dict[str, Tensor] = {key: torch.zeros_like(s, dtype=torch.float64, device="cpu")
                               for key, s in _parts(start, parts)}
    for upload in uploads:
        clipped, _ = clip_update(upload, start, parts, clip)
        for (key, u), (_, s) in zip(_parts(clipped, parts), _parts(start, parts)):
            sums[key] += u.detach().to("cpu", torch.float64) - s.detach().to("cpu", torch.float64)
    values = {}
    for key, s in _parts(start, parts):
        noise = torch.randn(s.shape, generator=generator, dtype=torch.float64) * (sigma * clip) if sigma > 0 else 0.0
        mean = (sums[key] + noise) / denominator
        values[key] = (s.detach().to("cpu", torch.float64) + mean).to(s.dtype)
    return _with(start, parts, values)
