"""FFA-LoRA: federated LoRA with the A factor frozen at a shared random initialisation.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv 2403.12313 (methods-reference §4).

Every client trains only B on top of the same frozen A₀, so averaging B is averaging the products:
Σ_k p_k B_k A₀ = B̄ A₀, exact. A₀ is drawn from a seed, so no one ever needs to send it.

This module also holds the two frozen-factor tools that RoLoRA and FLoRA share:
:func:`seeded_kaiming_A` (a reproducible PEFT-style draw of A) and :func:`check_frozen`.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies.base import ALL_PARTS, ClientContext, GlobalState, Strategy
from fedlora.strategies.registry import register


def seeded_kaiming_A(rank: int, d_in: int, *key: object, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> Tensor:
    """A rank×d_in LoRA A drawn as PEFT draws it, but from a generator seeded by ``key``.

    PEFT initialises ``lora_A`` with ``kaiming_uniform_(A, a=√5)``, i.e. U(−1/√d_in, 1/√d_in).
    The generator's seed is a SHA-256 of the key parts (e.g. the run seed and the layer name), so
    every process that knows the key draws the same A. The draw is done in float32 on the CPU and
    then cast, so clients with different dtypes or devices agree to the cast; and since uniform_
    fills row by row, the first r rows of a rank-R draw equal the rank-r draw (FLoRA relies on
    this when it hands clients different ranks).
    """
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    A = torch.empty(rank, d_in, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
    return A.to(dtype=dtype, device=device)


def check_frozen(adapter: Adapter, reference: Adapter, parts: frozenset[str], ctx: ClientContext,
                 method: str) -> None:
    """Raise if local training changed a part (``"A"``, ``"B"``, ``"extras"``) that should be frozen.

    Methods that freeze a factor are exact only if the engine really froze it; the server never
    sees the frozen factor (it fills it in from the global state), so a training bug would be
    silent without this check. Compared at the trained adapter's dtype.
    """
    def same(t: Tensor, ref: Tensor) -> bool:
        return t.shape == ref.shape and torch.equal(t.detach(), ref.to(device=t.device, dtype=t.dtype))

    for name, pair in adapter.layers.items():
        ref = reference.layers[name]
        for part in ("A", "B"):
            if part in parts and not same(getattr(pair, part), getattr(ref, part)):
                raise AggregationInputError(
                    f"client {ctx.client_id}, layer {name!r}: {method} freezes {part} in round {ctx.round} but "
                    f"local training changed it (the engine must keep it frozen, see trainable())")
    if "extras" in parts:
        for key, t in adapter.extras.items():
            if not same(t, reference.extras[key]):
                raise AggregationInputError(
                    f"client {ctx.client_id}, key {key!r}: {method} freezes the extras in round {ctx.round} "
                    "but local training changed them")


@register
class FFA(Strategy):
    """FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): A frozen at a seeded init, B trained and averaged.

    Parameters: ``weighting`` (default ``"samples"``) and ``server_optimizer`` (default None) as in
    :class:`Strategy`; the server optimiser acts on B.

    :meth:`init_state` re-draws every layer's A with :func:`seeded_kaiming_A` keyed by
    (seed, layer name): PEFT's kaiming-uniform distribution, reproducible anywhere from the seed.
    An engine whose client did not take part in round 0 rebuilds A the same way instead of
    downloading it. B keeps the initial adapter's value (PEFT's zeros).

    Started from a trained adapter (``lora.init_adapter``): A is frozen at that adapter's A, not
    re-drawn (the start is then exactly the adapter; A travels in round 0's download as always),
    and B trains on from the adapter's B.

    Aggregation: B̄ = Σ p_k B_k, extras averaged; A never changes. Exact: Σ p_k B_k A₀ = B̄A₀.

    Communication per layer: upload r·d_out (B) each round; download r·(d_in + d_out) in round 0,
    r·d_out afterwards (A is known). Extras travel both ways.

    Secure-aggregation compatible: the server needs only Σ p_k B_k and Σ p_k extras_k.

    Differential privacy: client level (DP-FedAvg) clips the client's update, its uploaded B and head (A
    never moves) minus the global values it started from, to L2 norm C; the server adds N(0, σ²C²) to
    the sum and divides by the fixed denominator. B̄ is that noised average, so one client moves B̄A₀
    only through B, by at most C/denominator (FFA-LoRA's point: no noise enters A, so none is multiplied
    by A's noise). Sample level (DP-SGD) clips each example's gradient (of B and the head only); the
    upload is post-processing.
    """

    name = "ffa"

    def trainable(self, round: int) -> frozenset[str]:
        return frozenset({"B"})

    def upload_parts(self, round: int) -> frozenset[str]:
        return frozenset({"B", "extras"})

    def download_parts(self, round: int) -> frozenset[str]:
        return ALL_PARTS if round == 0 else frozenset({"B", "extras"})

    def before_upload(self, adapter: Adapter, reference: Adapter, ctx: ClientContext) -> tuple[Adapter, dict]:
        check_frozen(adapter, reference, frozenset({"A"}), ctx, "FFA-LoRA")
        return adapter, {}

    def init_state(self, adapter: Adapter, *, alpha: float = 16.0, seed: int = 0,
                   start_scaling: float | None = None) -> GlobalState:
        state = super().init_state(adapter, alpha=alpha, seed=seed, start_scaling=start_scaling)
        if start_scaling is not None:  # a trained adapter: A stays frozen where it is
            return state
        state.adapter = state.adapter.map(lambda name, p: LoRAPair(
            seeded_kaiming_A(p.rank, p.A.shape[1], "ffa", seed, name, dtype=p.A.dtype, device=p.A.device), p.B))
        return state
