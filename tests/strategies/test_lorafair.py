"""LoRA-FAIR: the corrected B̄' moves B̄Ā toward the ideal Σ p_k B_k A_k in cosine, by a small ΔB,
never past the best cosine any B can reach with the averaged Ā."""

import math

import pytest
import torch
from refactor_helpers import (ALPHA, assert_rejects_renamed_layer, dense_aggregate, dense_pair, independent_round,
                              upload_round)

from fedlora.errors import ConfigError
from fedlora.factors import LoRAPair
from fedlora.server_opt import ServerAdam
from fedlora.strategies import get_strategy
from fedlora.strategies.lorafair import CosineObjective, correct_b

SAMPLES = [20, 50, 30]
HEAD = "classifier.weight"
F64 = torch.float64


def cosine(X, Y):
    return float((X * Y).sum() / (torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(Y)))


@pytest.fixture
def one_round(make_adapter):
    """``one_round(trained=None, **options)`` → (new state, updates, weights); by default three
    independent random (so misaligned) clients."""
    def run(trained=None, **options):
        _, updates, new, weights = independent_round(get_strategy("lorafair", **options), make_adapter,
                                                     SAMPLES[:len(trained or SAMPLES)], trained=trained)
        return new, updates, weights
    return run


def averaged(updates, weights, name):
    A_bar = sum(float(w) * u.adapter.layers[name].A for w, u in zip(weights, updates))
    B_bar = sum(float(w) * u.adapter.layers[name].B for w, u in zip(weights, updates))
    return A_bar, B_bar


def test_misaligned_clients_get_a_strictly_better_cosine_from_a_small_residual(one_round):
    lam = 0.01
    new, updates, w = one_round(lam=lam)
    for name in new.adapter.layers:
        ideal = dense_aggregate(updates, w, name)
        A_bar, B_bar = averaged(updates, w, name)
        g = new.adapter.layers[name]
        torch.testing.assert_close(g.A, A_bar, rtol=0, atol=1e-12)  # Ā is the plain average
        delta = g.B - B_bar
        before, after = cosine(ideal, B_bar @ A_bar), cosine(ideal, g.B @ g.A)
        assert after > before + 1e-4
        # the objective never rises: λ‖ΔB‖ ≤ cos_after − cos_before; and ΔB is small next to B̄
        assert lam * float(delta.norm()) <= after - before + 1e-12
        assert float(delta.norm()) < 0.05 * float(B_bar.norm())
        report = new.info["correction"][name]
        assert math.isclose(report["cos_before"], before, rel_tol=1e-10)
        assert math.isclose(report["cos_after"], after, rel_tol=1e-10)
    head = sum(float(wk) * u.adapter.extras[HEAD] for wk, u in zip(w, updates))
    torch.testing.assert_close(new.adapter.extras[HEAD], head)


def test_converges_to_the_best_cosine_reachable_with_a_bar_and_never_beyond(one_round):
    """With λ = 0 the optimum over B' of cos(ΔW, B'Ā) is ‖ΔW·P‖/‖ΔW‖, P the projector on Ā's rows."""
    new, updates, w = one_round(lam=0.0, lr=1.0, steps=300)
    for name in new.adapter.layers:
        ideal = dense_aggregate(updates, w, name)
        A_bar, B_bar = averaged(updates, w, name)
        P = A_bar.T @ torch.linalg.solve(A_bar @ A_bar.T, A_bar)
        bound = float(torch.linalg.matrix_norm(ideal @ P) / torch.linalg.matrix_norm(ideal))
        after = cosine(ideal, dense_pair(new.adapter.layers[name]))
        assert cosine(ideal, B_bar @ A_bar) < bound - 0.03  # a misaligned example
        assert bound - 1e-4 < after <= bound + 1e-12


def test_identical_clients_need_no_correction(one_round, make_adapter):
    same = make_adapter(4, seed=4, dtype=F64)
    new, _, _ = one_round(trained=[same, same.clone(), same.clone()])
    for name, p in new.adapter.layers.items():
        torch.testing.assert_close(p.B, same.layers[name].B, rtol=0, atol=1e-12)
        assert new.info["correction"][name]["delta_norm"] == 0.0


def test_objective_cosine_is_the_dense_cosine():
    g = torch.Generator().manual_seed(3)
    A_cat, B_cat, A_bar, B_bar, delta = (torch.randn(*shape, generator=g, dtype=F64)
                                         for shape in ((12, 16), (20, 12), (4, 16), (20, 4), (20, 4)))
    f = CosineObjective(LoRAPair(A_cat, B_cat), A_bar, B_bar, lam=0.5)
    want = cosine(B_cat @ A_cat, (B_bar + delta) @ A_bar)
    assert math.isclose(float(f.cosine(delta)), want, rel_tol=1e-12)
    assert math.isclose(float(f(delta)), -want + 0.5 * float(delta.norm()), rel_tol=1e-12)


def test_zero_ideal_update_leaves_the_average(one_round, make_adapter):
    trained = [make_adapter(4, seed=s, zero_b=True, dtype=F64) for s in (1, 2)]
    new, updates, _ = one_round(trained=trained)
    for name, p in new.adapter.layers.items():
        assert not p.B.any() and torch.isfinite(p.A).all()


def test_options_declarations_and_bad_uploads(make_adapter, check_bad_input):
    strategy = get_strategy("lorafair")
    assert (strategy.lam, strategy.steps, strategy.lr) == (0.01, 50, 0.01)
    assert not strategy.secure_aggregation and not strategy.factor_averaging
    for bad in (dict(lam=-0.1), dict(steps=-1), dict(steps=2.5), dict(lr=0.0), dict(server_optimizer=ServerAdam())):
        with pytest.raises(ConfigError):
            get_strategy("lorafair", **bad)
    state = strategy.init_state(make_adapter(4, seed=0, dtype=F64), alpha=ALPHA)
    check_bad_input(strategy, state)
    assert_rejects_renamed_layer(strategy, state, upload_round(strategy, state, [make_adapter(4, seed=s, dtype=F64)
                                                                                 for s in (1, 2)]))


def test_orthogonal_start_is_still_corrected():
    """cos(ΔW, B̄Ā) = 0 with both nonzero: the residual must still move toward ΔW."""
    g = torch.Generator().manual_seed(5)
    A_bar, B_bar, Y = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((4, 16), (20, 4), (20, 4)))
    BG = B_bar @ (A_bar @ A_bar.T)
    X = Y - ((Y * BG).sum() / (BG * BG).sum()) * BG  # ⟨X·Ā, B̄·Ā⟩ = ⟨X, B̄·ĀĀᵀ⟩ = 0
    delta, report = correct_b(LoRAPair(A_bar, X), A_bar, B_bar, lam=0.01, steps=50, lr=0.5)
    assert abs(report["cos_before"]) < 1e-12
    assert cosine(X @ A_bar, (B_bar + delta) @ A_bar) > 0.1
