"""The Python API keeps its promise: bad input to a strategy, to the factor algebra, to the alignment
or to the diagnostics raises a FedLoRAError subclass naming the client, layer or value, never a raw
ZeroDivisionError, LinAlgError, KeyError or torch shape error, and never a silently wrong result.

Every strategy goes through the same hooks an engine calls; tensors are tiny and random.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.align import alignment_rotation, procrustes
from fedlora.diagnostics import round_diagnostics
from fedlora.errors import AggregationInputError, ConfigError
from fedlora.factors import Adapter, LoRAPair, factored_aggregate, lowrank_svd
from fedlora.strategies import REGISTRY, ClientContext, ClientUpdate, get_strategy, strategy_names

LAYERS = {"enc.0.query": (12, 8), "enc.0.value": (12, 8)}
BAD = "enc.0.value"
ALL = strategy_names()
#: strategies that average factors as they are: one LoRA scaling per round
SINGLE_SCALING = [n for n in ALL if not REGISTRY[n].mixed_scalings]
SVD_SERVERS = ["flexlora", "svd", "subspace", "fedsvd"]


def adapter(seed: int, rank: int = 2, scale: float = 1.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({name: LoRAPair(scale * torch.randn(rank, d_in, generator=g),
                                   scale * torch.randn(d_out, rank, generator=g))
                    for name, (d_out, d_in) in LAYERS.items()},
                   {"head.weight": torch.randn(2, 12, generator=g)})


def round_of(name: str, n: int = 3):
    """(strategy, state, updates): a round of ``n`` clients as an engine builds it (payload → receive)."""
    strategy = get_strategy(name)
    state = strategy.init_state(adapter(0))
    updates = []
    for k in range(n):
        ctx = ClientContext(client_id=f"c{k}", round=0, num_samples=10 + k, num_clients=n, total_clients=n)
        start = strategy.client_start(state, None, ctx)
        trained = start.map(lambda _, p: LoRAPair(p.A + 0.1 * torch.randn(p.A.shape), p.B + 0.1 * torch.randn(p.B.shape)))
        trained = Adapter(trained.layers, {k_: v + 0.1 for k_, v in start.extras.items()})
        if "A" not in strategy.trainable(0) or "B" not in strategy.trainable(0):  # frozen factors stay put
            keep = "A" if "A" not in strategy.trainable(0) else "B"
            trained = Adapter({ln: p._replace(**{keep: getattr(start.layers[ln], keep)}) for ln, p in trained.layers.items()},
                              trained.extras)
        out, info = strategy.before_upload(trained, start, ctx)
        received = strategy.receive(strategy.payload(out, 0), state, 0)
        updates.append(ClientUpdate(ctx.client_id, received, ctx.num_samples, strategy.scaling(ctx, 2), info))
    return strategy, state, updates


def replace(updates, k, **changes):
    return [dataclasses.replace(u, **changes) if i == k else u for i, u in enumerate(updates)]


@pytest.mark.parametrize("name", ALL)
def test_a_client_id_twice_in_one_round_is_refused(name):
    strategy, state, updates = round_of(name)
    with pytest.raises(AggregationInputError, match="client c0 appears twice in round 0"):
        strategy.aggregate(replace(updates, 2, client_id="c0"), state)


@pytest.mark.parametrize("name", SINGLE_SCALING)
def test_different_scalings_are_refused_where_factors_are_averaged(name):
    strategy, state, updates = round_of(name)
    s = updates[1].scaling
    with pytest.raises(AggregationInputError, match=rf"client c1 trained with LoRA scaling {2 * s:g} but client c0 "
                                                    rf"with {s:g}: strategy '{name}'.*cannot combine"):
        strategy.aggregate(replace(updates, 1, scaling=2 * s), state)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scaling", [-2.0, float("inf")])
def test_a_negative_or_infinite_client_scaling_is_refused(name, scaling):
    strategy, state, updates = round_of(name)
    with pytest.raises(AggregationInputError, match=rf"client c1: LoRA scaling {scaling} is not a positive finite"):
        strategy.aggregate(replace(updates, 1, scaling=scaling), state)


@pytest.mark.parametrize("name", ALL)
def test_a_zero_sample_count_is_refused_even_with_uniform_weights(name):
    strategy = get_strategy(name, weighting="uniform")
    _, state, updates = round_of(name)
    with pytest.raises(AggregationInputError, match=r"client c2: weight 0.0 \(its sample count\)"):
        strategy.aggregate(replace(updates, 2, num_samples=0), state)


@pytest.mark.parametrize("name", ALL)
def test_a_global_state_with_unusable_scaling_or_optimiser_moments_is_refused(name):
    strategy, state, updates = round_of(name)
    with pytest.raises(AggregationInputError, match="the global state: LoRA scaling nan"):
        strategy.aggregate(updates, dataclasses.replace(state, scaling=float("nan")))
    moments = {"m/x": torch.tensor([float("inf")])}
    with pytest.raises(AggregationInputError, match="server optimiser moment 'm/x' contains NaN or Inf"):
        strategy.aggregate(updates, dataclasses.replace(state, server_opt=moments))


@pytest.mark.parametrize("name", ALL)
def test_nan_in_the_initial_adapter_names_the_layer(name):
    init = adapter(0)
    init.layers[BAD].A[1, 3] = float("nan")
    with pytest.raises(AggregationInputError, match=rf"the initial adapter, layer '{BAD}': factor A contains NaN"):
        get_strategy(name).init_state(init)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("alpha", [0.0, -16.0, float("nan")])
def test_a_non_positive_alpha_is_refused_by_init_state_and_the_client_context(name, alpha):
    with pytest.raises(ConfigError, match=rf"init_state: LoRA alpha must be a positive finite number, got {alpha}"):
        get_strategy(name).init_state(adapter(0), alpha=alpha)
    with pytest.raises(ConfigError, match=rf"client c4: LoRA alpha must be a positive finite number, got {alpha}"):
        ClientContext(client_id="c4", round=0, alpha=alpha)


@pytest.mark.parametrize("name", ALL)
def test_scaling_of_rank_zero_is_a_config_error_not_a_division_by_zero(name):
    with pytest.raises(ConfigError, match=r"client c4: LoRA rank must be an integer ≥ 1, got 0"):
        get_strategy(name).scaling(ClientContext(client_id="c4", round=0), 0)


@pytest.mark.parametrize("name", ALL)
def test_a_payload_missing_a_layer_is_refused_not_filled_in_from_the_global_state(name):
    strategy, state, _ = round_of(name, n=1)
    payload = strategy.payload(state.adapter, 0)
    dropped = next(k for k in payload if k.startswith(BAD))
    del payload[dropped]
    with pytest.raises(AggregationInputError, match=rf"payload lacks \['{dropped}'\]: strategy '{name}' uploads"):
        strategy.receive(payload, state, 0)


@pytest.mark.parametrize("name", SVD_SERVERS)
def test_uploads_that_overflow_the_svd_name_the_layer(name):
    strategy, state, updates = round_of(name)
    huge = adapter(5, scale=1e30)  # finite in float32, but its products are not
    if name == "fedsvd":  # FedSVD's clients never change A
        huge = Adapter({n: LoRAPair(state.adapter.layers[n].A, p.B) for n, p in huge.layers.items()}, huge.extras)
    with pytest.raises(AggregationInputError, match=r"layer 'enc.0.query'.*(SVD|NaN or Inf)"):
        strategy.aggregate(replace(updates, 1, adapter=huge), state)


def test_fedrot_names_the_client_and_layer_of_a_nan_before_aligning():
    strategy = get_strategy("fedrot", lam=1.0)
    start = adapter(0)
    trained = adapter(1)
    trained.layers[BAD].A[0, 0] = float("nan")
    with pytest.raises(AggregationInputError, match=rf"client c3, layer '{BAD}': factor A contains NaN"):
        strategy.before_upload(trained, start, ClientContext(client_id="c3", round=1))


def test_svd_and_procrustes_helpers_raise_named_errors_on_non_finite_or_mismatched_input():
    A, B = torch.randn(2, 8), torch.randn(12, 2)
    A[0, 0] = float("inf")
    with pytest.raises(AggregationInputError, match="layer 'q': cannot take the SVD .* NaN or Inf"):
        lowrank_svd(A, B, "layer 'q'")
    with pytest.raises(AggregationInputError, match="layer 'q': cannot take the SVD"):
        factored_aggregate([B], [A], [1.0], "layer 'q'")
    with pytest.raises(AggregationInputError, match=r"layer 'q', term 1: layer shape \(10, 8\) differs"):
        factored_aggregate([B, torch.randn(10, 2)], [torch.randn(2, 8)] * 2, [0.5, 0.5], "layer 'q'")
    with pytest.raises(AggregationInputError, match="procrustes: cannot take the SVD"):
        procrustes(torch.full((3, 3), float("nan")))
    with pytest.raises(AggregationInputError, match=r"factor A of shape \(2, 8\) cannot be aligned to a reference of "
                                                    r"shape \(2, 7\)"):
        alignment_rotation(LoRAPair(torch.randn(2, 8), B), LoRAPair(torch.randn(2, 7), B), "A")


def test_diagnostics_refuse_a_repeated_client_and_an_unusable_scaling():
    strategy, state, updates = round_of("fedit")
    new = strategy.aggregate(updates, state)
    with pytest.raises(AggregationInputError, match="client c0 appears twice in round 0"):
        round_diagnostics(replace(updates, 1, client_id="c0"), [1, 1, 1], new)
    with pytest.raises(AggregationInputError, match="client c2: LoRA scaling nan"):
        round_diagnostics(replace(updates, 2, scaling=float("nan")), [1, 1, 1], new)
    with pytest.raises(AggregationInputError, match="the new global state: LoRA scaling inf"):
        round_diagnostics(updates, [1, 1, 1], dataclasses.replace(new, scaling=float("inf")))
