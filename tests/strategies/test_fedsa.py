"""FedSA-LoRA: A averaged, B (and optionally the head) personal, rsLoRA scaling."""

import math

import pytest
import torch

from fedlora.errors import AggregationInputError
from fedlora.server_opt import ServerAdam
from fedlora.strategies import ClientContext, get_strategy

HEAD = "classifier.weight"


def test_a_is_the_weighted_mean_and_b_stays_personal(make_adapter, run_round):
    strategy = get_strategy("fedsa")
    state = strategy.init_state(make_adapter(4, 0, zero_b=True))
    r0 = run_round(strategy, state, [2, 3, 5])
    for name, g in r0.state.adapter.layers.items():
        mean_A = sum(float(w) * a.layers[name].A.double() for w, a in zip(r0.weights, r0.trained))
        torch.testing.assert_close(g.A.double(), mean_A, rtol=1e-6, atol=1e-6)
        assert torch.equal(g.B, state.adapter.layers[name].B)  # the global B is never aggregated
    mean_head = sum(float(w) * a.extras[HEAD].double() for w, a in zip(r0.weights, r0.trained))
    torch.testing.assert_close(r0.state.adapter.extras[HEAD].double(), mean_head)
    for payload in r0.payloads:
        assert not any(".lora_B." in k for k in payload) and HEAD in payload
    # round 1: each client gets the new global A with its own B back
    r1 = run_round(strategy, r0.state, [2, 3, 5], personals=r0.personals, seed=1)
    for start, before in zip(r1.starts, r0.trained):
        for name, p in start.layers.items():
            assert torch.equal(p.B, before.layers[name].B)
            assert torch.equal(p.A, r0.state.adapter.layers[name].A)
        assert torch.equal(start.extras[HEAD], r0.state.adapter.extras[HEAD])
    assert r1.starts[0].layers["enc.0.query"].B.shape == (24, 4)


def test_keep_head_local(make_adapter, run_round):
    strategy = get_strategy("fedsa", keep_head_local=True)
    state = strategy.init_state(make_adapter(4, 0, zero_b=True))
    r0 = run_round(strategy, state, [1, 1])
    assert all(HEAD not in p for p in r0.payloads)
    assert torch.equal(r0.state.adapter.extras[HEAD], state.adapter.extras[HEAD])
    r1 = run_round(strategy, r0.state, [1, 1], personals=r0.personals, seed=1)
    for start, before in zip(r1.starts, r0.trained):
        assert torch.equal(start.extras[HEAD], before.extras[HEAD])
    # a client without personal state starts from the global (initial) B and head
    fresh = strategy.client_start(r0.state, None, ClientContext("new", 1))
    assert torch.equal(fresh.extras[HEAD], state.adapter.extras[HEAD])
    assert torch.equal(fresh.layers["enc.0.query"].B, state.adapter.layers["enc.0.query"].B)


def test_scaling_parts_and_bytes(make_adapter):
    ctx = ClientContext("c0", 0, alpha=16)
    assert get_strategy("fedsa").scaling(ctx, 8) == pytest.approx(2.0)
    assert get_strategy("fedsa", rslora=True).scaling(ctx, 8) == pytest.approx(16 / math.sqrt(8))
    assert get_strategy("fedsa", rslora=True).init_state(make_adapter(4, 0), alpha=16).scaling == pytest.approx(8.0)
    strategy = get_strategy("fedsa")
    assert strategy.trainable(3) == {"A", "B"} and strategy.secure_aggregation
    state = strategy.init_state(make_adapter(4, 0))
    a_bytes = 4 * 4 * (16 + 16 + 12)
    b_bytes = 4 * 4 * (24 + 24 + 20)
    head = 2 * 24 * 4
    assert strategy.upload_bytes(state.adapter, 1) == a_bytes + head
    assert strategy.download_bytes(state, ClientContext("c", 0)) == a_bytes + b_bytes + head
    assert strategy.download_bytes(state, ClientContext("c", 2)) == a_bytes + head
    assert get_strategy("fedsa", keep_head_local=True).download_bytes(state, ClientContext("c", 2)) == a_bytes


def test_server_optimiser_acts_on_a_only(make_adapter, run_round):
    plain, adam = get_strategy("fedsa"), get_strategy("fedsa", server_optimizer=ServerAdam(lr=0.05))
    init = make_adapter(4, 0)
    r_plain, r_adam = (run_round(s, s.init_state(init), [1, 2]) for s in (plain, adam))
    name = "enc.0.query"
    assert not torch.allclose(r_adam.state.adapter.layers[name].A, r_plain.state.adapter.layers[name].A)
    assert torch.equal(r_adam.state.adapter.layers[name].B, init.layers[name].B)
    assert any(".lora_A." in k for k in r_adam.state.server_opt)
    assert not any(".lora_B." in k for k in r_adam.state.server_opt)


def test_personal_state_mismatch_is_named(make_adapter, run_round):
    strategy = get_strategy("fedsa")
    state = strategy.init_state(make_adapter(4, 0))
    other = strategy.personal_state(make_adapter(3, 1))
    with pytest.raises(AggregationInputError, match="client c9, layer 'enc.0.query': personal state has B of shape"):
        strategy.client_start(state, other, ClientContext("c9", 1))


def test_bad_input(make_adapter, check_bad_input):
    strategy = get_strategy("fedsa")
    check_bad_input(strategy, strategy.init_state(make_adapter(4, 0)))
