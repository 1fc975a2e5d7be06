"""Procrustes (one factor and joint), soft rotation, Haar rotation and the scalar gauge against independent
references: scipy, closed forms, dense brute-force minimisers."""

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.align import (
    alignment_rotation,
    guard_rotation,
    haar_rotation,
    procrustes,
    rotate,
    scalar_gauge,
    soft_rotation,
)
from fedlora.errors import ConfigError
from fedlora.factors import LoRAPair


def rand_pair(r, d_out=20, d_in=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return LoRAPair(torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype))


def is_rotation(R, atol=1e-5):
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    return torch.allclose(R.T @ R, eye, atol=atol) and abs(float(torch.linalg.det(R)) - 1) < atol


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_procrustes_matches_scipy_when_it_is_a_rotation_and_beats_random_rotations(r, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(r, r, generator=g, dtype=torch.float64)
    R = procrustes(M)
    assert is_rotation(R, 1e-9)
    # scipy solves min ‖X R − Y‖ over O(r); with X = I, Y = M that is argmax tr(Rᵀ M) over O(r).
    R_scipy, _ = scipy.linalg.orthogonal_procrustes(torch.eye(r).numpy(), M.numpy())
    R_scipy = torch.from_numpy(R_scipy)
    objective = lambda Q: float(torch.trace(Q.T @ M))  # noqa: E731
    if torch.linalg.det(R_scipy) > 0:
        torch.testing.assert_close(R, R_scipy, rtol=1e-7, atol=1e-7)
    else:
        assert objective(R) <= objective(R_scipy) + 1e-9  # SO(r) is a subset of O(r)
    # no random rotation does better than the optimum
    for _ in range(20):
        assert objective(haar_rotation(r, g, dtype=torch.float64)) <= objective(R) + 1e-9


def test_procrustes_fixes_the_determinant():
    # The O(r) optimum of tr(Rᵀ M) is the reflection diag(1, 1, −1) (objective 6); over SO(r) it is I
    # (objective 3 + 2 − 1 = 4), reached by flipping the direction of the smallest singular value.
    M = torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64))
    R = procrustes(M)
    assert is_rotation(R, 1e-12)
    torch.testing.assert_close(R, torch.eye(3, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 8), lam=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_soft_rotation_is_a_rotation_and_obeys_lemma_a1(r, lam, seed):
    R_star = haar_rotation(r, torch.Generator().manual_seed(seed), dtype=torch.float64)
    R = soft_rotation(R_star, lam)
    eye = torch.eye(r, dtype=torch.float64)
    assert is_rotation(R, 1e-9)
    # Lemma A.1: ‖R_soft − I‖_F ≤ 2λ‖R* − I‖_F
    assert (R - eye).norm() <= 2 * lam * (R_star - eye).norm() + 1e-9


def test_soft_rotation_endpoints():
    R_star = haar_rotation(5, torch.Generator().manual_seed(1))
    assert torch.equal(soft_rotation(R_star, 0.0), torch.eye(5))
    assert torch.equal(soft_rotation(R_star, 1.0), R_star)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\]"):
            soft_rotation(R_star, bad)


def test_soft_rotation_through_half_turn_stays_special_orthogonal():
    # R* with eigenvalue −1 (twice) and λ = 0.5 makes R' singular; the projection must still land in SO(r).
    R_star = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
    assert is_rotation(soft_rotation(R_star, 0.5))


@pytest.mark.parametrize("r", [1, 2, 5, 16])
def test_haar_rotation_is_special_orthogonal_and_seeded(r):
    R1 = haar_rotation(r, torch.Generator().manual_seed(7))
    R2 = haar_rotation(r, torch.Generator().manual_seed(7))
    assert is_rotation(R1) and torch.equal(R1, R2)


def test_haar_rotation_is_not_biased():
    # E[R] = 0 for the Haar measure on SO(r), r ≥ 2: the sample mean of many draws is near zero.
    g = torch.Generator().manual_seed(0)
    mean = sum(haar_rotation(3, g, dtype=torch.float64) for _ in range(4000)) / 4000
    assert mean.abs().max() < 0.05


