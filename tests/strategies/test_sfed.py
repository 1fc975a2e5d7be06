"""SFed-LoRA: FedSA-LoRA with γ = α·√(N/r), N per round or in total."""

import math

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.strategies import ClientContext, get_strategy
from fedlora.strategies.fedsa import FedSA


@pytest.mark.parametrize("rank", [1, 4, 8, 512])
def test_scaling_for_both_n_modes(rank):
    ctx = ClientContext("c0", 3, alpha=16, num_clients=5, total_clients=20)
    assert get_strategy("sfed").scaling(ctx, rank) == pytest.approx(16 * math.sqrt(5 / rank))
    assert get_strategy("sfed", n="round").scaling(ctx, rank) == pytest.approx(16 * math.sqrt(5 / rank))
    assert get_strategy("sfed", n="total").scaling(ctx, rank) == pytest.approx(16 * math.sqrt(20 / rank))
    # with N = 1 it is rsLoRA's α/√r
    one = ClientContext("c0", 0, alpha=16)
    assert get_strategy("sfed").scaling(one, rank) == pytest.approx(get_strategy("fedsa", rslora=True).scaling(one, rank))


def test_rounds_use_gamma_and_keep_fedsa_semantics(make_adapter, run_round):
    strategy = get_strategy("sfed", n="total")
    assert isinstance(strategy, FedSA) and strategy.secure_aggregation
    state = strategy.init_state(make_adapter(4, 0, zero_b=True), alpha=8)
    rnd = run_round(strategy, state, [2, 3, 5], alpha=8, total_clients=12)
    assert [u.scaling for u in rnd.updates] == pytest.approx([8 * math.sqrt(12 / 4)] * 3)
    assert rnd.state.scaling == pytest.approx(8 * math.sqrt(12 / 4))
    for name, g in rnd.state.adapter.layers.items():
        mean_A = sum(float(w) * a.layers[name].A.double() for w, a in zip(rnd.weights, rnd.trained))
        torch.testing.assert_close(g.A.double(), mean_A)
    assert all(not any(".lora_B." in k for k in p) for p in rnd.payloads)
    nxt = run_round(strategy, rnd.state, [2, 3, 5], personals=rnd.personals, alpha=8, total_clients=12, seed=1)
    assert torch.equal(nxt.starts[2].layers["enc.1.query"].B, rnd.trained[2].layers["enc.1.query"].B)


def test_bad_options_and_input(make_adapter, check_bad_input):
    with pytest.raises(ConfigError, match="n='all'"):
        get_strategy("sfed", n="all")
    with pytest.raises(ConfigError, match="rslora"):
        get_strategy("sfed", rslora=True)
    with pytest.raises(ConfigError, match="client c3: sfed needs N"):
        get_strategy("sfed", n="total").scaling(ClientContext("c3", 0, total_clients=0), 4)
    strategy = get_strategy("sfed", keep_head_local=True)
    check_bad_input(strategy, strategy.init_state(make_adapter(4, 0)))
