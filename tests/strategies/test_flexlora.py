"""FlexLoRA: the global adapter is the best rank-r_max approximation of the exact aggregate, and each
client starts from the best rank-r_k approximation, at its own scaling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refactor_helpers import (ALPHA, assert_rejects_renamed_layer, check_best_rank_r, dense_aggregate, dense_global,
                              dense_pair, independent_round, record_svd_inputs, upload_round)

from fedlora.errors import ConfigError
from fedlora.server_opt import ServerAdam
from fedlora.strategies import ClientContext, get_strategy

HEAD = "classifier.weight"
F64 = torch.float64


def test_global_is_the_best_rank_r_approximation_with_a_left_split(make_adapter):
    state, updates, new, w = independent_round(get_strategy("flexlora"), make_adapter, [5, 30, 65])
    for name in state.adapter.layers:
        D = dense_aggregate(updates, w, name)
        got = dense_global(new, name)
        check_best_rank_r(D, got, 4, norm_fixed=False)
        # generic data: σ_4 > σ_5, so the truncation is unique and equals the dense one
        U, S, Vh = torch.linalg.svd(D)
        torch.testing.assert_close(got, (U[:, :4] * S[:4]) @ Vh[:4], rtol=0, atol=1e-10 * float(S[0]))
        A = new.adapter.layers[name].A
        torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=A.dtype), rtol=0, atol=1e-12)  # A = V_rᵀ
    torch.testing.assert_close(new.adapter.extras[HEAD], sum(wk * u.adapter.extras[HEAD] for wk, u in zip(w, updates)))
    assert new.round == 1 and new.scaling == state.scaling == ALPHA / 4


def test_heterogeneous_ranks_each_client_starts_from_its_own_truncation(make_adapter):
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(8, seed=0, dtype=F64), alpha=ALPHA)
    ranks = [2, 4, 8]
    trained = [make_adapter(r, seed=10 + r, dtype=F64) for r in ranks]
    updates = upload_round(strategy, state, trained, samples=[40, 20, 10])
    assert [u.scaling for u in updates] == [ALPHA / r for r in ranks]  # different scalings, weighed in D
    new = strategy.aggregate(updates, state)
    w = strategy.weights(updates)
    for r in ranks:
        start = strategy.client_start(new, None, ClientContext(client_id="c", round=1, rank=r, alpha=ALPHA))
        assert set(start.ranks().values()) == {r}
        for name in state.adapter.layers:
            D = dense_aggregate(updates, w, name)
            U, S, Vh = torch.linalg.svd(D)
            torch.testing.assert_close((ALPHA / r) * dense_pair(start.layers[name]), (U[:, :r] * S[:r]) @ Vh[:r],
                                       rtol=0, atol=1e-10 * float(S[0]))
    # the download is the client's rank-r_k adapter, not the global one
    small = ClientContext(client_id="c", round=1, rank=2, alpha=ALPHA)
    factor_bytes = sum(2 * sum(p.shape) * 8 for p in new.adapter.layers.values())
    assert strategy.download_bytes(new, small) == factor_bytes + new.adapter.extras[HEAD].numel() * 8


def test_heterogeneous_rounds_through_every_hook(make_adapter, run_round):
    """Two rounds as an engine runs them, from PEFT's init (B = 0), with client ranks 2, 4 and 8."""
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(8, seed=0, zero_b=True, dtype=F64), alpha=ALPHA)
    for t in range(2):
        rnd = run_round(strategy, state, [30, 20, 10], ranks=[2, 4, 8], seed=t)
        assert [set(start.ranks().values()) for start in rnd.starts] == [{2}, {4}, {8}]
        for name in state.adapter.layers:
            D = dense_aggregate(rnd.updates, rnd.weights, name)
            check_best_rank_r(D, dense_global(rnd.state, name), 8, norm_fixed=False)
        state = rnd.state


def test_round_zero_start_keeps_the_peft_init(make_adapter):
    strategy = get_strategy("flexlora")
    init = make_adapter(8, seed=0, zero_b=True, dtype=F64)
    state = strategy.init_state(init, alpha=ALPHA)
    start = strategy.client_start(state, None, ClientContext(client_id=0, round=0, rank=3, alpha=ALPHA))
    for name, p in start.layers.items():
        assert torch.equal(p.A, init.layers[name].A[:3]) and not p.B.any()


def test_start_from_an_unordered_warm_start_is_still_the_best_truncation(make_adapter):
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(8, seed=5, dtype=F64), alpha=ALPHA)  # random factors: not SVD-ordered
    start = strategy.client_start(state, None, ClientContext(client_id=0, round=0, rank=3, alpha=ALPHA))
    for name in state.adapter.layers:
        check_best_rank_r(dense_global(state, name), (ALPHA / 3) * dense_pair(start.layers[name]), 3, norm_fixed=False)


def test_rank_above_the_global_rank_and_server_optimizer_are_config_errors(make_adapter):
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(4, seed=0, dtype=F64), alpha=ALPHA)
    with pytest.raises(ConfigError, match="client 7: rank 6 exceeds"):
        strategy.client_start(state, None, ClientContext(client_id=7, round=0, rank=6))
    with pytest.raises(ConfigError):
        get_strategy("flexlora", server_optimizer=ServerAdam())
    with pytest.raises(ConfigError):
        get_strategy("flexlora", clip=1.0)
    assert strategy.heterogeneous_ranks and not strategy.secure_aggregation and not strategy.factor_averaging


def test_no_d_by_d_svd(monkeypatch, make_adapter):
    layers = {"big": (400, 300)}
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(4, seed=0, layers=layers, dtype=F64), alpha=ALPHA)
    updates = upload_round(strategy, state, [make_adapter(4, seed=s, layers=layers, dtype=F64) for s in (1, 2)])
    shapes = record_svd_inputs(monkeypatch)
    strategy.aggregate(updates, state)
    assert shapes and max(max(s) for s in shapes) <= 8  # only the (Σ r_k)² core


def test_bad_uploads_name_the_client(make_adapter, check_bad_input):
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(4, seed=0, dtype=F64), alpha=ALPHA)
    check_bad_input(strategy, state)
    trained = [make_adapter(r, seed=r, dtype=F64) for r in (2, 4, 3)]
    assert_rejects_renamed_layer(strategy, state, upload_round(strategy, state, trained))


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 40), d_in=st.integers(2, 40), data=st.data())
def test_property_eckart_young_for_any_ranks_and_weights(make_adapter, d_out, d_in, data):
    r_max = data.draw(st.integers(1, min(d_out, d_in, 8)), label="global rank")
    n = data.draw(st.integers(1, 5), label="clients")
    ranks = data.draw(st.lists(st.integers(1, r_max), min_size=n, max_size=n), label="client ranks")
    samples = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n), label="samples")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    layers = {"w": (d_out, d_in)}
    strategy = get_strategy("flexlora")
    state = strategy.init_state(make_adapter(r_max, seed=seed, layers=layers, dtype=F64), alpha=ALPHA)
    trained = [make_adapter(r, seed=seed + 1 + k, layers=layers, dtype=F64) for k, r in enumerate(ranks)]
    updates = upload_round(strategy, state, trained, samples=samples)
    new = strategy.aggregate(updates, state)
    w = torch.tensor(samples, dtype=torch.float64) / sum(samples)
    check_best_rank_r(dense_aggregate(updates, w, "w"), dense_global(new, "w"), r_max, norm_fixed=False)
