"""FFA-LoRA: A frozen at a seeded PEFT-style init, B averaged, exact aggregation."""

import math

import pytest
import torch

from fedlora.errors import AggregationInputError
from fedlora.strategies import ClientContext, get_strategy
from fedlora.strategies.ffa import seeded_kaiming_A


@pytest.fixture
def ffa_state(make_adapter):
    return get_strategy("ffa").init_state(make_adapter(4, 0, zero_b=True), seed=7)


def test_exact_and_a_never_changes(make_adapter, run_round, exactness_error):
    strategy = get_strategy("ffa")
    state = strategy.init_state(make_adapter(4, 0, zero_b=True), seed=7)
    fresh = strategy.init_state(make_adapter(4, 99), seed=7)  # another initial adapter, same seed
    for t in range(3):
        rnd = run_round(strategy, state, [3, 5, 11], seed=t)
        assert exactness_error(rnd) < 1e-5
        for name, p in rnd.state.adapter.layers.items():
            assert torch.equal(p.A, fresh.adapter.layers[name].A)
            expect_B = sum(float(w) * a.layers[name].B.double() for w, a in zip(rnd.weights, rnd.trained))
            torch.testing.assert_close(p.B.double(), expect_B, rtol=1e-6, atol=1e-6)
        assert all(not any(".lora_A." in k for k in pl) for pl in rnd.payloads)
        state = rnd.state
    assert state.round == 3


def test_seed_determines_a_and_a_is_peft_kaiming(make_adapter):
    strategy = get_strategy("ffa")
    initial = make_adapter(8, 0, zero_b=True)
    a7, b7, a8 = (strategy.init_state(initial, seed=s).adapter for s in (7, 7, 8))
    for name, p in a7.layers.items():
        assert torch.equal(p.A, b7.layers[name].A)
        assert not torch.equal(p.A, a8.layers[name].A)
        assert not torch.equal(p.A, initial.layers[name].A)
        assert torch.equal(p.B, initial.layers[name].B)
    # layers of the same shape get different draws (the layer name is in the key)
    assert not torch.equal(a7.layers["enc.0.query"].A, a7.layers["enc.0.value"].A)
    # kaiming_uniform_(a=√5) is U(−1/√d_in, 1/√d_in): the bound, and the uniform's variance bound²/3
    A = seeded_kaiming_A(64, 40, "x", dtype=torch.float64)
    bound = 1 / math.sqrt(40)
    assert float(A.abs().max()) <= bound and float(A.abs().max()) > 0.95 * bound
    assert float(A.var()) == pytest.approx(bound ** 2 / 3, rel=0.1)
    # a bf16 client draws the same A up to the cast
    torch.testing.assert_close(seeded_kaiming_A(4, 16, "k", dtype=torch.bfloat16),
                               seeded_kaiming_A(4, 16, "k").to(torch.bfloat16), rtol=0, atol=0)


def test_same_bound_as_real_peft():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(40, 24))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=64, lora_alpha=16, target_modules=["0"]))
    A_peft = lora.base_model.model[0].lora_A["default"].weight.detach()
    ours = seeded_kaiming_A(64, 40, "any")
    assert A_peft.shape == ours.shape
    # both are U(−b, b) with the same b: maxima within a few percent of each other
    assert float(ours.abs().max()) == pytest.approx(float(A_peft.abs().max()), rel=0.05)


def test_parts_and_bytes(ffa_state, make_adapter):
    strategy = get_strategy("ffa")
    assert strategy.trainable(0) == strategy.trainable(5) == {"B"}
    assert strategy.upload_parts(3) == {"B", "extras"}
    assert strategy.secure_aggregation
    b_bytes = sum(4 * d_out * 4 for d_out, _ in [(24, 16), (24, 16), (20, 12)])
    a_bytes = sum(4 * d_in * 4 for _, d_in in [(24, 16), (24, 16), (20, 12)])
    head = 2 * 24 * 4
    ctx = lambda t: ClientContext("c0", t)  # noqa: E731
    assert strategy.download_bytes(ffa_state, ctx(0)) == a_bytes + b_bytes + head
    assert strategy.download_bytes(ffa_state, ctx(1)) == b_bytes + head
    assert strategy.upload_bytes(ffa_state.adapter, 1) == b_bytes + head


def test_training_a_is_caught(ffa_state):
    strategy = get_strategy("ffa")
    start = ffa_state.adapter.clone()
    trained = start.clone()
    trained.layers["enc.1.query"].A[0, 0] += 1
    with pytest.raises(AggregationInputError, match="client c4, layer 'enc.1.query'.*freezes A"):
        strategy.before_upload(trained, start, ClientContext("c4", 2))


def test_bad_input(ffa_state, check_bad_input):
    check_bad_input(get_strategy("ffa"), ffa_state)
