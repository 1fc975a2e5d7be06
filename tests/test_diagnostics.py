"""Round diagnostics against dense computations on small shapes, plus closed-form cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.align import haar_rotation
from fedlora.diagnostics import communication_bytes, keeps_personal_state, round_diagnostics, rotation_sizes
from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair, normalize_weights
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState, get_strategy

F64 = torch.float64


def rand_adapter(shapes, ranks, g, dtype=F64, extras=None):
    """Layers l0, l1, … with (d_out, d_in) from ``shapes`` and ranks from ``ranks``."""
    layers = {f"l{i}": LoRAPair(torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype))
              for i, ((d_out, d_in), r) in enumerate(zip(shapes, ranks))}
    return Adapter(layers, dict(extras or {}))


def dense_reference(updates, weights, state):
    """Every diagnostic from dense d_out×d_in matrices (float64), independent of the Gram route."""
    p = normalize_weights(weights).tolist()
    names = list(state.adapter.layers)
    base = state.base_delta or {}
    client_dw = [{n: u.scaling * u.adapter.layers[n].B @ u.adapter.layers[n].A for n in names} for u in updates]
    ideal = {n: sum(pk * dw[n] for pk, dw in zip(p, client_dw)) for n in names}
    glob = {}
    for n in names:
        g = state.adapter.layers[n]
        glob[n] = state.scaling * g.B @ g.A + (base[n].B @ base[n].A if n in base else 0)
    layer_err = {n: float(torch.linalg.matrix_norm(ideal[n] - glob[n])) for n in names}
    layer_ideal = {n: float(torch.linalg.matrix_norm(ideal[n])) for n in names}
    vec = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    v_ideal = vec(ideal)
    v_clients = [vec(dw) for dw in client_dw]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731

    def projector(B):  # orthogonal projector onto B's column space (via the pseudo-inverse, not QR)
        return B @ torch.linalg.pinv(B)

    overlaps = []
    for n in names:
        Bg = state.adapter.layers[n].B
        for u in updates:
            Bk = u.adapter.layers[n].B
            r = min(Bk.shape[1], Bg.shape[1])
            # ‖Q_kᵀQ_g‖_F² = tr(P_k P_g)
            overlaps.append(min(1.0, math.sqrt(max(0.0, float(torch.trace(projector(Bk) @ projector(Bg))))) / math.sqrt(r)))
    n_clients = len(updates)
    pairs = [(i, j) for i in range(n_clients) for j in range(i + 1, n_clients)]
    total_err = math.sqrt(sum(e**2 for e in layer_err.values()))
    return {
        "agg_error": total_err,
        "agg_error_rel": total_err / float(v_ideal.norm()),
        "ideal_norm": float(v_ideal.norm()),
        "global_norm": float(vec(glob).norm()),
        "cancellation": float(v_ideal.norm()) / sum(pk * float(v.norm()) for pk, v in zip(p, v_clients)),
        "cos_client_global": sum(cos(v, v_ideal) for v in v_clients) / n_clients,
        "cos_pairwise": sum(cos(v_clients[i], v_clients[j]) for i, j in pairs) / len(pairs) if pairs else None,
        "basis_overlap": sum(overlaps) / len(overlaps),
        "layer_err": layer_err,
        "layer_ideal": layer_ideal,
    }


def assert_matches_dense(diag, ref):
    d = diag.to_dict()
    for key in ("agg_error", "agg_error_rel", "ideal_norm", "global_norm", "cancellation", "cos_client_global",
                "cos_pairwise", "basis_overlap"):
        if ref[key] is None:
            assert d[key] is None, key
        else:
            assert d[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    for name, err in ref["layer_err"].items():
        assert d["per_layer"][name]["agg_error"] == pytest.approx(err, rel=1e-6, abs=1e-9)
        assert d["per_layer"][name]["ideal_norm"] == pytest.approx(ref["layer_ideal"][name], rel=1e-6, abs=1e-9)


def random_round(g, shapes, client_ranks, global_ranks, base_ranks, weights):
    updates = [ClientUpdate(client_id=f"c{k}", adapter=rand_adapter(shapes, ranks, g), num_samples=k + 1,
                            scaling=0.5 + k) for k, ranks in enumerate(client_ranks)]
    base = None
    if base_ranks is not None:
        base = {f"l{i}": LoRAPair(torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64))
                for i, ((d_out, d_in), r) in enumerate(zip(shapes, base_ranks)) if r > 0}
    state = GlobalState(adapter=rand_adapter(shapes, global_ranks, g), round=1, scaling=1.7, base_delta=base)
    return updates, weights, state


def test_matches_dense_with_base_delta_and_heterogeneous_ranks():
    g = torch.Generator().manual_seed(3)
    shapes = [(40, 24), (17, 33), (30, 30)]
    client_ranks = [[2, 3, 4], [5, 1, 4], [3, 3, 8], [1, 6, 2]]
    updates, w, state = random_round(g, shapes, client_ranks, global_ranks=[4, 2, 6], base_ranks=[3, 0, 5],
                                     weights=[0.1, 2.0, 1.0, 0.5])
    diag = round_diagnostics(updates, w, state)
    assert_matches_dense(diag, dense_reference(updates, w, state))
    assert diag.basis_overlap_pairs == len(shapes) * len(client_ranks)
    assert diag.rotation_size_mean is None and "rotation_size_mean" not in diag.to_dict()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    shapes=st.lists(st.tuples(st.integers(2, 20), st.integers(2, 20)), min_size=1, max_size=3),
    ranks=st.lists(st.integers(1, 6), min_size=24, max_size=24),
    raw_w=st.lists(st.floats(0.05, 10.0), min_size=5, max_size=5),
    with_base=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_dense(n, shapes, ranks, raw_w, with_base, seed):
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    cap = [min(s) for s in shapes]
    rk = iter(ranks)
    client_ranks = [[min(next(rk), c) for c in cap] for _ in range(n)]
    global_ranks = [min(next(rk), c) for c in cap]
    base_ranks = [min(next(rk), c) for c in cap] if with_base else None
    updates, w, state = random_round(g, shapes, client_ranks, global_ranks, base_ranks, raw_w[:n])
    assert_matches_dense(round_diagnostics(updates, w, state), dense_reference(updates, w, state))
    assert len(round_diagnostics(updates, w, state).per_layer) == L


def rotated_round(rotate_back: bool, n=4, d=24, r=4, seed=0):
    """Clients that all hold the same update in different rotated gauges: (B0 R_k, R_kᵀ A0)."""
    g = torch.Generator().manual_seed(seed)
    shared = rand_adapter([(d, d), (d, d)], [r, r], g)
    strategy = get_strategy("fedit")
    state = strategy.init_state(shared, alpha=8.0)
    s = strategy.scaling(ClientContext(client_id=0, round=0, alpha=8.0), r)
    updates = []
    for k in range(n):
        layers = {}
        for name, (A, B) in shared:
            R = haar_rotation(r, g, dtype=F64)
            layers[name] = LoRAPair(R.T @ A, B @ R)
            if rotate_back:  # undo the gauge: the client's factors are the shared ones again
                layers[name] = LoRAPair(R @ layers[name].A, layers[name].B @ R.T)
        updates.append(ClientUpdate(client_id=k, adapter=Adapter(layers), num_samples=10, scaling=s))
    new = strategy.aggregate(updates, state)
    return updates, strategy.weights(updates), new


def test_fedit_error_from_rotated_gauges_and_none_once_undone():
    rotated = round_diagnostics(*rotated_round(rotate_back=False))
    aligned = round_diagnostics(*rotated_round(rotate_back=True))
    # every client holds the same product, so the ideal aggregate is that product in both cases
    assert rotated.ideal_norm == pytest.approx(aligned.ideal_norm, rel=1e-10)
    assert rotated.agg_error_rel > 0.3
    assert aligned.agg_error_rel < 1e-7
    # products are gauge-invariant: cancellation and cosines see identical clients either way
    for diag in (rotated, aligned):
        assert diag.cancellation == pytest.approx(1.0, abs=1e-9)
        assert diag.cos_client_global == pytest.approx(1.0, abs=1e-9)
        assert diag.cos_pairwise == pytest.approx(1.0, abs=1e-9)
        # B_k R spans B_k's subspace; FedAvg of B_k R_k mixes only vectors of that subspace too
        assert diag.basis_overlap == pytest.approx(1.0, abs=1e-9)


def test_identical_clients_cancellation_and_cosines_one():
    g = torch.Generator().manual_seed(1)
    ad = rand_adapter([(12, 9), (7, 7)], [3, 2], g)
    updates = [ClientUpdate(client_id=k, adapter=ad.clone(), scaling=2.0) for k in range(3)]
    state = GlobalState(adapter=rand_adapter([(12, 9), (7, 7)], [3, 2], g), scaling=1.0)
    diag = round_diagnostics(updates, [1, 2, 3], state)
    assert diag.cancellation == pytest.approx(1.0, abs=1e-12)
    assert diag.cos_client_global == pytest.approx(1.0, abs=1e-12)
    assert diag.cos_pairwise == pytest.approx(1.0, abs=1e-12)


def test_opposite_clients_cancel():
    g = torch.Generator().manual_seed(2)
    ad = rand_adapter([(10, 8)], [2], g)
    neg = ad.map(lambda n, p: LoRAPair(p.A, -p.B))
    updates = [ClientUpdate(client_id=0, adapter=ad), ClientUpdate(client_id=1, adapter=neg)]
    diag = round_diagnostics(updates, [1, 1], GlobalState(adapter=ad.clone()))
    assert diag.cancellation == pytest.approx(0.0, abs=1e-12)
    assert diag.cos_pairwise == pytest.approx(-1.0, abs=1e-12)
    assert diag.ideal_norm == pytest.approx(0.0, abs=1e-12)
    assert diag.agg_error_rel is None and diag.cos_client_global is None  # zero ideal: undefined


def test_basis_overlap_same_subspace_and_different():
    g = torch.Generator().manual_seed(4)
    d, r = 30, 3
    Bg = torch.randn(d, r, generator=g, dtype=F64)
    A = torch.randn(r, d, generator=g, dtype=F64)
    state = GlobalState(adapter=Adapter({"l": LoRAPair(A, Bg)}))
    M = torch.randn(r, r, generator=g, dtype=F64) + 3 * torch.eye(r, dtype=F64)  # invertible mix
    same = [ClientUpdate(client_id=0, adapter=Adapter({"l": LoRAPair(A, Bg @ M)})),
            ClientUpdate(client_id=1, adapter=Adapter({"l": LoRAPair(A[:2], Bg[:, :2])}))]  # a sub-subspace, rank 2
    assert round_diagnostics(same, [1, 1], state).basis_overlap == pytest.approx(1.0, abs=1e-12)
    other = [ClientUpdate(client_id=0, adapter=Adapter({"l": LoRAPair(A, torch.randn(d, r, generator=g, dtype=F64))}))]
    assert round_diagnostics(other, [1], state).basis_overlap < 0.9


def test_basis_overlap_skips_zero_b():
    g = torch.Generator().manual_seed(5)
    ad = rand_adapter([(9, 9), (9, 9)], [2, 2], g)
    zero_b = ad.map(lambda n, p: LoRAPair(p.A, torch.zeros_like(p.B)))
    # round 0 (or FLoRA's reset): the global B is zero, no pair has two subspaces
    diag = round_diagnostics([ClientUpdate(client_id=0, adapter=ad)], [1], GlobalState(adapter=zero_b))
    assert diag.basis_overlap is None and diag.basis_overlap_pairs == 0
    assert all(v["basis_overlap"] is None for v in diag.per_layer.values())
    # one zero client: only the other client's pairs count
    updates = [ClientUpdate(client_id=0, adapter=zero_b), ClientUpdate(client_id=1, adapter=ad)]
    diag = round_diagnostics(updates, [1, 1], GlobalState(adapter=ad.clone()))
    assert diag.basis_overlap_pairs == 2 and diag.basis_overlap == pytest.approx(1.0)


def test_rotation_size_from_fedrot_info():
    g = torch.Generator().manual_seed(6)
    strategy = get_strategy("fedrot", lam=1.0)
    state = strategy.init_state(rand_adapter([(16, 12), (16, 16)], [3, 3], g))
    updates = []
    for k in range(3):
        ctx = ClientContext(client_id=k, round=1)
        trained = rand_adapter([(16, 12), (16, 16)], [3, 3], g)
        ad, info = strategy.before_upload(trained, state.adapter, ctx)
        updates.append(ClientUpdate(client_id=k, adapter=ad, info=info))
    sizes = [v for u in updates for v in u.info["rotation_size"].values()]
    assert len(sizes) == 6 and max(sizes) > 0
    diag = round_diagnostics(updates, [1, 1, 1], strategy.aggregate(updates, state))
    assert diag.rotation_size_mean == pytest.approx(sum(sizes) / 6)
    assert diag.rotation_size_max == pytest.approx(max(sizes))
    assert diag.to_dict()["rotation_size_max"] == pytest.approx(max(sizes))
    bad = [ClientUpdate(client_id="x", adapter=updates[0].adapter, info={"rotation_size": 0.3})]
    with pytest.raises(AggregationInputError, match="client x"):
        rotation_sizes(bad)


def test_fedrot_guard_reports_the_layers_it_left_unrotated_and_the_round_counts_them():
    """A client a small step from a reference whose B is tiny (the first rounds): aligning B moves
    the pair away, so the guard sends those layers unrotated, with the same product as unguarded."""
    g = torch.Generator().manual_seed(9)
    ref = rand_adapter([(16, 12), (16, 16)], [3, 3], g).map(lambda n, p: LoRAPair(p.A, 1e-4 * p.B))
    plain, guarded = get_strategy("fedrot", lam=1.0, align="B"), get_strategy("fedrot", lam=1.0, align="B", guard=True)
    state = guarded.init_state(ref)
    updates, unguarded_sizes = [], []
    for k in range(3):
        trained = ref.map(lambda n, p: LoRAPair(p.A + 1e-3 * torch.randn(p.A.shape, generator=g, dtype=F64),
                                                p.B + 1e-3 * torch.randn(p.B.shape, generator=g, dtype=F64)))
        ctx = ClientContext(client_id=k, round=2)
        _, plain_info = plain.before_upload(trained, state.adapter, ctx)
        ad, info = guarded.before_upload(trained, state.adapter, ctx)
        unguarded_sizes += plain_info["rotation_size"].values()
        assert sorted(info["guarded"]) == sorted(info["rotation_size"])  # every layer was reset ...
        assert all(v == 0.0 for v in info["rotation_size"].values())
        for name, pair in ad.layers.items():  # ... so the client sends what it trained
            assert torch.equal(pair.A, trained.layers[name].A) and torch.equal(pair.B, trained.layers[name].B)
        updates.append(ClientUpdate(client_id=k, adapter=ad, info=info))
    assert min(unguarded_sizes) > 0.1  # without the guard every layer turns by noise
    diag = round_diagnostics(updates, [1, 1, 1], guarded.aggregate(updates, state))
    assert diag.guarded_fraction == 1.0 and diag.to_dict()["guarded_fraction"] == 1.0
    with pytest.raises(Exception, match="guard=true needs gauge='procrustes'"):
        get_strategy("fedrot", guard=True, gauge="random")
    with pytest.raises(Exception, match="expected true or false"):
        get_strategy("fedrot", guard="yes")


def test_to_dict_is_json_friendly():
    import json

    updates, w, state = random_round(torch.Generator().manual_seed(7), [(8, 6)], [[2], [3]], [2], [1], [1, 1])
    d = round_diagnostics(updates, w, state).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d["per_layer"]["l0"]) == {"agg_error", "agg_error_rel", "ideal_norm", "global_norm", "basis_overlap"}


def test_bad_inputs_name_the_client_or_layer():
    g = torch.Generator().manual_seed(8)
    updates, w, state = random_round(g, [(8, 6), (5, 5)], [[2, 2], [2, 2]], [2, 2], None, [1, 1])
    with pytest.raises(AggregationInputError, match="weights for 2"):
        round_diagnostics(updates, [1], state)
    with pytest.raises(AggregationInputError, match="client c1"):
        round_diagnostics(updates, [1, -1], state)
    short = Adapter({"l0": updates[1].adapter.layers["l0"]})
    with pytest.raises(AggregationInputError, match="client c1"):
        round_diagnostics([updates[0], ClientUpdate(client_id="c1", adapter=short)], w, state)
    state.base_delta = {"nope": LoRAPair(torch.zeros(1, 6, dtype=F64), torch.zeros(8, 1, dtype=F64))}
    with pytest.raises(AggregationInputError, match="'nope'"):
        round_diagnostics(updates, w, state)


@pytest.mark.parametrize("name", ["fedit", "fedrot"])
def test_bytes_match_hand_count(name):
    g = torch.Generator().manual_seed(9)
    shapes, r = [(32, 16), (24, 24), (8, 40)], 4
    head = {"classifier.weight": torch.zeros(3, 16), "classifier.bias": torch.zeros(3)}
    strategy = get_strategy(name)
    state = strategy.init_state(rand_adapter(shapes, [r] * 3, g, dtype=torch.float32, extras=head))
    clients = [rand_adapter(shapes, [r] * 3, g, dtype=torch.float32, extras=head) for _ in range(3)]
    per_client = sum(r * (d_in + d_out) * 4 for d_out, d_in in shapes) + (3 * 16 + 3) * 4
    out = communication_bytes(strategy, state, clients)
    assert out["bytes_up"] == {str(k): per_client for k in range(3)}
    assert out["bytes_down"] == {str(k): per_client for k in range(3)}
    assert out["bytes_up_total"] == out["bytes_down_total"] == 3 * per_client
    assert out["bytes_up_mean"] == per_client
    # a base-weight change travels down too
    state.base_delta = {"l0": LoRAPair(torch.zeros(2, 16), torch.zeros(32, 2))}
    updates = [ClientUpdate(client_id=f"c{k}", adapter=a) for k, a in enumerate(clients)]
    assert communication_bytes(strategy, state, updates)["bytes_down"]["c0"] == per_client + 2 * (16 + 32) * 4


def test_bytes_rejects_duplicate_clients():
    g = torch.Generator().manual_seed(10)
    strategy = get_strategy("fedit")
    ad = rand_adapter([(8, 8)], [2], g, dtype=torch.float32)
    state = strategy.init_state(ad)
    with pytest.raises(AggregationInputError, match="client 7: appears twice"):
        communication_bytes(strategy, state, [ClientUpdate(client_id=7, adapter=ad)] * 2)


def test_personalised_flag():
    assert not keeps_personal_state(get_strategy("fedit")) and not keeps_personal_state(get_strategy("fedrot"))
    assert keeps_personal_state(get_strategy("fedsa"))
    updates, w, state = random_round(torch.Generator().manual_seed(11), [(8, 6)], [[2], [2]], [2], None, [1, 1])
    flagged = round_diagnostics(updates, w, state, personalised=True)
    assert flagged.to_dict()["personalised"] is True
    assert flagged.agg_error == round_diagnostics(updates, w, state).agg_error  # same formula either way


def test_every_strategy_declares_whether_its_clients_keep_a_personal_state():
    """The declared ``personalised`` flag agrees with what ``personal_state`` returns, for every
    registered strategy (the engines and the diagnostics read the flag, never the method)."""
    from fedlora.strategies.registry import strategy_names

    g = torch.Generator().manual_seed(3)
    for name in strategy_names():
        strategy = get_strategy(name)
        kept = strategy.personal_state(rand_adapter([(8, 6)], [2], g, dtype=torch.float32))
        assert strategy.personalised == (kept is not None), name
    assert {n for n in strategy_names() if get_strategy(n).personalised} == {"fedsa", "sfed"}


def test_live_factors_are_not_tracked():
    g = torch.Generator().manual_seed(12)
    updates, w, state = random_round(g, [(8, 6)], [[2], [3]], [2], None, [1, 1])
    live = updates[0].adapter.map(lambda n, p: LoRAPair(p.A.clone().requires_grad_(), p.B.clone().requires_grad_()))
    tracked = [ClientUpdate(client_id="live", adapter=live, scaling=updates[0].scaling), updates[1]]
    assert round_diagnostics(tracked, w, state).to_dict() == round_diagnostics(updates, w, state).to_dict()
