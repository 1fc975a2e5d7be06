"""FLoRA: stacked exact aggregation with heterogeneous ranks, merged into the base, LoRA restarted."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.errors import ConfigError
from fedlora.server_opt import ServerAdam
from fedlora.strategies import ClientContext, get_strategy
from fedlora.strategies.flora import fresh_adapter

HEAD = "classifier.weight"
SHAPES = [(24, 16), (24, 16), (20, 12)]


def test_heterogeneous_ranks_exact_then_restart(make_adapter, run_round, exactness_error):
    strategy = get_strategy("flora")
    state = strategy.init_state(make_adapter(4, 0), seed=3)
    for name, g in state.adapter.layers.items():
        assert not g.B.any()  # round 0 starts from B = 0 like PEFT
    for t in range(2):
        rnd = run_round(strategy, state, [5, 2, 9], ranks=[2, 4, 8], seed=t)
        assert [s.ranks()["enc.0.query"] for s in rnd.starts] == [2, 4, 8]
        for start in rnd.starts:  # every client starts from a fresh LoRA whose A is a prefix of the global draw
            for name, p in start.layers.items():
                assert not p.B.any()
                g = state.adapter.layers[name].A
                r = min(p.rank, g.shape[0])
                assert torch.equal(p.A[:r], g[:r])
        assert exactness_error(rnd) < 1e-5
        new = rnd.state
        for name, g in new.adapter.layers.items():
            assert g.rank == 4 and not g.B.any()
            assert not torch.equal(g.A, state.adapter.layers[name].A)  # re-drawn each round
            assert torch.equal(g.A, fresh_adapter(state.adapter, None, 3, t + 1).layers[name].A)
            assert new.base_delta[name].rank == 2 + 4 + 8
        head = sum(float(w) * a.extras[HEAD].double() for w, a in zip(rnd.weights, rnd.trained))
        torch.testing.assert_close(new.adapter.extras[HEAD].double(), head)
        state = new


def test_flags_options_and_bytes(make_adapter, run_round):
    strategy = get_strategy("flora")
    assert strategy.heterogeneous_ranks and not strategy.secure_aggregation and not strategy.factor_averaging
    with pytest.raises(ConfigError, match="server optimiser"):
        get_strategy("flora", server_optimizer=ServerAdam())
    with pytest.raises(ConfigError, match="client c1, layer 'enc.1.query': rank 13"):
        strategy.client_start(strategy.init_state(make_adapter(4, 0)), None, ClientContext("c1", 0, rank=13))
    rnd = run_round(strategy, strategy.init_state(make_adapter(4, 0)), [1, 1], ranks=[2, 8])
    adapter = 4 * 4 * sum(a + b for a, b in SHAPES) + 2 * 24 * 4
    stacked = 4 * (2 + 8) * sum(a + b for a, b in SHAPES)
    assert strategy.download_bytes(rnd.state, ClientContext("c0", 1)) == adapter + stacked
    assert strategy.upload_bytes(rnd.trained[1], 0) == 4 * 8 * sum(a + b for a, b in SHAPES) + 2 * 24 * 4


def test_bad_input(make_adapter, check_bad_input):
    strategy = get_strategy("flora")
    check_bad_input(strategy, strategy.init_state(make_adapter(4, 0)))


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(2, 40),
    d_in=st.integers(2, 40),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    samples=st.lists(st.integers(1, 1000), min_size=5, max_size=5),
    alpha=st.floats(0.5, 64),
    seed=st.integers(0, 2**16),
)
def test_exact_for_any_shapes_ranks_and_weights(make_adapter, run_round, exactness_error,
                                               d_out, d_in, ranks, samples, alpha, seed):
    ranks = [min(r, d_out, d_in) for r in ranks]
    strategy = get_strategy("flora")
    layers = {"q": (d_out, d_in), "v": (d_in, d_out)}
    state = strategy.init_state(make_adapter(max(ranks), seed, dtype=torch.float64, layers=layers), alpha=alpha)
    rnd = run_round(strategy, state, samples[:len(ranks)], ranks=ranks, alpha=alpha, seed=seed)
    assert exactness_error(rnd) < 1e-10
    assert all(not g.B.any() for g in rnd.state.adapter.layers.values())
