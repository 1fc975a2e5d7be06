"""Differential privacy for federated LoRA: the mechanisms, stated per strategy, and their accounting.

Two kinds (``[privacy] mode``):

- ``"client"``: client-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018). A client's
  update is what it uploads minus what it started from (the uploaded factors and extras, as one
  flat vector); the client clips it to L2 norm C (:mod:`fedlora.privacy.clipping`). The server
  re-clips (a no-op for an honest client, and the bound the analysis needs), sums the updates, adds
  N(0, σ²C²) to every coordinate of the sum and divides by a fixed denominator: the expected number
  of clients per round, not the number that replied. So every client weighs the same and one
  client changes the released average by at most C / denominator. This fits every strategy whose
  server needs only the sum of the uploads (``Strategy.secure_aggregation``); the others refuse it
  (:func:`check_privacy` says why). Under client-level DP clients are Poisson-sampled: each joins
  a round independently with probability q = clients per round / clients (q = 1: all, every round).
  With ``adaptive_clip`` (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021) the clip follows a
  quantile of the update norms: the server also counts the clients whose update was within C,
  adds N(0, σ_b²) to that count, and sets C ← C·exp(−η_C·(b̃ − γ)) with b̃ the noised fraction.
  The count is a second Gaussian query (each b_k − ½ has sensitivity ½, so it is one with noise
  multiplier 2σ_b); the update's noise is lowered to σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½) so that the two
  together are exactly one Gaussian mechanism of noise multiplier σ, and the accounting is
  unchanged (the paper's Theorem 1). It needs 2σ_b > σ.
- ``"sample"``: DP-SGD (Abadi et al., CCS 2016) inside every client's local training, through
  Opacus (:mod:`fedlora.privacy.dpsgd`): per-example gradients clipped to C, N(0, σ²C²) added to
  their sum, batches Poisson-sampled at rate q_k = batch size / client k's examples. What a client
  uploads is a post-processing of its DP-SGD steps, so every strategy supports it.

Accounting (:mod:`fedlora.privacy.accounting`) uses Google's ``dp-accounting`` RDP accountant under
the add-or-remove-one relation: client level, T rounds of a Poisson-sampled Gaussian (rate q, noise
multiplier σ), for every client; sample level, each client's own steps, Poisson-sampled at its
q_k, and the run reports the largest ε of any client. ε at ``privacy.delta`` goes into every
metrics row (``privacy.epsilon``) and into ``summary.json``'s ``privacy`` block.

What DP covers: the models (global, uploads, personal states). The evaluations a run logs are
computed on client data without noise; they are measurements, not private releases.

The optional packages (``pip install 'fedlora[dp]'``: dp-accounting, Opacus) are imported only by a
run with privacy on.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.strategies import Strategy

#: modules each mode needs
NEEDS = {"client": ("dp_accounting",), "sample": ("dp_accounting", "opacus")}


def check_privacy(cfg: RunConfig, strategy: Strategy) -> None:
    """Refuse, naming the key, what the privacy settings cannot do: settings that override each
    other, a strategy with no sound mechanism for the mode, a missing package. Cheap: imports
    nothing but the strategy's class attributes."""
    p = cfg.privacy
    if p.noise_multiplier > 0 and p.target_epsilon > 0:
        raise ConfigError(f"privacy.noise_multiplier = {p.noise_multiplier} and privacy.target_epsilon = "
                          f"{p.target_epsilon} are both set, and target_epsilon would override the noise; set one")
    if p.adaptive_clip and p.mode != "client":
        raise ConfigError("privacy.adaptive_clip = true: adaptive clipping adapts the clip of client updates; "
                          "it needs privacy.mode = 'client'")
    if p.max_epsilon and p.target_epsilon > p.max_epsilon:
        raise ConfigError(f"privacy.target_epsilon = {p.target_epsilon} is above privacy.max_epsilon = "
                          f"{p.max_epsilon}: the run would stop before its last round")
    if p.mode == "client" and not strategy.secure_aggregation:
        raise ConfigError(
            f"privacy.mode = 'client': strategy {strategy.name!r} needs each client's upload on the server (it "
            "stacks or re-factors them), so Gaussian noise on the sum of the uploads would not cover what it "
            "releases; no sound client-level mechanism is implemented for it. Use a sum-based strategy (fedit, "
            "ffa, fedsa, sfed, rolora, fedsvd, fedrot) or privacy.mode = 'sample'")
    missing = [m for m in NEEDS[p.mode] if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"privacy.mode = {p.mode!r} needs {', '.join(missing)}, which is not installed: "
                          "pip install 'fedlora[dp]'")


def sampling_rates(cfg: RunConfig, client_sizes: list[int]) -> tuple[float, list[float]]:
    """(q, [q_k]): the client sampling rate (clients per round / clients) and each client's batch
    sampling rate (batch size / its examples, at most 1)."""
    from fedlora.runtime.federation import clients_per_round

    n = len(client_sizes)
    return clients_per_round(n, cfg.train) / n, [min(1.0, cfg.train.batch_size / size) for size in client_sizes]


def noise_multiplier(cfg: RunConfig, client_sizes: list[int]) -> float:
    """σ for this run: ``privacy.noise_multiplier``, or the σ calibrated to ``privacy.target_epsilon``
    after ``train.rounds`` rounds (:func:`fedlora.privacy.accounting.calibrate_sigma`). Deterministic
    in the config and the clients' sizes, so every process of a federation finds the same σ."""
    p = cfg.privacy
    if p.target_epsilon <= 0:
        return p.noise_multiplier
    from fedlora.privacy.accounting import calibrate_sigma
    from fedlora.runtime.training import steps_for

    q, client_q = sampling_rates(cfg, client_sizes)
    return calibrate_sigma(p.mode, p.target_epsilon, p.delta, rounds=cfg.train.rounds, q=q, client_q=client_q,
                           client_steps=[steps_for(size, cfg.train) for size in client_sizes])


def make_accountant(cfg: RunConfig, sigma: float, client_sizes: list[int]):
    """The run's :class:`~fedlora.privacy.accounting.Accountant` (None without privacy)."""
    if cfg.privacy.mode == "none":
        return None
    from fedlora.privacy.accounting import Accountant

    q, client_q = sampling_rates(cfg, client_sizes)
    return Accountant(cfg.privacy.mode, sigma, cfg.privacy.delta, q=q, client_q=client_q)


def summary_block(cfg: RunConfig, accountant, *, num_clients: int) -> dict:
    """``summary.json``'s ``privacy`` block: ε, δ, σ, C and the sampling assumption."""
    p = cfg.privacy
    block = dict(accountant.block(), mode=p.mode, noise_multiplier=accountant.sigma, clip=p.clip,
                 calibrated_to=p.target_epsilon or None, accountant="RDP (dp-accounting), add-or-remove-one")
    if p.mode == "client":
        q = accountant.q
        block["sampling"] = ("every client every round (q = 1)" if q >= 1 else
                             f"Poisson client sampling, q = {q:g}; fixed denominator {q * num_clients:g}")
    else:
        block["sampling"] = (f"Poisson batches, q_k = batch_size {cfg.train.batch_size} / client k's examples; "
                             "epsilon is the largest over the clients, each over its own steps")
    return block

