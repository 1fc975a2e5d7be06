"""FedIT: federated instruction tuning with plain FedAvg of the LoRA factors.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024.
Ā = Σ p_k A_k, B̄ = Σ p_k B_k. The global update B̄Ā differs from Σ p_k B_k A_k by the aggregation
error E = (1/2)Σ_{i,j} p_i p_j (B_i − B_j)(A_i − A_j) (methods-reference §1.1).
"""

from fedlora.strategies.base import Strategy
from fedlora.strategies.registry import register


@register
class FedIT(Strategy):
    """FedAvg of A, B and the extras (the base class's defaults).

    Parameters: ``weighting`` and ``server_optimizer`` as in :class:`Strategy`.
    Communication: r·(d_in + d_out) per layer each way. Secure-aggregation compatible.

    Differential privacy: client level (DP-FedAvg) clips the client's update, its uploaded A, B and head
    minus the global values it started from, to L2 norm C; the server adds N(0, σ²C²) to the sum and
    divides by the fixed denominator. The average of the clipped factors is the aggregate, so one client
    moves it by at most C/denominator. Sample level (DP-SGD) clips each example's gradient; the upload
    is post-processing.
    """

    name = "fedit"
