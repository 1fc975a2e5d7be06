"""FedRot-LoRA and FedIT: exactness of the rotation, λ endpoints, and the aggregation-error cut."""

import pytest
import torch

from fedlora.align import haar_rotation
from fedlora.errors import AggregationInputError, ConfigError
from fedlora.factors import Adapter, LoRAPair
from fedlora.server_opt import ServerAdam
from fedlora.strategies import ClientContext, ClientUpdate, get_strategy

LAYERS = {"enc.0.query": (24, 16), "enc.0.value": (24, 16), "enc.1.query": (20, 12)}


def make_adapter(r, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {n: LoRAPair(scale * torch.randn(r, d_in, generator=g).to(dtype), scale * torch.randn(d_out, r, generator=g).to(dtype))
         for n, (d_out, d_in) in LAYERS.items()},
        {"classifier.weight": torch.randn(2, 24, generator=g).to(dtype)},
    )


def rotated_clients(reference, n, noise, seed):
    """Clients that are random rotations of one shared update (plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    clients = []
    for _ in range(n):
        layers = {}
        for name, p in reference.layers.items():
            Q = haar_rotation(p.rank, g)
            layers[name] = LoRAPair(Q.T @ p.A + noise * torch.randn(p.A.shape, generator=g),
                                    p.B @ Q + noise * torch.randn(p.B.shape, generator=g))
        clients.append(Adapter(layers, dict(reference.extras)))
    return clients


def run_round(strategy, state, clients, round, samples=None):
    """One round through the client and server hooks; returns (new state, uploaded adapters, infos)."""
    state.round = round
    updates, infos = [], []
    for k, trained in enumerate(clients):
        ctx = ClientContext(client_id=k, round=round, num_samples=(samples or [10] * len(clients))[k])
        start = strategy.client_start(state, None, ctx)
        adapter, info = strategy.before_upload(trained, start, ctx)
        received = strategy.receive(strategy.payload(adapter, round), state, round)
        updates.append(ClientUpdate(k, received, ctx.num_samples, state.scaling, info))
        infos.append(info)
    return strategy.aggregate(updates, state), updates, infos


def dense_relative_error(updates, weights, new_state):
    """‖Σ p_k B_k A_k − B_g A_g‖ / ‖Σ p_k B_k A_k‖ over all layers, computed densely."""
    num = den = 0.0
    for name in LAYERS:
        ideal = sum(w * (u.adapter.layers[name].B.double() @ u.adapter.layers[name].A.double())
                    for w, u in zip(weights, updates))
        g = new_state.adapter.layers[name]
        num += float(((ideal - g.B.double() @ g.A.double()) ** 2).sum())
        den += float((ideal ** 2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("round", [1, 2, 3, 4])
@pytest.mark.parametrize("options", [dict(lam=1.0), dict(lam=0.3), dict(align="A"), dict(align="B"),
                                     dict(align="joint"), dict(align="joint", lam=1.0),
                                     dict(gauge="random"), dict(gauge="scalar"), dict(align="joint", gauge="random")])
def test_before_upload_preserves_every_product(round, options):
    strategy = get_strategy("fedrot", **options)
    reference = make_adapter(4, seed=0)
    client = make_adapter(4, seed=round)
    out, info = strategy.before_upload(client, reference, ClientContext(client_id=3, round=round))
    for name, p in client.layers.items():
        q = out.layers[name]
        torch.testing.assert_close(q.B @ q.A, p.B @ p.A, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.extras["classifier.weight"], client.extras["classifier.weight"])  # head not rotated
    assert set(info["rotation_size"]) == set(LAYERS)


def test_rotation_is_in_so_r_and_the_schedule_alternates():
    strategy = get_strategy("fedrot", lam=1.0)
    assert [strategy.aligned_factor(t) for t in range(5)] == [None, "A", "B", "A", "B"]
    assert get_strategy("fedrot", align="B").aligned_factor(3) == "B"
    reference, client = make_adapter(5, 0), make_adapter(5, 1)
    for t in (1, 2):
        out, info = strategy.before_upload(client, reference, ClientContext(0, t))
        for name, p in client.layers.items():
            # recover R from A' = Rᵀ A (A has full row rank): R = (A' A⁺)ᵀ
            R = (out.layers[name].A.double() @ torch.linalg.pinv(p.A.double())).T
            torch.testing.assert_close(R.T @ R, torch.eye(5, dtype=R.dtype), atol=1e-5, rtol=0)
            assert float(torch.linalg.det(R)) == pytest.approx(1.0, abs=1e-5)
            assert info["rotation_size"][name] == pytest.approx(float((R - torch.eye(5, dtype=R.dtype)).norm()), abs=1e-4)


def joint_objective(pair, ref):
    """‖A − A_ref‖² + ‖B − B_ref‖² of an uploaded layer (the objective the joint rotation minimises)."""
    return float(((pair.A.double() - ref.A.double()) ** 2).sum() + ((pair.B.double() - ref.B.double()) ** 2).sum())


@pytest.mark.parametrize("round", [1, 2, 3])
def test_joint_alignment_every_round_reports_and_minimises_both_factors(round):
    strategy = get_strategy("fedrot", lam=1.0, align="joint")
    assert [strategy.aligned_factor(t) for t in range(4)] == [None, "joint", "joint", "joint"]
    reference, client = make_adapter(5, 0), make_adapter(5, round)
    ctx = ClientContext(0, round)
    out, info = strategy.before_upload(client, reference, ctx)
    singles = {f: get_strategy("fedrot", lam=1.0, align=f).before_upload(client, reference, ctx)[0] for f in "AB"}
    assert info["aligned"] == "joint" and set(info["rotation_size"]) == set(LAYERS)
    for name, p in client.layers.items():
        R = (out.layers[name].A.double() @ torch.linalg.pinv(p.A.double())).T  # A' = Rᵀ A, A of full row rank
        eye = torch.eye(5, dtype=R.dtype)
        torch.testing.assert_close(R.T @ R, eye, atol=1e-5, rtol=0)
        assert float(torch.linalg.det(R)) == pytest.approx(1.0, abs=1e-5)
        assert info["rotation_size"][name] == pytest.approx(float((R - eye).norm()), abs=1e-4)
        ref = reference.layers[name]
        # joint minimises the sum of both mismatches, so neither single-factor alignment does better on it
        assert joint_objective(out.layers[name], ref) <= min(joint_objective(q.layers[name], ref)
                                                             for q in singles.values()) + 1e-4


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_joint_alignment_is_secure_aggregation_compatible(lam):
    # the rotation happens on the client; the server's aggregate is the plain weighted mean of the uploads
    strategy = get_strategy("fedrot", lam=lam, align="joint")
    assert strategy.secure_aggregation
    reference = make_adapter(4, 0)
    clients = [make_adapter(4, s) for s in (21, 22, 23)]
    samples = [5, 10, 20]
    new, updates, infos = run_round(strategy, strategy.init_state(reference), clients, 3, samples=samples)
    assert all(i["aligned"] == "joint" for i in infos)
    w = [n / sum(samples) for n in samples]
    uploaded = [u.adapter.to_state_dict() for u in updates]
    for key, value in new.adapter.to_state_dict().items():
        torch.testing.assert_close(value, sum(wk * up[key] for wk, up in zip(w, uploaded)), rtol=1e-6, atol=1e-6)
    # and the uploads really were rotated (else this would be FedIT)
    assert not torch.allclose(updates[0].adapter.layers["enc.0.query"].A, clients[0].layers["enc.0.query"].A)


def test_round_zero_is_not_aligned():
    out, info = get_strategy("fedrot", lam=1.0).before_upload(make_adapter(4, 1), make_adapter(4, 0), ClientContext(0, 0))
    assert info == {} and torch.equal(out.layers["enc.0.query"].A, make_adapter(4, 1).layers["enc.0.query"].A)


@pytest.mark.parametrize("round", [0, 1, 2])
def test_lambda_zero_is_exactly_fedit(round):
    reference = make_adapter(4, 0)
    clients = [make_adapter(4, s) for s in (11, 12, 13)]
    results = []
    for name, opts in (("fedit", {}), ("fedrot", {"lam": 0.0})):
        strategy = get_strategy(name, **opts)
        new, _, _ = run_round(strategy, strategy.init_state(reference), clients, round, samples=[5, 10, 20])
        results.append(new.adapter.to_state_dict())
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("align", ["alternate", "joint"])
def test_hard_alignment_recovers_the_reference(align):
    reference = make_adapter(4, 0)
    strategy = get_strategy("fedrot", lam=1.0, align=align)
    for t in (1, 2):
        state = strategy.init_state(reference)
        new, updates, _ = run_round(strategy, state, rotated_clients(reference, 3, noise=0.0, seed=t), t)
        for name, p in reference.layers.items():
            torch.testing.assert_close(new.adapter.layers[name].A, p.A, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(new.adapter.layers[name].B, p.B, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("round", [1, 2])
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("align", ["alternate", "joint"])
def test_fedrot_cuts_the_aggregation_error_tenfold(round, lam, align):
    reference = make_adapter(4, 0)
    clients = rotated_clients(reference, 5, noise=0.02, seed=round)
    errors = {}
    for name, opts in (("fedit", {}), ("fedrot", {"lam": lam, "align": align})):
        strategy = get_strategy(name, **opts)
        new, updates, _ = run_round(strategy, strategy.init_state(reference), clients, round)
        errors[name] = dense_relative_error(updates, strategy.weights(updates).tolist(), new)
    assert errors["fedit"] > 0.3  # random rotations make factor averaging badly wrong ...
    assert errors["fedrot"] * 10 < errors["fedit"], errors  # ... and alignment cuts it ≥ 10×


def test_fedit_average_and_weights():
    reference = make_adapter(3, 0)
    clients = [make_adapter(3, s) for s in (1, 2)]
    strategy = get_strategy("fedit")
    new, _, _ = run_round(strategy, strategy.init_state(reference), clients, 0, samples=[1, 3])
    for name in LAYERS:
        expect = 0.25 * clients[0].layers[name].A + 0.75 * clients[1].layers[name].A
        torch.testing.assert_close(new.adapter.layers[name].A, expect)
    torch.testing.assert_close(new.adapter.extras["classifier.weight"],
                               0.25 * clients[0].extras["classifier.weight"] + 0.75 * clients[1].extras["classifier.weight"])
    assert new.round == 1
    uniform = get_strategy("fedit", weighting="uniform")
    new_u, _, _ = run_round(uniform, uniform.init_state(reference), clients, 0, samples=[1, 3])
    torch.testing.assert_close(new_u.adapter.layers["enc.0.query"].B,
                               0.5 * (clients[0].layers["enc.0.query"].B + clients[1].layers["enc.0.query"].B))


def test_bf16_factors_aggregate_in_float32_and_stay_bf16():
    reference = make_adapter(4, 0, dtype=torch.bfloat16)
    clients = [make_adapter(4, s, dtype=torch.bfloat16) for s in (1, 2, 3)]
    strategy = get_strategy("fedrot", lam=0.5)
    new, updates, _ = run_round(strategy, strategy.init_state(reference), clients, 1)
    assert new.adapter.layers["enc.0.query"].A.dtype == torch.bfloat16


def test_server_adam_moves_toward_the_average_and_keeps_state():
    reference = make_adapter(3, 0)
    clients = [make_adapter(3, s) for s in (1, 2)]
    strategy = get_strategy("fedrot", lam=0.5, server_optimizer=ServerAdam(lr=0.01))
    new, updates, _ = run_round(strategy, strategy.init_state(reference), clients, 1)
    plain = get_strategy("fedrot", lam=0.5)
    avg, _, _ = run_round(plain, plain.init_state(reference), clients, 1)
    name = "enc.0.query"
    step = new.adapter.layers[name].A - reference.layers[name].A
    target = avg.adapter.layers[name].A - reference.layers[name].A
    # first Adam step without bias correction: η·(1−β₁)Δ / (√(1−β₂)|Δ| + τ), same sign as Δ
    expected = 0.01 * 0.1 * target / ((0.01 ** 0.5) * target.abs() + 1e-3)
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    assert any(k.startswith("m/") for k in new.server_opt)


def test_bad_input_is_named():
    strategy = get_strategy("fedrot")
    reference = make_adapter(3, 0)
    state = strategy.init_state(reference)
    with pytest.raises(ConfigError, match=r"strategy\.options\.lam = 1\.5: FedRot.s strength λ must be a number in \[0, 1\]"):
        get_strategy("fedrot", lam=1.5)
    with pytest.raises(ConfigError, match="align="):
        get_strategy("fedrot", align="C")
    with pytest.raises(ConfigError, match="align='joint' needs gauge='procrustes'"):
        get_strategy("fedrot", align="joint", gauge="scalar")
    with pytest.raises(ConfigError, match="unknown strategy 'fedrott'.*fedrot"):
        get_strategy("fedrott")
    with pytest.raises(ConfigError, match="unknown option 'lam' of strategy 'fedit'. Its options: weighting"):
        get_strategy("fedit", lam=0.3)
    with pytest.raises(AggregationInputError, match="empty round 0"):
        strategy.aggregate([], state)
    bad = make_adapter(3, 1)
    bad.layers["enc.1.query"].B[0, 0] = float("nan")
    with pytest.raises(AggregationInputError, match="client c7, layer 'enc.1.query'.*NaN"):
        strategy.aggregate([ClientUpdate("c7", bad, 3)], state)
    with pytest.raises(AggregationInputError, match="client c2: weight 0.0"):
        strategy.aggregate([ClientUpdate("c2", make_adapter(3, 1), 0)], state)
    assert strategy.secure_aggregation and get_strategy("fedit").secure_aggregation
