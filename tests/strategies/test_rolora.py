"""RoLoRA: B in even rounds, A in odd rounds; the frozen factor is untouched and the aggregate exact."""

import pytest
import torch

from fedlora.errors import AggregationInputError
from fedlora.strategies import ClientContext, get_strategy

HEAD = "classifier.weight"


def test_schedule():
    strategy = get_strategy("rolora")
    assert [strategy.trainable(t) for t in range(4)] == [{"B"}, {"A"}, {"B"}, {"A"}]
    assert [strategy.upload_parts(t) for t in range(4)] == [{"B", "extras"}, {"A", "extras"}] * 2
    frozen_head = get_strategy("rolora", train_head=False)
    assert [frozen_head.upload_parts(t) for t in range(2)] == [{"B"}, {"A"}]
    assert strategy.trains_extras(0) and not frozen_head.trains_extras(1)
    assert strategy.secure_aggregation


@pytest.mark.parametrize("train_head", [True, False])
def test_four_rounds_exact_and_the_frozen_factor_is_untouched(make_adapter, run_round, exactness_error, train_head):
    strategy = get_strategy("rolora", train_head=train_head)
    state = strategy.init_state(make_adapter(4, 0, zero_b=True))
    for t in range(4):
        rnd = run_round(strategy, state, [4, 1, 6], seed=t)
        trained, frozen = ("B", "A") if t % 2 == 0 else ("A", "B")
        for payload in rnd.payloads:
            assert all(f".lora_{trained}." in k or k == HEAD for k in payload)
            assert (HEAD in payload) == train_head
        for name, g in rnd.state.adapter.layers.items():
            assert torch.equal(getattr(g, frozen), getattr(state.adapter.layers[name], frozen))
            mean = sum(float(w) * getattr(a.layers[name], trained).double() for w, a in zip(rnd.weights, rnd.trained))
            torch.testing.assert_close(getattr(g, trained).double(), mean, rtol=1e-6, atol=1e-6)
        assert torch.equal(rnd.state.adapter.extras[HEAD], state.adapter.extras[HEAD]) != train_head
        assert exactness_error(rnd) < 1e-5
        state = rnd.state


def test_training_the_frozen_factor_is_caught(make_adapter):
    strategy = get_strategy("rolora", train_head=False)
    start = make_adapter(4, 0)
    moved_b = start.clone()
    moved_b.layers["enc.0.value"].B[1, 1] += 0.1
    with pytest.raises(AggregationInputError, match="client c2, layer 'enc.0.value'.*freezes B in round 1"):
        strategy.before_upload(moved_b, start, ClientContext("c2", 1))
    strategy.before_upload(moved_b, start, ClientContext("c2", 2))  # B trains in even rounds
    moved_head = start.clone()
    moved_head.extras[HEAD][0, 0] += 0.1
    with pytest.raises(AggregationInputError, match=f"client c2, key '{HEAD}'.*freezes the extras"):
        strategy.before_upload(moved_head, start, ClientContext("c2", 2))


def test_bad_input(make_adapter, check_bad_input):
    strategy = get_strategy("rolora")
    state = strategy.init_state(make_adapter(4, 0))
    check_bad_input(strategy, state)
    state.round = 1
    check_bad_input(strategy, state)
