"""The factor algebra against dense computations on small shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.errors import AggregationInputError
from fedlora.factors import (
    Adapter,
    LoRAPair,
    check_uploads,
    factored_aggregate,
    lowrank_inner,
    lowrank_sq_norm,
    lowrank_svd,
    normalize_weights,
    product_gram,
    stack_factors,
    sum_sq_norm,
)


def random_clients(n, d_out, d_in, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=g, dtype=dtype) for r in ranks[:n]]
    As = [torch.randn(r, d_in, generator=g, dtype=dtype) for r in ranks[:n]]
    return Bs, As


def dense_sum(Bs, As, w):
    return sum(wk * B @ A for wk, B, A in zip(w, Bs, As))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    d_out=st.integers(2, 24),
    d_in=st.integers(2, 24),
    ranks=st.lists(st.integers(1, 8), min_size=6, max_size=6),
    raw_w=st.lists(st.floats(0.05, 10.0), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_factored_aggregate_matches_dense_svd(n, d_out, d_in, ranks, raw_w, seed):
    ranks = [min(r, d_out, d_in) for r in ranks]
    Bs, As = random_clients(n, d_out, d_in, ranks, seed=seed)
    w = normalize_weights(raw_w[:n])
    dense = dense_sum(Bs, As, w)
    low = factored_aggregate(Bs, As, w)
    # the factored SVD reconstructs the aggregate exactly ...
    torch.testing.assert_close(low.dense(), dense, rtol=1e-9, atol=1e-9)
    # ... with the dense singular values, and orthonormal bases on its nonzero part
    S_dense = torch.linalg.svdvals(dense)
    q = min(len(low.S), len(S_dense))
    torch.testing.assert_close(low.S[:q], S_dense[:q], rtol=1e-8, atol=1e-8)
    k = int((low.S > 1e-8 * low.S.max()).sum()) if low.S.numel() and low.S.max() > 0 else 0
    eye = torch.eye(k, dtype=low.U.dtype)
    torch.testing.assert_close(low.U[:, :k].T @ low.U[:, :k], eye, rtol=0, atol=1e-9)
    torch.testing.assert_close(low.Vh[:k] @ low.Vh[:k].T, eye, rtol=0, atol=1e-9)


def test_factored_aggregate_never_forms_dense_when_rank_is_small(monkeypatch):
    # d = 512, Σr = 12: the QR route must be taken; a dense SVD of a d×d matrix would be called with
    # a 512×512 argument, which we forbid here.
    Bs, As = random_clients(3, 512, 512, [4, 4, 4], dtype=torch.float32)
    real_svd = torch.linalg.svd

    def guarded_svd(M, *a, **k):
        assert max(M.shape) <= 12, f"dense SVD of a {tuple(M.shape)} matrix"
        return real_svd(M, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", guarded_svd)
    low = factored_aggregate(Bs, As, torch.tensor([0.2, 0.3, 0.5]))
    assert low.U.shape == (512, 12) and low.Vh.shape == (12, 512)


def test_factored_aggregate_float32_relative_accuracy():
    Bs, As = random_clients(10, 256, 200, [8] * 10, dtype=torch.float32, seed=3)
    w = normalize_weights(torch.rand(10) + 0.1)
    low = factored_aggregate(Bs, As, w)
    dense = dense_sum([B.double() for B in Bs], [A.double() for A in As], w)
    err = (low.dense().double() - dense).norm() / dense.norm()
    assert err < 1e-5


def test_truncate_is_eckart_young():
    Bs, As = random_clients(4, 30, 20, [3, 3, 3, 3])
    w = normalize_weights([1, 2, 3, 4])
    dense = dense_sum(Bs, As, w)
    S = torch.linalg.svdvals(dense)
    for r in (1, 3, 7):
        approx = factored_aggregate(Bs, As, w).truncate(r).dense()
        torch.testing.assert_close((dense - approx).norm(), S[r:].norm(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("how", ["left", "symmetric", "orthonormal_b"])
def test_splits_reconstruct(how):
    Bs, As = random_clients(3, 16, 12, [2, 3, 4])
    low = factored_aggregate(Bs, As, [0.2, 0.3, 0.5]).truncate(5)
    A, B = low.split(how)
    torch.testing.assert_close(B @ A, low.dense())
    if how == "orthonormal_b":
        torch.testing.assert_close(B.T @ B, torch.eye(5, dtype=B.dtype))
    if how == "left":
        torch.testing.assert_close(A @ A.T, torch.eye(5, dtype=A.dtype))
    if how == "symmetric":
        torch.testing.assert_close(B.T @ B, A @ A.T)


def test_truncate_pads_when_rank_exceeds_available():
    Bs, As = random_clients(1, 10, 10, [2])
    low = lowrank_svd(As[0], Bs[0]).truncate(4)
    assert low.U.shape == (10, 4) and low.S[2:].abs().max() == 0
    torch.testing.assert_close(low.dense(), Bs[0] @ As[0])


def test_stack_factors_is_exact_for_mixed_ranks():
    Bs, As = random_clients(3, 9, 7, [1, 2, 5])
    A_cat, B_cat = stack_factors(Bs, As, [0.5, 0.25, 0.25])
    assert A_cat.shape == (8, 7) and B_cat.shape == (9, 8)
    torch.testing.assert_close(B_cat @ A_cat, dense_sum(Bs, As, [0.5, 0.25, 0.25]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), d=st.integers(2, 20), r=st.integers(1, 6), seed=st.integers(0, 999))
def test_gram_norms_and_inner_products_match_dense(n, d, r, seed):
    r = min(r, d)
    Bs, As = random_clients(n, d, d + 3, [r] * n, seed=seed)
    dense = [B @ A for B, A in zip(Bs, As)]
    G = product_gram(Bs, As)
    for i in range(n):
        for j in range(n):
            torch.testing.assert_close(G[i, j], (dense[i] * dense[j]).sum(), rtol=1e-9, atol=1e-9)
    w = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) - 0.3
    torch.testing.assert_close(sum_sq_norm(Bs, As, w).sqrt(), dense_sum(Bs, As, w).norm(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lowrank_inner(As[0], Bs[0], As[-1], Bs[-1]), (dense[0] * dense[-1]).sum())
    torch.testing.assert_close(lowrank_sq_norm(As[0], Bs[0]), dense[0].norm() ** 2)


def test_adapter_state_dict_round_trip():
    sd = {
        "base_model.model.l0.query.lora_A.weight": torch.randn(2, 5),
        "base_model.model.l0.query.lora_B.weight": torch.randn(6, 2),
        "base_model.model.classifier.modules_to_save.weight": torch.randn(2, 6),
    }
    ad = Adapter.from_state_dict(sd)
    assert list(ad.layers) == ["base_model.model.l0.query"]
    assert list(ad.extras) == ["base_model.model.classifier.modules_to_save.weight"]
    back = ad.to_state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert ad.nbytes(("A",)) == 2 * 5 * 4 and ad.nbytes() == (10 + 12 + 12) * 4


def test_adapter_missing_factor_names_layer():
    with pytest.raises(AggregationInputError, match="l0.*lora_B"):
        Adapter.from_state_dict({"l0.lora_A.weight": torch.zeros(2, 3)})


# ---- bad input names the client, the layer and the problem --------------------------------------


def _adapter(d_out=6, d_in=5, r=2, name="l0", fill=None):
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    if fill is not None:
        A[0, 0] = fill
    return Adapter({name: LoRAPair(A, B)})


def test_check_uploads_errors():
    with pytest.raises(AggregationInputError, match="empty round"):
        check_uploads([])
    with pytest.raises(AggregationInputError, match="client b: layer names differ"):
        check_uploads([_adapter(), _adapter(name="l1")], ["a", "b"])
    with pytest.raises(AggregationInputError, match=r"client 1, layer 'l0'.*shape"):
        check_uploads([_adapter(), _adapter(d_out=7)])
    with pytest.raises(AggregationInputError, match=r"client 1, layer 'l0'.*NaN or Inf"):
        check_uploads([_adapter(), _adapter(fill=float("nan"))])
    with pytest.raises(AggregationInputError, match=r"client 1, layer 'l0'.*Inf"):
        check_uploads([_adapter(), _adapter(fill=float("inf"))])
    with pytest.raises(AggregationInputError, match=r"client 0, layer 'l0': rank 7 exceeds"):
        check_uploads([_adapter(r=7)])
    with pytest.raises(AggregationInputError, match=r"client 1.*rank 3 differs"):
        check_uploads([_adapter(), _adapter(r=3)])
    check_uploads([_adapter(), _adapter(r=3)], same_ranks=False)  # allowed for FLoRA/FlexLoRA


def test_weights_errors_and_normalisation():
    torch.testing.assert_close(normalize_weights([1, 3]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(AggregationInputError, match="client c: weight 0.0"):
        normalize_weights([1, 0], ["b", "c"])
    with pytest.raises(AggregationInputError, match="client 0: weight -1.0"):
        normalize_weights([-1, 2])
    with pytest.raises(AggregationInputError, match="empty round"):
        normalize_weights([])
