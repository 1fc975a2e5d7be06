"""Subspace-Reg: the orthonormal-B gauge with the norm fix on the server, and the exact client
regulariser (value and gradients against a dense computation of the same formula)."""

import math

import pytest
import torch
from refactor_helpers import (ALPHA, LAYERS, assert_rejects_bad_uploads, check_best_rank_r, clipped, dense_aggregate,
                              dense_global, random_adapter, upload_round)

from fedlora.errors import ConfigError, FedLoRAError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies import get_strategy

SAMPLES = [50, 20, 30]


def one_round(clip=None, rank=4):
    strategy = get_strategy("subspace", clip=clip)
    state = strategy.init_state(random_adapter(rank, seed=0), alpha=ALPHA)
    updates = upload_round(strategy, state, [random_adapter(rank, seed=s) for s in (4, 5, 6)], samples=SAMPLES)
    weights = torch.tensor(SAMPLES, dtype=torch.float64) / sum(SAMPLES)
    return strategy.aggregate(updates, state), updates, weights


@pytest.mark.parametrize("clip", [None, 3.0])
def test_server_orthonormal_b_gauge_times_the_norm_fix(clip):
    new, updates, w = one_round(clip=clip)
    for name in LAYERS:
        D = clipped(dense_aggregate(updates, w, name), clip)
        S = torch.linalg.svdvals(D)
        fix = float(S.norm() / S[:4].norm())  # dense norm-fix factor on s·B·A
        assert fix > 1.0
        B = new.adapter.layers[name].B
        # B = √fix·U_r: equal column norms √fix, BᵀB = fix·I
        torch.testing.assert_close(B.T @ B, fix * torch.eye(4, dtype=B.dtype), rtol=0, atol=1e-10)
        got = dense_global(new, name)
        check_best_rank_r(D, got, 4, norm_fixed=True)
        assert math.isclose(float(torch.linalg.matrix_norm(got)), clip if clip else float(S.norm()), rel_tol=1e-10)
        # B spans the top-r left singular subspace of D
        U = torch.linalg.svd(D)[0][:, :4]
        torch.testing.assert_close(U @ (U.T @ B), B, rtol=0, atol=1e-10)


def dense_regularizer(live, reference, s, mu, alpha_b, lam):
    """The §3.1 formula with every product formed densely."""
    terms = []
    for name, (A, B) in live.layers.items():
        A_g, B_g = reference.layers[name]
        prox = ((s * B @ A - s * B_g @ A_g) ** 2).sum()
        terms.append(0.5 * mu * prox + 0.5 * alpha_b * ((B - B_g) ** 2).sum()
                     + 0.5 * lam * ((A ** 2).sum() + (B ** 2).sum()))
    return sum(terms) / len(terms)


def live_copy(adapter):
    return Adapter({n: LoRAPair(p.A.clone().requires_grad_(True), p.B.clone().requires_grad_(True))
                    for n, p in adapter.layers.items()})


@pytest.mark.parametrize("mu,alpha_b,lam", [(0.05, 0.01, 1e-5), (1.0, 0.0, 0.0), (0.0, 0.3, 0.2)])
def test_regularizer_and_its_gradients_match_the_dense_formula(mu, alpha_b, lam):
    strategy = get_strategy("subspace", mu=mu, alpha_b=alpha_b, lam=lam)
    reference, live = random_adapter(4, seed=1), live_copy(random_adapter(4, seed=2))
    s = ALPHA / 4
    got = strategy.regularizer(live, reference, s)
    want = dense_regularizer(live, reference, s, mu, alpha_b, lam)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    params = [t for p in live.layers.values() for t in p]
    for g1, g2 in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_regularizer_is_zero_at_the_reference_and_decay_only_with_lam():
    reference = random_adapter(4, seed=3)
    assert float(get_strategy("subspace", lam=0.0).regularizer(live_copy(reference), reference, 4.0).detach()) == 0.0
    lam = 0.3
    got = get_strategy("subspace", lam=lam).regularizer(live_copy(reference), reference, 4.0)
    want = sum(0.5 * lam * (p.A.square().sum() + p.B.square().sum()) for p in reference.layers.values()) / len(LAYERS)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_regularizer_has_no_cancellation_near_the_reference_in_float32():
    """Near the reference the μ term is tiny; the stacked-difference Gram keeps it accurate in float32."""
    strategy = get_strategy("subspace", mu=1.0, alpha_b=0.0, lam=0.0)
    reference = random_adapter(4, seed=7, dtype=torch.float32, scale=3.0)
    g = torch.Generator().manual_seed(8)
    near = Adapter({n: LoRAPair(p.A + 1e-4 * torch.randn(p.A.shape, generator=g),
                                p.B + 1e-4 * torch.randn(p.B.shape, generator=g)) for n, p in reference.layers.items()})
    got = float(strategy.regularizer(near, reference, 4.0))
    want = float(dense_regularizer(near.to(torch.float64), reference.to(torch.float64), 4.0, 1.0, 0.0, 0.0))
    assert want > 0 and math.isclose(got, want, rel_tol=1e-3)


def test_defaults_are_the_shipped_runs_and_bad_values_are_config_errors():
    strategy = get_strategy("subspace")
    assert (strategy.mu, strategy.alpha_b, strategy.lam, strategy.clip) == (0.05, 0.01, 1e-5, None)
    for bad in (dict(mu=-1.0), dict(alpha_b=float("nan")), dict(lam="x"), dict(clip=0.0)):
        with pytest.raises(ConfigError):
            get_strategy("subspace", **bad)


def test_regularizer_rejects_a_reference_without_the_layer():
    reference = random_adapter(4, seed=1, layers={"enc.0.query": (20, 16)})
    with pytest.raises(FedLoRAError, match="enc.0.value"):
        get_strategy("subspace").regularizer(live_copy(random_adapter(4, seed=2)), reference, 4.0)


def test_declarations_and_bad_uploads():
    strategy = get_strategy("subspace")
    assert not strategy.secure_aggregation and not strategy.factor_averaging
    assert_rejects_bad_uploads(strategy)
