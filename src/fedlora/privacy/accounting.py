"""ε for what a run has done, with Google's ``dp-accounting`` (the library Flower's accountant
wraps): its RDP accountant, add-or-remove-one neighbouring relation, and its events.

- client level: every round is a :class:`PoissonSampledDpEvent` (rate q = expected clients per
  round / clients) of a :class:`GaussianDpEvent` with noise multiplier σ (sensitivity C of the sum
  of clipped updates); q = 1 (every client, every round) is the Gaussian event itself, with no
  amplification;
- sample level: client k's every local step is a Poisson-sampled Gaussian at rate
  q_k = batch size / its examples; its ε is over the steps it took (the rounds it was sampled in).

:class:`Accountant` keeps the counts and answers "ε now" and "ε after one more round";
:func:`calibrate` finds the σ that gives a target ε after the configured rounds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def _dp():
    import dp_accounting

    return dp_accounting


def sampled_gaussian(q: float, sigma: float, count: int):
    """``count`` compositions of a Gaussian with noise multiplier ``sigma``, Poisson-sampled at ``q``."""
    dp = _dp()
    event = dp.GaussianDpEvent(sigma) if q >= 1 else dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma))
    return dp.SelfComposedDpEvent(event, int(count))


@contextlib.contextmanager
def _quiet_orders():
    """dp-accounting logs (through absl) each fractional RDP order it drops as not converging; the
    order is left out of the minimum, which stays a valid bound. Keep that out of a run's output."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def epsilon(event, delta: float) -> float:
    """ε at ``delta`` of one dp-accounting event, by the RDP accountant (∞ when σ = 0)."""
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet_orders():
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def calibrate(make_event, target_epsilon: float, delta: float) -> float:
    """The smallest σ whose ``make_event(σ)`` has ε ≤ ``target_epsilon`` at ``delta``
    (``dp_accounting.calibrate_dp_mechanism``, by bisection)."""
    from dp_accounting.rdp import RdpAccountant

    dp = _dp()
    with _quiet_orders():
        return float(dp.calibrate_dp_mechanism(RdpAccountant, make_event, target_epsilon, delta,
                                               bracket_interval=dp.mechanism_calibration.ExplicitBracketInterval(1e-3, 1e3),
                                               tol=1e-4))


@dataclass
class Accountant:
    """What a run has spent. ``mode`` "client": ``q`` and the rounds done; "sample": per client,
    its sampling rate q_k and the local steps it took.

    ``epsilon()`` is the run's ε at ``delta``: client level, the one ε every client has; sample
    level, the largest of the clients' ε (0 before anything ran)."""

    mode: str
    sigma: float
    delta: float
    q: float = 1.0  # client level: the client sampling rate
    client_q: Sequence[float] = ()  # sample level: each client's batch sampling rate
    rounds: int = 0
    steps: dict[int, int] = field(default_factory=dict)  # sample level: client → steps taken

    def _event_eps(self, rounds: int, steps: dict[int, int]) -> float:
        if self.mode == "client":
            return epsilon(sampled_gaussian(self.q, self.sigma, rounds), self.delta) if rounds else 0.0
        worst = 0.0
        seen: dict[tuple[float, int], float] = {}
        for k, n in steps.items():
            key = (self.client_q[k], n)
            if n and key not in seen:
                seen[key] = epsilon(sampled_gaussian(self.client_q[k], self.sigma, n), self.delta)
                worst = max(worst, seen[key])
        return worst

    def epsilon(self) -> float:
        return self._event_eps(self.rounds, self.steps)

    def record(self, client_steps: dict[int, int]) -> None:
        """One round done: ``client_steps`` maps each sampled client to its local steps."""
        self.rounds += 1
        for k, n in client_steps.items():
            self.steps[k] = self.steps.get(k, 0) + int(n)

    def epsilon_after(self, client_steps: dict[int, int]) -> float:
        """ε if one more round with these clients' steps were run (nothing is recorded)."""
        steps = dict(self.steps)
        for k, n in client_steps.items():
            steps[k] = steps.get(k, 0) + int(n)
        return self._event_eps(self.rounds + 1, steps)

    def block(self) -> dict:
        """The ``privacy`` block of a metrics row."""
        eps = self.epsilon()
        return {"epsilon": eps if math.isfinite(eps) else None, "delta": self.delta}


def calibrate_sigma(mode: str, target_epsilon: float, delta: float, *, rounds: int, q: float = 1.0,
                    client_q: Iterable[float] = (), client_steps: Iterable[int] = ()) -> float:
    """σ for ``target_epsilon`` after ``rounds`` rounds. Client level: T Poisson-sampled Gaussians.
    Sample level: the worst client, taking part in every round (an upper bound whatever the client
    sampling): the largest σ any client (q_k, steps per round × rounds) needs."""
    if mode == "client":
        return calibrate(lambda s: sampled_gaussian(q, s, rounds), target_epsilon, delta)
    needs = {(qk, n * rounds) for qk, n in zip(client_q, client_steps)}
    return max(calibrate(lambda s, qk=qk, n=n: sampled_gaussian(qk, s, n), target_epsilon, delta)
               for qk, n in needs)
