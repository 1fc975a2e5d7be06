"""FedSVD: B-only training and upload; the server's A has orthonormal rows and s·B·A = s·B̄·A_prev."""

import math

import pytest
import torch
from refactor_helpers import ALPHA, assert_rejects_renamed_layer, dense_global, independent_round, upload_round

from fedlora.factors import LORA_A_MARK, LoRAPair
from fedlora.strategies import get_strategy

SAMPLES = [10, 60, 30]
F64 = torch.float64


@pytest.fixture
def one_round(make_adapter):
    """``one_round(clip)`` → (strategy, state, updates, new state); the clients' A are the global A."""
    def run(clip=None):
        strategy = get_strategy("fedsvd", clip=clip)
        state, updates, new, _ = independent_round(strategy, make_adapter, SAMPLES, round=3)
        return strategy, state, updates, new
    return run


def dense_target(state, updates, name):
    """s·B̄·A_prev, dense."""
    w = torch.tensor(SAMPLES, dtype=F64) / sum(SAMPLES)
    B_bar = sum(float(wk) * u.adapter.layers[name].B for wk, u in zip(w, updates))
    return state.scaling * B_bar @ state.adapter.layers[name].A


def test_only_b_trains_and_travels_up(make_adapter):
    strategy = get_strategy("fedsvd")
    assert strategy.trainable(0) == frozenset({"B"}) and strategy.trainable(5) == frozenset({"B"})
    payload = strategy.payload(make_adapter(4, seed=1), 0)
    assert payload and not any(LORA_A_MARK in k for k in payload)
    assert "classifier.weight" in payload
    assert strategy.download_parts(0) == frozenset({"A", "B", "extras"})


def test_exact_refactoring_with_orthonormal_a(one_round):
    _, state, updates, new = one_round()
    for name in state.adapter.layers:
        A = new.adapter.layers[name].A
        torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=A.dtype), rtol=0, atol=1e-12)
        want = dense_target(state, updates, name)
        torch.testing.assert_close(dense_global(new, name), want, rtol=0, atol=1e-10 * float(want.abs().max()))
        assert math.isclose(new.info["refactor"][name]["norm_fix"], 1.0, rel_tol=1e-10)


def test_a_client_copy_of_a_is_ignored(one_round):
    """The server uses its own previous A, whatever a client's adapter says about A."""
    strategy, state, updates, new = one_round()
    for u in updates:
        u.adapter.layers = {n: LoRAPair(torch.randn_like(p.A), p.B) for n, p in u.adapter.layers.items()}
    again = strategy.aggregate(updates, state)
    for name in state.adapter.layers:
        torch.testing.assert_close(dense_global(again, name), dense_global(new, name), rtol=0, atol=1e-12)


def test_depends_on_the_uploads_only_through_their_weighted_sum(one_round):
    """Secure-aggregation compatible: uploads with the same Σ p_k B_k give the same global."""
    strategy, state, updates, new = one_round()
    assert strategy.secure_aggregation and not strategy.factor_averaging
    w = strategy.weights(updates)
    g = torch.Generator().manual_seed(9)
    for name in state.adapter.layers:  # add E_k with Σ p_k E_k = 0: E_0 = X/p_0, E_1 = −X/p_1, E_2 = 0
        X = torch.randn(updates[0].adapter.layers[name].B.shape, generator=g, dtype=torch.float64)
        for k, sign in ((0, 1.0), (1, -1.0)):
            p = updates[k].adapter.layers[name]
            updates[k].adapter.layers[name] = LoRAPair(p.A, p.B + sign * X / float(w[k]))
    again = strategy.aggregate(updates, state)
    for name in state.adapter.layers:
        torch.testing.assert_close(dense_global(again, name), dense_global(new, name), rtol=0, atol=1e-9)


def test_clip(one_round):
    clip = 2.0
    _, state, updates, new = one_round(clip)
    for name in state.adapter.layers:
        want = dense_target(state, updates, name)
        norm = float(torch.linalg.matrix_norm(want))
        assert norm > clip
        got = dense_global(new, name)
        assert math.isclose(float(torch.linalg.matrix_norm(got)), clip, rel_tol=1e-10)
        torch.testing.assert_close(got, want * (clip / norm), rtol=0, atol=1e-10)


def test_rounds_through_every_hook(make_adapter, run_round):
    """Three rounds as an engine runs them: clients train B only, from the new orthonormal A."""
    strategy = get_strategy("fedsvd")
    state = strategy.init_state(make_adapter(4, seed=0, dtype=F64), alpha=ALPHA)
    for t in range(3):
        rnd = run_round(strategy, state, SAMPLES, seed=t)
        for name, g in rnd.state.adapter.layers.items():
            A_prev = state.adapter.layers[name].A
            assert all(torch.equal(tr.layers[name].A, A_prev) for tr in rnd.trained)
            B_bar = sum(float(p) * tr.layers[name].B for p, tr in zip(rnd.weights, rnd.trained))
            want = state.scaling * B_bar @ A_prev
            torch.testing.assert_close(dense_global(rnd.state, name), want, rtol=0, atol=1e-10)
            torch.testing.assert_close(g.A @ g.A.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-12)
        assert rnd.state.round == t + 1
        state = rnd.state


@pytest.mark.parametrize("rank", [1, 4])
def test_bad_uploads_name_the_client(make_adapter, check_bad_input, rank):
    strategy = get_strategy("fedsvd")
    state = strategy.init_state(make_adapter(rank, seed=0, dtype=F64), alpha=ALPHA)
    check_bad_input(strategy, state)
    assert_rejects_renamed_layer(strategy, state, upload_round(strategy, state, [make_adapter(rank, seed=s, dtype=F64)
                                                                                 for s in (1, 2)]))
