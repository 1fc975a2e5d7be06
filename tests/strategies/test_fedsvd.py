"""FedSVD: B-only training and upload; the server's A has orthonormal rows and s·B·A = s·B̄·A_prev."""

import math

import pytest
import torch
from refactor_helpers import (ALPHA, LAYERS, assert_rejects_bad_uploads, dense_global, random_adapter,
                              upload_round)

from fedlora.factors import LORA_A_MARK, Adapter, LoRAPair
from fedlora.strategies import get_strategy

SAMPLES = [10, 60, 30]


def one_round(clip=None, trained=None):
    strategy = get_strategy("fedsvd", clip=clip)
    state = strategy.init_state(random_adapter(4, seed=0), alpha=ALPHA)
    state.round = 3
    trained = trained or [random_adapter(4, seed=s) for s in (1, 2, 3)]
    updates = upload_round(strategy, state, trained, samples=SAMPLES)
    return strategy, state, updates, strategy.aggregate(updates, state)


def dense_target(state, updates, name):
    """s·B̄·A_prev, dense."""
    w = torch.tensor(SAMPLES, dtype=torch.float64) / sum(SAMPLES)
    B_bar = sum(float(wk) * u.adapter.layers[name].B for wk, u in zip(w, updates))
    return state.scaling * B_bar @ state.adapter.layers[name].A


def test_only_b_trains_and_travels_up():
    strategy = get_strategy("fedsvd")
    assert strategy.trainable(0) == frozenset({"B"}) and strategy.trainable(5) == frozenset({"B"})
    payload = strategy.payload(random_adapter(4, seed=1), 0)
    assert payload and not any(LORA_A_MARK in k for k in payload)
    assert "classifier.weight" in payload
    assert strategy.download_parts(0) == frozenset({"A", "B", "extras"})


def test_exact_refactoring_with_orthonormal_a():
    _, state, updates, new = one_round()
    for name in LAYERS:
        A = new.adapter.layers[name].A
        torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=A.dtype), rtol=0, atol=1e-12)
        want = dense_target(state, updates, name)
        torch.testing.assert_close(dense_global(new, name), want, rtol=0, atol=1e-10 * float(want.abs().max()))
        assert math.isclose(new.info["refactor"][name]["norm_fix"], 1.0, rel_tol=1e-10)


def test_a_client_copy_of_a_is_ignored():
    """The server uses its own previous A, whatever a client's adapter says about A."""
    strategy, state, updates, new = one_round()
    for u in updates:
        u.adapter.layers = {n: LoRAPair(torch.randn_like(p.A), p.B) for n, p in u.adapter.layers.items()}
    again = strategy.aggregate(updates, state)
    for name in LAYERS:
        torch.testing.assert_close(dense_global(again, name), dense_global(new, name), rtol=0, atol=1e-12)


def test_depends_on_the_uploads_only_through_their_weighted_sum():
    """Secure-aggregation compatible: uploads with the same Σ p_k B_k give the same global."""
    strategy, state, updates, new = one_round()
    assert strategy.secure_aggregation and not strategy.factor_averaging
    w = strategy.weights(updates)
    g = torch.Generator().manual_seed(9)
    for name in LAYERS:  # add E_k with Σ p_k E_k = 0: E_0 = X/p_0, E_1 = −X/p_1, E_2 = 0
        X = torch.randn(updates[0].adapter.layers[name].B.shape, generator=g, dtype=torch.float64)
        for k, sign in ((0, 1.0), (1, -1.0)):
            p = updates[k].adapter.layers[name]
            updates[k].adapter.layers[name] = LoRAPair(p.A, p.B + sign * X / float(w[k]))
    again = strategy.aggregate(updates, state)
    for name in LAYERS:
        torch.testing.assert_close(dense_global(again, name), dense_global(new, name), rtol=0, atol=1e-9)


def test_clip():
    clip = 2.0
    _, state, updates, new = one_round(clip=clip)
    for name in LAYERS:
        want = dense_target(state, updates, name)
        norm = float(torch.linalg.matrix_norm(want))
        assert norm > clip
        got = dense_global(new, name)
        assert math.isclose(float(torch.linalg.matrix_norm(got)), clip, rel_tol=1e-10)
        torch.testing.assert_close(got, want * (clip / norm), rtol=0, atol=1e-10)


def test_second_round_uses_the_new_orthonormal_a():
    strategy, _, _, new = one_round()
    trained = [Adapter({n: LoRAPair(p.A, p.B + 0.1 * k) for n, p in new.adapter.layers.items()}, dict(new.adapter.extras))
               for k in (1, 2, 3)]
    updates = upload_round(strategy, new, trained, samples=SAMPLES)
    newer = strategy.aggregate(updates, new)
    for name in LAYERS:
        torch.testing.assert_close(dense_global(newer, name), dense_target(new, updates, name), rtol=0, atol=1e-9)
    assert newer.round == new.round + 1


@pytest.mark.parametrize("rank", [1, 4])
def test_bad_uploads_name_the_client(rank):
    assert_rejects_bad_uploads(get_strategy("fedsvd"), rank=rank)
