"""RoLoRA: alternating optimisation of the LoRA factors, one factor per round.

Chen, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via Alternating Optimization of
LoRA", arXiv 2409.02346, NeurIPS 2025 as arXiv 2502.01755 (methods-reference §4, §1.6).

In each round one factor is frozen at its global value, identical on every client, and the other
is trained and averaged: Σ p_k B_k A = B̄A (and vice versa), so the aggregate is exact.
"""

from __future__ import annotations

from fedlora.factors import Adapter
from fedlora.strategies.base import ClientContext, Strategy, check_flag
from fedlora.strategies.ffa import check_frozen
from fedlora.strategies.registry import register


@register
class RoLoRA(Strategy):
    """RoLoRA (Chen et al., arXiv 2502.01755): train and share only A in odd rounds, only B in even rounds.

    Round 0 trains B first (A random, B zero), as the FedRot-LoRA repo runs it
    (``lora.rolora: True, method: swap, initialshare: 'B'``).

    Parameters:
        train_head: whether the extras (e.g. the classification head) train and are uploaded and
            averaged every round (default True). The FedRot repo's fixed RoLoRA (commit 36a67ef)
            freezes the head; set False to match it. With False the extras are neither trained nor
            uploaded; engines ask :meth:`trains_extras`.
        weighting, server_optimizer: as in :class:`Strategy` (default ``"samples"``, None); the
            server optimiser acts on the factor shared this round.

    Communication per layer: upload r·d_out (B) in even rounds, r·d_in (A) in odd rounds; download
    r·(d_in + d_out) (both global factors, so that a client that missed rounds starts from the
    current pair; a client present every round needs only the factor aggregated last round).

    Secure-aggregation compatible: the server needs only Σ p_k of the shared factor (and extras).

    Differential privacy: client level (DP-FedAvg) clips the client's update, the factor it uploads this
    round (A or B) and the head minus the global values it started from, to L2 norm C; the server adds
    N(0, σ²C²) to the sum and divides by the fixed denominator. The aggregate is that noised average.
    Sample level (DP-SGD) clips each example's gradient; the upload is post-processing.
    """

    name = "rolora"

    def __init__(self, *, train_head: bool = True, **kw):
        super().__init__(**kw)
        self.train_head = check_flag(train_head, "train_head", self.name)

    def trainable(self, round: int) -> frozenset[str]:
        return frozenset({"A"} if round % 2 == 1 else {"B"})

    def trains_extras(self, round: int) -> bool:
        """Whether the extras (the head) train, and are uploaded, in ``round``."""
        return self.train_head

    def upload_parts(self, round: int) -> frozenset[str]:
        return self.trainable(round) | ({"extras"} if self.trains_extras(round) else set())

    def before_upload(self, adapter: Adapter, reference: Adapter, ctx: ClientContext) -> tuple[Adapter, dict]:
        frozen = frozenset({"A", "B"}) - self.trainable(ctx.round)
        if not self.trains_extras(ctx.round):
            frozen |= {"extras"}
        check_frozen(adapter, reference, frozen, ctx, "RoLoRA")
        return adapter, {"trained": sorted(self.trainable(ctx.round))}