@pytest.mark.parametrize("factor", ["A", "B", "joint"])
def test_alignment_recovers_a_rotated_reference(factor):
    ref = rand_pair(4)
    Q = haar_rotation(4, torch.Generator().manual_seed(3), dtype=torch.float64)
    client = LoRAPair(Q.T @ ref.A, ref.B @ Q)
    R = alignment_rotation(client, ref, factor, lam=1.0)
    aligned = rotate(client, R)
    torch.testing.assert_close(aligned.A, ref.A)
    torch.testing.assert_close(aligned.B, ref.B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotation_runs_in_float32_and_preserves_the_product(dtype):
    ref, client = rand_pair(6, seed=1, dtype=dtype), rand_pair(6, seed=2, dtype=dtype)
    R = alignment_rotation(client, ref, "A", lam=0.7)
    assert R.dtype == torch.float32 and is_rotation(R)
    out = rotate(client, R)
    assert out.A.dtype == dtype and out.B.dtype == dtype
    before = client.B.double() @ client.A.double()
    after = out.B.double() @ out.A.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert (after - before).norm() / before.norm() < tol


@pytest.mark.parametrize("factor", ["A", "B"])
def test_scalar_gauge_closed_form(factor):
    ref = rand_pair(3)
    client = LoRAPair(ref.A * 0.5, ref.B * 2.0)
    out, c = scalar_gauge(client, ref, factor)
    torch.testing.assert_close(out.B @ out.A, client.B @ client.A)
    expected = 2.0 if factor == "A" else 0.5  # c* = ⟨Q, Q_ref⟩/‖Q‖²
    assert c == pytest.approx(expected)
    torch.testing.assert_close(out.A, ref.A)
    torch.testing.assert_close(out.B, ref.B)


def test_batched_alignment_equals_layer_by_layer():
    refs = [rand_pair(4, seed=s) for s in range(5)]
    clients = [rand_pair(4, seed=10 + s) for s in range(5)]
    stack = lambda ps, i: torch.stack([p[i] for p in ps])  # noqa: E731
    for factor in ("A", "B", "joint"):
        R = alignment_rotation(LoRAPair(stack(clients, 0), stack(clients, 1)),
                               LoRAPair(stack(refs, 0), stack(refs, 1)), factor, lam=0.6)
        for i, (c, r) in enumerate(zip(clients, refs)):
            torch.testing.assert_close(R[i], alignment_rotation(c, r, factor, lam=0.6), rtol=1e-10, atol=1e-10)


# ---- joint alignment: min_{R ∈ SO(r)} ‖Rᵀ A − A_ref‖² + ‖B R − B_ref‖² --------------------------------

def joint_objective(R, pair, ref):
    """The joint Procrustes objective, evaluated densely in numpy (R: r×r or a batch …×r×r)."""
    A, B, A_ref, B_ref = (t.double().numpy() for t in (pair.A, pair.B, ref.A, ref.B))
    R = np.asarray(R, dtype=np.float64)
    dA = np.swapaxes(R, -1, -2) @ A - A_ref
    dB = B @ R - B_ref
    return (dA ** 2).sum(axis=(-1, -2)) + (dB ** 2).sum(axis=(-1, -2))


def joint_instance(r, seed, b_ref_scale=1.0):
    """A client pair and a reference: unrelated Gaussian factors, the reference's B scaled (a small
    B_ref is the regime of the first rounds after B's zero init)."""
    client, ref = rand_pair(r, d_out=6, d_in=5, seed=seed), rand_pair(r, d_out=6, d_in=5, seed=1000 + seed)
    return client, LoRAPair(ref.A, b_ref_scale * ref.B)


def brute_force_so2(pair, ref):
    """min over SO(2) by a grid of 20 000 angles, refined by a bounded scalar search around the best."""
    rot = lambda t: np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])  # noqa: E731
    grid = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    values = joint_objective(np.stack([rot(t) for t in grid]), pair, ref)
    t0, h = grid[values.argmin()], grid[1] - grid[0]
    best = scipy.optimize.minimize_scalar(lambda t: joint_objective(rot(t), pair, ref), bounds=(t0 - h, t0 + h),
                                          method="bounded", options={"xatol": 1e-12})
    return min(best.fun, values.min())


def brute_force_so3(pair, ref, seed):
    """min over SO(3): 4 000 Haar samples (scipy's own sampler), then BFGS over the 3 skew parameters
    ω of R = R₀·expm(Ω(ω)) from each of the 5 best samples."""
    samples = scipy.stats.special_ortho_group.rvs(3, size=4000, random_state=seed)
    values = joint_objective(samples, pair, ref)

    def skew(w):
        return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])

    best = values.min()
    for R0 in samples[np.argsort(values)[:5]]:
        res = scipy.optimize.minimize(lambda w: joint_objective(R0 @ scipy.linalg.expm(skew(w)), pair, ref),
                                      np.zeros(3), method="BFGS", options={"gtol": 1e-10})
        best = min(best, res.fun)
    return best


@pytest.mark.parametrize("seed,b_ref_scale", [(0, 1.0), (1, 1.0), (2, 0.05), (3, 3.0)])
def test_joint_alignment_is_the_so2_minimiser(seed, b_ref_scale):
    pair, ref = joint_instance(2, seed, b_ref_scale)
    R = alignment_rotation(pair, ref, "joint", lam=1.0)
    assert is_rotation(R, 1e-12)
    ours, brute = float(joint_objective(R, pair, ref)), brute_force_so2(pair, ref)
    scale = float(joint_objective(np.eye(2), pair, ref))
    assert ours <= brute + 1e-12 * scale  # nothing on the circle does better ...
    assert ours == pytest.approx(brute, abs=1e-9 * scale)  # ... and the brute force reaches it


