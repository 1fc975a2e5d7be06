"""Shared builders and dense references for the SVD re-factoring strategy tests.

Used by test_flexlora, test_svd, test_subspace, test_fedsvd and test_lorafair. Every reference here
forms the dense d_out×d_in matrices on purpose (small shapes, float64), independently of the
factored code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState, Strategy

LAYERS = {"enc.0.query": (20, 16), "enc.0.value": (24, 12), "enc.1.query": (18, 30)}
HEAD = "classifier.weight"
ALPHA = 16.0


def random_adapter(rank: int, seed: int, layers=LAYERS, dtype=torch.float64, scale: float = 1.0,
                   zero_b: bool = False) -> Adapter:
    """Gaussian factors of one rank on every layer, plus a small classifier head."""
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {n: LoRAPair(scale * torch.randn(rank, d_in, generator=g, dtype=dtype),
                     torch.zeros(d_out, rank, dtype=dtype) if zero_b
                     else scale * torch.randn(d_out, rank, generator=g, dtype=dtype))
         for n, (d_out, d_in) in layers.items()},
        {HEAD: torch.randn(3, 8, generator=g, dtype=dtype)},
    )


def upload_round(strategy: Strategy, state: GlobalState, trained: list[Adapter], samples: list[int] | None = None,
                 ranks: list[int | None] | None = None) -> list[ClientUpdate]:
    """The server's view of one round: each trained adapter goes through payload → receive.

    Each client's scaling is the strategy's α/r_k for its own rank (so heterogeneous ranks carry
    different scalings, which the effective aggregate must weigh).
    """
    samples = samples or [10 + 7 * k for k in range(len(trained))]
    updates = []
    for k, adapter in enumerate(trained):
        r = next(iter(adapter.layers.values())).rank
        ctx = ClientContext(client_id=f"c{k}", round=state.round, num_samples=samples[k],
                            rank=(ranks[k] if ranks else r), alpha=ALPHA)
        received = strategy.receive(strategy.payload(adapter, state.round), state, state.round)
        updates.append(ClientUpdate(ctx.client_id, received, samples[k], strategy.scaling(ctx, r)))
    return updates


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


def assert_rejects_bad_uploads(strategy: Strategy, rank: int = 4) -> None:
    """A NaN in one client's upload, or a client with other layer names, raises AggregationInputError
    naming that client."""
    state = strategy.init_state(random_adapter(rank, seed=0), alpha=ALPHA)
    trained = [random_adapter(rank, seed=s) for s in (1, 2, 3)]
    updates = upload_round(strategy, state, trained)
    bad = updates[1].adapter.layers["enc.0.value"].B.clone()
    bad[2, -1] = float("nan")
    updates[1].adapter.layers["enc.0.value"] = LoRAPair(updates[1].adapter.layers["enc.0.value"].A, bad)
    with pytest.raises(AggregationInputError, match=r"client c1.*enc\.0\.value.*NaN"):
        strategy.aggregate(updates, state)

    updates = upload_round(strategy, state, trained)
    renamed = updates[2].adapter
    renamed.layers = {("enc.9.query" if n == "enc.1.query" else n): p for n, p in renamed.layers.items()}
    with pytest.raises(AggregationInputError, match=r"client c2.*layer names differ"):
        strategy.aggregate(updates, state)


def record_svd_inputs(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every matrix handed to torch.linalg.svd (to prove no d×d is decomposed)."""
    shapes: list[tuple[int, ...]] = []
    real = torch.linalg.svd

    def spy(M, *args, **kwargs):
        shapes.append(tuple(M.shape))
        return real(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    return shapes
