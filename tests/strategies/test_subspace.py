"""Subspace-Reg: the orthonormal-B gauge with the norm fix on the server, and the exact client
regulariser (value and gradients against a dense computation of the same formula)."""

import math

import pytest
import torch
from refactor_helpers import (ALPHA, assert_rejects_renamed_layer, check_best_rank_r, clipped, dense_aggregate,
                              dense_global, independent_round, upload_round)

from fedlora.errors import ConfigError, FedLoRAError
from fedlora.factors import Adapter, LoRAPair
from fedlora.strategies import get_strategy

SAMPLES = [50, 20, 30]
F64 = torch.float64


@pytest.mark.parametrize("clip", [None, 3.0])
def test_server_orthonormal_b_gauge_times_the_norm_fix(make_adapter, clip):
    _, updates, new, w = independent_round(get_strategy("subspace", clip=clip), make_adapter, SAMPLES)
    for name in new.adapter.layers:
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
def test_regularizer_and_its_gradients_match_the_dense_formula(make_adapter, mu, alpha_b, lam):
    strategy = get_strategy("subspace", mu=mu, alpha_b=alpha_b, lam=lam)
    reference, live = make_adapter(4, seed=1, dtype=F64), live_copy(make_adapter(4, seed=2, dtype=F64))
    s = ALPHA / 4
    got = strategy.regularizer(live, reference, s)
    want = dense_regularizer(live, reference, s, mu, alpha_b, lam)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    params = [t for p in live.layers.values() for t in p]
    for g1, g2 in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_regularizer_is_zero_at_the_reference_and_decay_only_with_lam(make_adapter):
    reference = make_adapter(4, seed=3, dtype=F64)
    assert float(get_strategy("subspace", lam=0.0).regularizer(live_copy(reference), reference, 4.0).detach()) == 0.0
    lam = 0.3
    got = get_strategy("subspace", lam=lam).regularizer(live_copy(reference), reference, 4.0)
    decay = [0.5 * lam * (p.A.square().sum() + p.B.square().sum()) for p in reference.layers.values()]
    want = sum(decay) / len(decay)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_regularizer_has_no_cancellation_near_the_reference_in_float32(make_adapter):
    """Near the reference the μ term is tiny; the stacked-difference Gram keeps it accurate in float32
    (the expansion ‖BA‖² − 2⟨BA, B_gA_g⟩ + ‖B_gA_g‖² is off by orders of magnitude here)."""
    strategy = get_strategy("subspace", mu=1.0, alpha_b=0.0, lam=0.0)
    reference = make_adapter(4, seed=7, dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    near = Adapter({n: LoRAPair(p.A + 1e-4 * torch.randn(p.A.shape, generator=g),
                                p.B + 1e-4 * torch.randn(p.B.shape, generator=g)) for n, p in reference.layers.items()})
    got = float(strategy.regularizer(near, reference, 4.0))
    want = float(dense_regularizer(near.to(F64), reference.to(F64), 4.0, 1.0, 0.0, 0.0))
    assert want > 0 and math.isclose(got, want, rel_tol=1e-3)


def test_defaults_are_the_shipped_runs_and_bad_values_are_config_errors():
    strategy = get_strategy("subspace")
    assert (strategy.mu, strategy.alpha_b, strategy.lam, strategy.clip) == (0.05, 0.01, 1e-5, None)
    for bad in (dict(mu=-1.0), dict(alpha_b=float("nan")), dict(lam="x"), dict(clip=0.0)):
        with pytest.raises(ConfigError):
            get_strategy("subspace", **bad)


def test_regularizer_rejects_a_missing_or_reshaped_reference_layer(make_adapter):
    live = live_copy(make_adapter(4, seed=2, dtype=F64))
    first, second = list(live.layers)[:2]
    with pytest.raises(FedLoRAError, match=second):
        get_strategy("subspace").regularizer(live, make_adapter(4, seed=1, layers={first: (24, 16)}), 4.0)
    with pytest.raises(FedLoRAError, match=first):
        get_strategy("subspace").regularizer(live, make_adapter(2, seed=1, dtype=F64), 4.0)


def test_declarations_and_bad_uploads(make_adapter, check_bad_input):
    strategy = get_strategy("subspace")
    assert not strategy.secure_aggregation and not strategy.factor_averaging
    state = strategy.init_state(make_adapter(4, seed=0, dtype=F64), alpha=ALPHA)
    check_bad_input(strategy, state)
    assert_rejects_renamed_layer(strategy, state, upload_round(strategy, state, [make_adapter(4, seed=s, dtype=F64)
                                                                                 for s in (1, 2)]))