@pytest.mark.parametrize("seed,b_ref_scale", [(0, 1.0), (1, 0.05), (2, 3.0)])
def test_joint_alignment_is_the_so3_minimiser(seed, b_ref_scale):
    pair, ref = joint_instance(3, seed, b_ref_scale)
    R = alignment_rotation(pair, ref, "joint", lam=1.0)
    assert is_rotation(R, 1e-12)
    ours, brute = float(joint_objective(R, pair, ref)), brute_force_so3(pair, ref, seed)
    scale = float(joint_objective(np.eye(3), pair, ref))
    assert ours <= brute + 1e-12 * scale
    assert ours == pytest.approx(brute, abs=1e-8 * scale)


def test_joint_alignment_beats_aligning_one_factor():
    # joint minimises the sum, so on it the single-factor rotations can only do as well or worse;
    # on unrelated random factors they do strictly worse
    for r in (2, 3, 4, 6):
        for seed in range(10):
            pair, ref = joint_instance(r, seed, b_ref_scale=[0.05, 1.0][seed % 2])
            f = {k: float(joint_objective(alignment_rotation(pair, ref, k, lam=1.0), pair, ref))
                 for k in ("A", "B", "joint")}
            assert f["joint"] < min(f["A"], f["B"]) - 1e-9, (r, seed, f)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_joint_soft_rotation_preserves_products_and_lambda_zero_is_the_identity(lam):
    pair, ref = joint_instance(4, 5)
    R = alignment_rotation(pair, ref, "joint", lam=lam)
    assert is_rotation(R, 1e-12)
    if lam == 0:
        assert torch.equal(R, torch.eye(4, dtype=torch.float64))
    out = rotate(pair, R)
    torch.testing.assert_close(out.B @ out.A, pair.B @ pair.A, rtol=1e-12, atol=1e-12)


def test_unknown_aligned_factor_is_named():
    pair, ref = joint_instance(2, 0)
    with pytest.raises(ConfigError, match="got 'AB'"):
        alignment_rotation(pair, ref, "AB")


# ---- the guard: a layer's rotation is kept only if the pair ends no further from its reference ------

def test_the_guard_resets_exactly_the_layers_that_a_rotation_moves_away_from_the_reference():
    """Against the dense joint objective: the guard keeps R where the objective does not grow, puts
    back the identity where it does, layer by layer in a batch; products are kept either way."""
    pairs, refs, kept = [], [], 0
    for seed in range(24):
        pair, ref = joint_instance(3, seed, b_ref_scale=[0.01, 1.0, 3.0][seed % 3])
        pairs.append(pair)
        refs.append(ref)
    batch = LoRAPair(torch.stack([p.A for p in pairs]), torch.stack([p.B for p in pairs]))
    ref_batch = LoRAPair(torch.stack([r.A for r in refs]), torch.stack([r.B for r in refs]))
    R = alignment_rotation(batch, ref_batch, "B", lam=1.0)
    guarded, reset = guard_rotation(batch, ref_batch, R)
    for i, (pair, ref) in enumerate(zip(pairs, refs)):
        before = float(joint_objective(np.eye(3), pair, ref))
        after = float(joint_objective(R[i].numpy(), pair, ref))
        assert bool(reset[i]) == (after > before), i
        expected = torch.eye(3, dtype=R.dtype) if after > before else R[i]
        assert torch.equal(guarded[i], expected)
        kept += after <= before
        out = rotate(pair, guarded[i])
        torch.testing.assert_close(out.B @ out.A, pair.B @ pair.A, rtol=1e-12, atol=1e-12)
    assert 0 < kept < len(pairs)  # the instances exercise both outcomes


def test_the_guard_never_resets_the_joint_rotation_and_catches_b_against_a_small_reference():
    for seed in range(10):
        pair, ref = joint_instance(4, seed, b_ref_scale=0.01)
        _, reset = guard_rotation(pair, ref, alignment_rotation(pair, ref, "joint", lam=1.0))
        assert not bool(reset)
    # a client one small step from its reference, whose reference B is tiny: aligning B rotates
    # by noise and moves A far; the guard sends the layer unrotated
    g = torch.Generator().manual_seed(7)
    ref = LoRAPair(torch.randn(4, 16, generator=g, dtype=torch.float64), 1e-4 * torch.randn(20, 4, generator=g, dtype=torch.float64))
    pair = LoRAPair(ref.A + 1e-3 * torch.randn(4, 16, generator=g, dtype=torch.float64),
                    ref.B + 1e-3 * torch.randn(20, 4, generator=g, dtype=torch.float64))
    R = alignment_rotation(pair, ref, "B", lam=1.0)
    assert float(torch.linalg.matrix_norm(R - torch.eye(4, dtype=R.dtype))) > 0.1
    R_guarded, reset = guard_rotation(pair, ref, R)
    assert bool(reset) and torch.equal(R_guarded, torch.eye(4, dtype=R.dtype))
