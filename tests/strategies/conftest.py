"""Shared fixtures for the strategy tests: random adapters, a simulated round, dense references.

The simulated round drives a strategy through every hook in the order an engine does
(client_start → trainable → before_upload → payload → receive → aggregate), with "local training"
a random change to exactly the parts the strategy says train. The dense references are computed
in float64 from the clients' trained adapters, independently of the strategy's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState, Strategy

LAYERS = {"enc.0.query": (24, 16), "enc.0.value": (24, 16), "enc.1.query": (20, 12)}
HEAD = "classifier.weight"


def random_adapter(rank: int, seed: int, *, dtype=torch.float32, zero_b: bool = False,
                   layers: dict[str, tuple[int, int]] = LAYERS) -> Adapter:
    """Random factors (B zero if ``zero_b``, like PEFT's init) and a random 2×d_out head."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (d_out, d_in) in layers.items():
        A = torch.randn(rank, d_in, generator=g, dtype=torch.float64).to(dtype)
        B = torch.zeros(d_out, rank, dtype=dtype) if zero_b else torch.randn(d_out, rank, generator=g,
                                                                              dtype=torch.float64).to(dtype)
        pairs[name] = LoRAPair(A, B)
    d_head = next(iter(layers.values()))[0]
    return Adapter(pairs, {HEAD: torch.randn(2, d_head, generator=g, dtype=torch.float64).to(dtype)})


def local_training(start: Adapter, trainable: frozenset[str], extras: bool, seed: int) -> Adapter:
    """Simulated local training: a random change to the trainable factors (and extras), nothing else."""
    g = torch.Generator().manual_seed(seed)

    def step(t: Tensor) -> Tensor:
        return t + 0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    out = start.clone()
    out.layers = {n: LoRAPair(step(p.A) if "A" in trainable else p.A, step(p.B) if "B" in trainable else p.B)
                  for n, p in out.layers.items()}
    if extras:
        out.extras = {k: step(v) for k, v in out.extras.items()}
    return out


@dataclass
class Round:
    """Everything one simulated round produced."""

    state: GlobalState | None  # the new global state (None if the round was not aggregated)
    updates: list[ClientUpdate]  # what the server received
    starts: list[Adapter]  # what each client loaded
    trained: list[Adapter]  # each client's adapter after training and before_upload
    payloads: list[dict[str, Tensor]]
    personals: list[Adapter | None]
    weights: Tensor  # p_k = n_k / Σ n, float64, computed by the test, not the strategy


def client_side(strategy: Strategy, state: GlobalState, samples, *, ranks=None, personals=None,
                alpha: float = 16.0, total_clients: int | None = None, seed: int = 0) -> Round:
    """Every client's half of round ``state.round``; the server's ``aggregate`` is not called."""
    t, n = state.round, len(samples)
    out = Round(None, [], [], [], [], [], torch.tensor(samples, dtype=torch.float64) / sum(samples))
    trains_extras = getattr(strategy, "trains_extras", lambda round: True)(t)
    for k, n_k in enumerate(samples):
        ctx = ClientContext(client_id=f"c{k}", round=t, num_samples=n_k, rank=None if ranks is None else ranks[k],
                            alpha=alpha, num_clients=n, total_clients=total_clients or n,
                            seed=state.info.get("seed", 0))
        start = strategy.client_start(state, None if personals is None else personals[k], ctx)
        trained = local_training(start, strategy.trainable(t), trains_extras, seed=1000 * seed + 17 * t + k)
        adapter, info = strategy.before_upload(trained, start, ctx)
        payload = strategy.payload(adapter, t)
        rank = next(iter(adapter.layers.values())).rank
        out.updates.append(ClientUpdate(ctx.client_id, strategy.receive(payload, state, t), n_k,
                                        strategy.scaling(ctx, rank), info))
        out.starts.append(start)
        out.trained.append(adapter)
        out.payloads.append(payload)
        out.personals.append(strategy.personal_state(adapter))
    return out


def ideal_update(rnd: Round) -> dict[str, Tensor]:
    """Dense Σ_k p_k s_k B_k A_k per layer (float64), from the clients' own trained adapters."""
    total = {}
    for name in rnd.trained[0].layers:
        total[name] = sum(float(p) * u.scaling * (a.layers[name].B.double() @ a.layers[name].A.double())
                          for p, u, a in zip(rnd.weights, rnd.updates, rnd.trained))
    return total


def effective_update(state: GlobalState) -> dict[str, Tensor]:
    """Dense s·B_g·A_g plus the base-weight change, per layer (float64): the model's adapted part."""
    out = {}
    for name, g in state.adapter.layers.items():
        out[name] = state.scaling * (g.B.double() @ g.A.double())
        if state.base_delta is not None:
            d = state.base_delta[name]
            out[name] = out[name] + d.B.double() @ d.A.double()
    return out


def relative_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """‖actual − expected‖_F / ‖expected‖_F over all layers."""
    num = sum(float(((actual[n] - expected[n]) ** 2).sum()) for n in expected)
    den = sum(float((expected[n] ** 2).sum()) for n in expected)
    return (num / den) ** 0.5


@pytest.fixture(scope="session")
def make_adapter():
    """Factory: ``make_adapter(rank, seed, dtype=..., zero_b=..., layers=...)``."""
    return random_adapter


@pytest.fixture(scope="session")
def run_round():
    """Factory: ``run_round(strategy, state, samples, **client_side options)`` → :class:`Round`, aggregated."""
    def run(strategy, state, samples, **kw) -> Round:
        rnd = client_side(strategy, state, samples, **kw)
        rnd.state = strategy.aggregate(rnd.updates, state)
        return rnd
    return run


@pytest.fixture(scope="session")
def clients():
    """``client_side`` itself, for tests that tamper with the updates before aggregating."""
    return client_side


@pytest.fixture(scope="session")
def exactness_error():
    """Factory: ``exactness_error(round)`` → relative error of the new global model vs Σ p_k s_k B_k A_k."""
    return lambda rnd: relative_error(effective_update(rnd.state), ideal_update(rnd))


@pytest.fixture(scope="session")
def check_bad_input():
    """Factory: ``check_bad_input(strategy, state)`` checks that NaN, a wrong shape and a zero weight
    are each rejected by ``aggregate`` with an AggregationInputError naming the client."""
    def check(strategy: Strategy, state: GlobalState) -> None:
        good = client_side(strategy, state, [3, 5, 7]).updates
        layer = next(iter(state.adapter.layers))

        def tampered(fn) -> list[ClientUpdate]:
            bad = good[1].adapter.clone()
            fn(bad)
            return [good[0], ClientUpdate("c1", bad, good[1].num_samples, good[1].scaling), good[2]]

        def nan(ad):
            ad.layers[layer].B[0, 0] = float("nan")

        def wide(ad):
            p = ad.layers[layer]
            ad.layers[layer] = LoRAPair(torch.cat([p.A, p.A[:, :1]], 1), p.B)

        for fn, message in ((nan, rf"client c1, layer '{layer}'.*NaN"), (wide, rf"client c1, layer '{layer}'.*shape")):
            with pytest.raises(AggregationInputError, match=message):
                strategy.aggregate(tampered(fn), state)
        zero = [good[0], ClientUpdate("c1", good[1].adapter, 0, good[1].scaling), good[2]]
        with pytest.raises(AggregationInputError, match="client c1: weight 0"):
            strategy.aggregate(zero, state)
    return check
