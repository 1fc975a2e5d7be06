"""Shared builders and dense references for the SVD re-factoring strategy tests.

Used by test_flexlora, test_svd, test_subspace, test_fedsvd and test_lorafair, next to conftest's
fixtures (``make_adapter``, ``check_bad_input``). Every reference here forms the dense d_out×d_in
matrices on purpose (small shapes, float64), independently of the factored code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState, Strategy

ALPHA = 16.0  # LoRA alpha of every test client (s = α/r)


def upload_round(strategy: Strategy, state: GlobalState, trained: list[Adapter],
                 samples: list[int] | None = None) -> list[ClientUpdate]:
    """The server's view of one round of given trained adapters: each goes through payload → receive.

    Unlike conftest's ``client_side`` (clients that train from ``client_start``), the test chooses
    every client's factors outright: independent, misaligned, of any rank, or built to an invariant.

    Each client's scaling is the strategy's α/r_k for its own rank (so heterogeneous ranks carry
    different scalings, which the effective aggregate must weigh).
    """
    samples = samples or [10 + 7 * k for k in range(len(trained))]
    updates = []
    for k, adapter in enumerate(trained):
        r = next(iter(adapter.layers.values())).rank
        ctx = ClientContext(client_id=f"c{k}", round=state.round, num_samples=samples[k],
                            rank=r, alpha=ALPHA)
        received = strategy.receive(strategy.payload(adapter, state.round), state, state.round)
        updates.append(ClientUpdate(ctx.client_id, received, samples[k], strategy.scaling(ctx, r)))
    return updates


def independent_round(strategy: Strategy, make_adapter, samples: list[int], *, rank: int = 4,
                      trained: list[Adapter] | None = None, round: int = 0):
    """One aggregated round of independent random float64 clients (misaligned on purpose), or of the
    given ``trained`` adapters. ``make_adapter`` is conftest's fixture. Returns (state, updates, new
    state, weights p_k = n_k / Σ n)."""
    state = strategy.init_state(make_adapter(rank, seed=0, dtype=torch.float64), alpha=ALPHA)
    state.round = round
    trained = trained or [make_adapter(rank, seed=k + 1, dtype=torch.float64) for k in range(len(samples))]
    updates = upload_round(strategy, state, trained, samples)
    weights = torch.tensor(samples, dtype=torch.float64) / sum(samples)
    return state, updates, strategy.aggregate(updates, state), weights


def dense_pair(pair: LoRAPair) -> torch.Tensor:
    return pair.B.double() @ pair.A.double()


def dense_aggregate(updates: list[ClientUpdate], weights, name: str) -> torch.Tensor:
    """Σ_k p_k s_k B_k A_k, formed densely."""
    return sum(float(w) * u.scaling * dense_pair(u.adapter.layers[name]) for w, u in zip(weights, updates))


def dense_global(state: GlobalState, name: str) -> torch.Tensor:
    """s_g·B_g·A_g, formed densely."""
    return state.scaling * dense_pair(state.adapter.layers[name])


def clipped(D: torch.Tensor, clip: float | None) -> torch.Tensor:
    norm = float(torch.linalg.matrix_norm(D))
    return D * (clip / norm) if clip is not None and norm > clip else D


def check_best_rank_r(D: torch.Tensor, got: torch.Tensor, r: int, norm_fixed: bool, rtol: float = 1e-9) -> None:
    """Eckart–Young: ``got`` is the best rank-r approximation of D, up to the norm fix if any.

    Tie-robust (never compares singular vectors): rank(got) ≤ r, and, with f the dense norm-fix
    factor ‖D‖ / ‖D_r‖ (1 without the fix), ‖D − got/f‖_F = √(Σ_{i>r} σ_i²); with the fix also
    ‖got‖_F = ‖D‖_F.
    """
    S = torch.linalg.svdvals(D)
    scale = max(float(S.norm()), 1e-300)
    tail = float(S[r:].norm())
    kept = float(S[:r].norm())
    f = float(S.norm()) / kept if norm_fixed and kept > 0 else 1.0
    assert torch.linalg.matrix_rank(got, rtol=1e-8).item() <= r
    err = float(torch.linalg.matrix_norm(D - got / f))
    assert math.isclose(err, tail, rel_tol=1e-7, abs_tol=rtol * scale), (err, tail)
    if norm_fixed:
        assert math.isclose(float(torch.linalg.matrix_norm(got)), float(S.norm()), rel_tol=1e-9, abs_tol=rtol * scale)


def assert_rejects_renamed_layer(strategy: Strategy, state: GlobalState, updates: list[ClientUpdate]) -> None:
    """A client whose layer names differ from the others' is rejected with an AggregationInputError
    naming that client (conftest's ``check_bad_input`` covers NaN, shapes and weights)."""
    last = updates[-1].adapter
    names = list(last.layers)
    renamed = Adapter({(n + ".renamed" if n == names[-1] else n): p for n, p in last.layers.items()}, last.extras)
    bad = updates[:-1] + [ClientUpdate(updates[-1].client_id, renamed, updates[-1].num_samples, updates[-1].scaling)]
    with pytest.raises(AggregationInputError, match=rf"client {updates[-1].client_id}: layer names differ"):
        strategy.aggregate(bad, state)


def record_svd_inputs(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every matrix handed to torch.linalg.svd (to prove no d×d is decomposed)."""
    shapes: list[tuple[int, ...]] = []
    real = torch.linalg.svd

    def spy(M, *args, **kwargs):
        shapes.append(tuple(M.shape))
        return real(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    return shapes
