"""FedSA-LoRA: share A, keep B personal.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025,
arXiv 2410.01463; code Pengxin-Guo/FedSA-LoRA (methods-reference §4).

A learns general knowledge and B client-specific knowledge, so only A is averaged. Each client's
model is W₀ + s·B_k·Ā: a personalised method, with no single global model to evaluate.
"""

from __future__ import annotations

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies.base import ALL_PARTS, ClientContext, GlobalState, Strategy, check_flag, check_rank
from fedlora.strategies.registry import register


@register
class FedSA(Strategy):
    """FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): clients train A and B, only A is averaged.

    Parameters:
        keep_head_local: keep the extras (e.g. the classification head) on the client like B
            (default False: extras are uploaded and averaged). The official GLUE config keeps the
            classifier local (``local_param: ['lora_B', 'classifier']``); set True to match it.
        rslora: use rsLoRA's scaling α/√r instead of PEFT's α/r (default False). True gives the
            FedSA-rsLoRA variant.
        weighting, server_optimizer: as in :class:`Strategy` (default ``"samples"``, None); the
            server optimiser acts on A (and shared extras).

    Client: :meth:`client_start` loads the global A with the client's personal B (the global B,
    i.e. the initial one, for a client that has none yet) and, when the head is local, its
    personal head. :meth:`personal_state` keeps B (and the head when local); the A slot of the
    personal adapter is an empty 0×d_in placeholder, because A always comes from the server.

    Server: Ā = Σ p_k A_k (and extras unless local). The global B is never aggregated: it stays
    the initial B, the starting point of clients that join later.

    Communication per layer: upload r·d_in (A) each round; download r·(d_in + d_out) in round 0
    (the initial A and B), r·d_in afterwards. Shared extras travel both ways.

    Secure-aggregation compatible: the server needs only Σ p_k A_k (and Σ p_k extras_k).

    Differential privacy: client level (DP-FedAvg) clips the client's update, its uploaded A (and the
    head unless kept local) minus the global values it started from, to L2 norm C; the server adds N(0,
    σ²C²) to the sum and divides by the fixed denominator. Ā is that noised average; each client's B
    never leaves it, so it is not released. Sample level (DP-SGD) clips each example's gradient; the
    upload is post-processing.
    """

    name = "fedsa"
    personalised = True

    def __init__(self, *, keep_head_local: bool = False, rslora: bool = False, **kw):
        super().__init__(**kw)
        self.keep_head_local = check_flag(keep_head_local, "keep_head_local", self.name)
        self.rslora = check_flag(rslora, "rslora", self.name)

    def scaling(self, ctx: ClientContext, rank: int) -> float:
        check_rank(rank, f"client {ctx.client_id}")
        return ctx.alpha / rank ** 0.5 if self.rslora else ctx.alpha / rank

    def shared_parts(self) -> frozenset[str]:
        """What is averaged: A, plus the extras unless they are kept local."""
        return frozenset({"A"} if self.keep_head_local else {"A", "extras"})

    def upload_parts(self, round: int) -> frozenset[str]:
        return self.shared_parts()

    def download_parts(self, round: int) -> frozenset[str]:
        return ALL_PARTS if round == 0 else self.shared_parts()

    def personal_state(self, adapter: Adapter) -> Adapter:
        layers = {n: LoRAPair(p.A.new_empty(0, p.A.shape[1]), p.B.detach().clone()) for n, p in adapter.layers.items()}
        extras = {k: v.detach().clone() for k, v in adapter.extras.items()} if self.keep_head_local else {}
        return Adapter(layers, extras)

    def client_start(self, state: GlobalState, personal: Adapter | None, ctx: ClientContext) -> Adapter:
        start = state.adapter.clone()
        if personal is None:
            return start
        layers = {}
        for name, g in start.layers.items():
            mine = personal.layers.get(name)
            if mine is None or mine.B.shape != g.B.shape:
                got = "no B" if mine is None else f"B of shape {tuple(mine.B.shape)}"
                raise AggregationInputError(
                    f"client {ctx.client_id}, layer {name!r}: personal state has {got}, the global adapter "
                    f"needs B of shape {tuple(g.B.shape)}")
            layers[name] = LoRAPair(g.A, mine.B.detach().clone().to(dtype=g.B.dtype, device=g.B.device))
        extras = dict(start.extras)
        if self.keep_head_local:
            for key, value in personal.extras.items():
                if key not in extras or extras[key].shape != value.shape:
                    raise AggregationInputError(
                        f"client {ctx.client_id}, key {key!r}: personal head does not match the global adapter's extras")
                extras[key] = value.detach().clone()
        return Adapter(layers, extras)
