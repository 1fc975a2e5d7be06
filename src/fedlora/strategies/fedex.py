"""FedEx-LoRA: FedAvg of the factors plus the exact residual folded into the frozen base weights.

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Large Language Models", ACL 2025, arXiv 2410.09432; code
RaghavSinghal10/fedex-lora (methods-reference §4).

W₀ ← W₀ + (Σ p_k s_k B_k A_k − s·B̄Ā): the next round's model W₀ + s·B̄Ā is then exactly the
average of the clients' models.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.factors import stack_factors
from fedlora.strategies.base import ClientUpdate, GlobalState, Strategy
from fedlora.strategies.flora import client_terms
from fedlora.strategies.registry import register


@register
class FedEx(Strategy):
    """FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): FedAvg plus the exact residual.

    Parameters: ``weighting`` and ``server_optimizer`` as in :class:`Strategy` (default
    ``"samples"``, None). With a server optimiser the residual is taken against the factors the
    optimiser produced, so the merged model stays exact.

    Server, each round: (B_g, A_g) = the (optimised) average of the factors, extras averaged; then
    ``base_delta[layer]`` = Σ p_k s_k B_k A_k − s·B_g A_g as effective factors
    B_res = [B_1 … B_N, B_g] and A_res = [p_1 s_1 A_1; …; p_N s_N A_N; −s·A_g] (rank ≤ (N+1)·r,
    at least float32). Each client's term uses its own scaling s_k, the global term the global s.
    No d_out×d_in matrix is formed.

    Communication per layer: upload r·(d_in + d_out); download r·(d_in + d_out) for the factors
    plus the residual, (N+1)·r·(d_in + d_out) in factored form (float32). That is below the dense
    residual's d_out·d_in whenever (N+1)·r·(d_in + d_out) < d_out·d_in (e.g. RoBERTa-large,
    1024×1024, r = 4: up to N = 126 clients); beyond that an engine would rather send it dense.

    Not secure-aggregation compatible: the residual needs Σ p_k B_k A_k, a sum of products of each
    client's own factors, which the sums Σ p_k B_k and Σ p_k A_k do not give.

    Differential privacy: client level is refused: the server needs the mean of the products B_k·A_k as
    well as of the factors, i.e. each client's upload, so noise on the sum does not cover what it
    releases, and no sound mechanism (local noise on each upload, or noise on a dense aggregate with a
    bounded sensitivity before re-factoring) is implemented yet. Sample level (DP-SGD) works: each
    example's gradient is clipped and noised on the client, and the upload is post-processing.
    """

    name = "fedex"
    secure_aggregation = False
    mixed_scalings = True  # the residual weighs each client by its own s_k

    def _aggregate(self, updates: list[ClientUpdate], weights: Tensor, state: GlobalState) -> GlobalState:
        adapter, opt_state = self.average(updates, weights, state, self.upload_parts(state.round))
        base_delta = {}
        for name, g in adapter.layers.items():
            Bs, As, coefs = client_terms(updates, weights, name)
            base_delta[name] = stack_factors(Bs + [g.B], As + [g.A], coefs + [-state.scaling], f"layer {name!r}")
        return self.next_state(state, adapter, server_opt=opt_state, base_delta=base_delta)
