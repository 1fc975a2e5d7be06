"""SVD redistribution: Eckart–Young with the norm fix, the symmetric split, and the Frobenius clip."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refactor_helpers import (ALPHA, assert_rejects_renamed_layer, check_best_rank_r, clipped, dense_aggregate,
                              dense_global, independent_round, upload_round)

from fedlora.errors import ConfigError
from fedlora.strategies import get_strategy

SAMPLES = [12, 30, 58]
F64 = torch.float64


@pytest.fixture
def one_round(make_adapter):
    """``one_round(clip)`` → (new state, updates, weights) for three independent random clients."""
    def run(clip=None):
        _, updates, new, weights = independent_round(get_strategy("svd", clip=clip), make_adapter, SAMPLES)
        return new, updates, weights
    return run


def test_norm_fixed_best_rank_r_approximation(one_round):
    new, updates, w = one_round()
    for name in new.adapter.layers:
        D = dense_aggregate(updates, w, name)
        got = dense_global(new, name)
        check_best_rank_r(D, got, 4, norm_fixed=True)
        # the direction is the unique rank-4 truncation, the norm is ‖D‖ (truncation energy put back)
        U, S, Vh = torch.linalg.svd(D)
        D4 = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close(got, D4 * float(S.norm() / S[:4].norm()), rtol=0, atol=1e-10 * float(S[0]))
        assert math.isclose(new.info["refactor"][name]["norm_fix"], float(S.norm() / S[:4].norm()), rel_tol=1e-10)
        assert new.info["refactor"][name]["norm_fix"] > 1.0  # truncation lost energy: the fix is not a no-op


def test_symmetric_split(one_round):
    new, _, _ = one_round()
    for name, p in new.adapter.layers.items():
        torch.testing.assert_close(p.B.T @ p.B, p.A @ p.A.T, rtol=0, atol=1e-10)
        G = p.A @ p.A.T
        torch.testing.assert_close(G, torch.diag(torch.diagonal(G)), rtol=0, atol=1e-10)  # √S·Vh: orthogonal rows


@pytest.mark.parametrize("clip", [1.0, 25.0])
def test_clip_bounds_the_norm_and_keeps_the_direction(one_round, clip):
    new, updates, w = one_round(clip=clip)
    unclipped, _, _ = one_round()
    for name in new.adapter.layers:
        D = dense_aggregate(updates, w, name)
        norm = float(torch.linalg.matrix_norm(D))
        assert norm > clip  # the example must exceed the bound for the test to mean anything
        got = dense_global(new, name)
        assert math.isclose(float(torch.linalg.matrix_norm(got)), clip, rel_tol=1e-10)
        check_best_rank_r(clipped(D, clip), got, 4, norm_fixed=True)
        torch.testing.assert_close(got, dense_global(unclipped, name) * (clip / norm), rtol=1e-9, atol=1e-12)
        assert math.isclose(new.info["refactor"][name]["clip_factor"], clip / norm, rel_tol=1e-10)


def test_clip_above_the_norm_changes_nothing(one_round):
    new, updates, _ = one_round(clip=1e6)
    plain, _, _ = one_round()
    for name in new.adapter.layers:
        torch.testing.assert_close(dense_global(new, name), dense_global(plain, name), rtol=0, atol=0)


def test_zero_aggregate_gives_zero_update_and_no_nan(make_adapter):
    strategy = get_strategy("svd", clip=5.0)
    state = strategy.init_state(make_adapter(4, seed=0, dtype=F64), alpha=ALPHA)
    updates = upload_round(strategy, state, [make_adapter(4, seed=s, zero_b=True, dtype=F64) for s in (1, 2)])
    new = strategy.aggregate(updates, state)
    for name in new.adapter.layers:
        got = dense_global(new, name)
        assert torch.isfinite(got).all() and not got.any()


@pytest.mark.parametrize("clip", [0, -1.0, float("nan"), float("inf"), "big"])
def test_bad_clip_is_a_config_error(clip):
    with pytest.raises(ConfigError, match="clip"):
        get_strategy("svd", clip=clip)


def test_declarations_and_bad_uploads(one_round, check_bad_input):
    strategy = get_strategy("svd")
    assert not strategy.secure_aggregation and not strategy.factor_averaging and not strategy.heterogeneous_ranks
    new, updates, _ = one_round()
    check_bad_input(strategy, new)
    assert_rejects_renamed_layer(strategy, new, updates)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 40), d_in=st.integers(2, 40), data=st.data())
def test_property_norm_fixed_eckart_young(make_adapter, d_out, d_in, data):
    r = data.draw(st.integers(1, min(d_out, d_in, 8)), label="rank")
    n = data.draw(st.integers(1, 5), label="clients")
    samples = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n), label="samples")
    clip = data.draw(st.one_of(st.none(), st.floats(0.1, 100.0)), label="clip")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    layers = {"w": (d_out, d_in)}
    strategy = get_strategy("svd", clip=clip)
    state = strategy.init_state(make_adapter(r, seed=seed, layers=layers, dtype=F64), alpha=ALPHA)
    trained = [make_adapter(r, seed=seed + 1 + k, layers=layers, dtype=F64) for k in range(n)]
    updates = upload_round(strategy, state, trained, samples=samples)
    new = strategy.aggregate(updates, state)
    w = torch.tensor(samples, dtype=F64) / sum(samples)
    check_best_rank_r(clipped(dense_aggregate(updates, w, "w"), clip), dense_global(new, "w"), r, norm_fixed=True)
