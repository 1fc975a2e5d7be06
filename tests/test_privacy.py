"""Differential privacy: the clip, the noise, the accounting and both modes end to end.

Independent references: the clip against a dense computation, the noise's std against its
configured value over many draws, ε against dp-accounting's own composition and published
values, Opacus's clipped per-example gradients against a loop of one-example backward passes on
the real MiniLM and SmolLM2, and σ = 0 runs against the non-private runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sim_tiny import tiny_fixture, tiny_overrides

from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.factors import Adapter, LoRAPair
from fedlora.sim import run

pytest.importorskip("dp_accounting")
QUIET = {"log": lambda s: None}

tiny = tiny_fixture("privacy")


def tiny_cfg(tiny, name, **extra):
    root, model, data = tiny
    return load_config(None, tiny_overrides(root / "runs", model, data, run__name=f'"{name}"', **extra))


def adapter(seed, layers=3, d=6, r=2, extras=True):
    g = torch.Generator().manual_seed(seed)
    return Adapter({f"l{i}": LoRAPair(torch.randn(r, d, generator=g), torch.randn(d, r, generator=g))
                    for i in range(layers)},
                   {"head.weight": torch.randn(2, d, generator=g)} if extras else {})


def flat(a: Adapter, parts) -> torch.Tensor:
    out = []
    for name in sorted(a.layers):
        if "A" in parts:
            out.append(a.layers[name].A.flatten())
        if "B" in parts:
            out.append(a.layers[name].B.flatten())
    if "extras" in parts:
        out += [a.extras[k].flatten() for k in sorted(a.extras)]
    return torch.cat(out).double()


# ---- the mechanism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [frozenset({"A", "B", "extras"}), frozenset({"B"}), frozenset({"A", "extras"})])
def test_a_clipped_update_is_the_dense_update_scaled_to_norm_C(parts):
    from fedlora.privacy.clipping import clip_update

    start, upload = adapter(0), adapter(1)
    delta = flat(upload, parts) - flat(start, parts)
    for clip in (0.5 * float(delta.norm()), 2.0 * float(delta.norm())):
        clipped, norm = clip_update(upload, start, parts, clip)
        got = flat(clipped, parts) - flat(start, parts)
        assert norm == pytest.approx(float(delta.norm()), rel=1e-12)
        want = delta * min(1.0, clip / float(delta.norm()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert float(got.norm()) <= clip * (1 + 1e-6)
        other = {"A", "B", "extras"} - parts  # what is not uploaded is the upload's, untouched
        if other:
            torch.testing.assert_close(flat(clipped, other), flat(upload, other), rtol=0, atol=0)


def test_every_clients_upload_is_clipped_to_C(tiny):
    from fedlora.privacy.clipping import update_norm
    from fedlora.runtime.federation import client_context, prepare, start_state
    from fedlora.runtime.training import client_round

    clip = 0.01
    for strategy in ("fedit", "fedsa", "fedrot"):
        cfg = tiny_cfg(tiny, "clip", privacy__mode='"client"', privacy__clip=str(clip), train__lr="0.05",
                       privacy__noise_multiplier="1", strategy__name=f'"{strategy}"')
        fed = prepare(cfg, log=lambda s: None)
        state = start_state(fed, lambda s: None)
        parts = fed.strategy.upload_parts(0)
        for k in range(fed.num_clients):
            ctx = client_context(fed, k, 0, fed.num_clients)
            _, upload, _, info = client_round(fed, state, None, ctx)
            start = fed.strategy.client_start(state, None, ctx)
            assert info["update_norm"] > clip  # the clip binds
            assert update_norm(upload, start, parts) <= clip * (1 + 1e-5), (strategy, k)


def test_the_servers_noise_has_the_configured_std():
    from fedlora.privacy.clipping import noised_mean

    big = Adapter({"l": LoRAPair(torch.zeros(40, 500), torch.zeros(500, 40))}, {"h": torch.zeros(10, 1000)})
    sigma, clip, denominator = 1.7, 0.3, 4.0
    g = torch.Generator().manual_seed(7)
    out = noised_mean([], big, frozenset({"A", "B", "extras"}), clip=clip, sigma=sigma, denominator=denominator,
                      generator=g)
    values = flat(out, {"A", "B", "extras"})  # 50,000 draws of N(0, (σC/denominator)²)
    want = sigma * clip / denominator
    # the std of a sample std of n normals is std/√(2n) ≈ 0.32% here: 2% is over 6 of those
    assert float(values.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(values.mean())) < 4 * want / math.sqrt(values.numel())
    again = noised_mean([], big, frozenset({"B"}), clip=clip, sigma=sigma, denominator=denominator,
                        generator=torch.Generator().manual_seed(7))
    assert float(flat(again, {"A"}).abs().max()) == 0.0  # parts not uploaded get no noise


def test_the_release_is_the_mean_of_the_clipped_updates_over_the_fixed_denominator():
    from fedlora.privacy.clipping import noised_mean

    start = adapter(0)
    uploads = [adapter(s) for s in (1, 2, 3)]
    parts = frozenset({"A", "B", "extras"})
    clip = 1.5
    out = noised_mean(uploads, start, parts, clip=clip, sigma=0.0, denominator=5.0, generator=torch.Generator())
    deltas = [flat(u, parts) - flat(start, parts) for u in uploads]
    want = flat(start, parts) + sum(d * min(1, clip / float(d.norm())) for d in deltas) / 5.0
    torch.testing.assert_close(flat(out, parts), want, rtol=1e-5, atol=1e-6)


# ---- σ = 0 and a clip that never binds: the non-private run ------------------------------------------


SUM_STRATEGIES = ["fedit", "ffa", "fedsa", "sfed", "rolora", "fedsvd", "fedrot"]


@pytest.mark.parametrize("strategy", SUM_STRATEGIES)
def test_client_dp_with_no_noise_and_no_clip_is_the_uniform_non_private_run(tiny, strategy):
    plain = run(tiny_cfg(tiny, f"plain-{strategy}", strategy__name=f'"{strategy}"',
                         strategy__options='{weighting = "uniform"}'), **QUIET)
    dp = run(tiny_cfg(tiny, f"dp0-{strategy}", strategy__name=f'"{strategy}"', privacy__mode='"client"',
                      privacy__clip="1e30", privacy__noise_multiplier="0"), **QUIET)
    # the model each run ends with: every layer's ΔW = B·A and the head. (FedSVD's factors are the
    # SVD of B̄A, whose singular vectors amplify float32 round-off in B̄ beyond 1e-5 even between
    # two non-private runs that sum in another order; their product is stable.)
    a, b = (Adapter.from_state_dict(load_file(Path(r["adapter"]) / "adapter_model.safetensors")) for r in (plain, dp))
    assert set(a.layers) == set(b.layers) and set(a.extras) == set(b.extras)
    for name in a.layers:
        wa, wb = (x.layers[name].B.double() @ x.layers[name].A.double() for x in (a, b))
        assert float((wa - wb).norm()) <= 1e-5 * max(float(wa.norm()), 1e-12), name
    for k in a.extras:
        assert float((a.extras[k] - b.extras[k]).norm()) <= 1e-5 * float(a.extras[k].norm()), k
    assert dp["privacy"]["epsilon"] is None and dp["privacy"]["noise_multiplier"] == 0  # σ = 0: ε = ∞


def test_noise_changes_the_result(tiny):
    """The control for the test above: σ > 0 does move the global adapter."""
    a = run(tiny_cfg(tiny, "noise-0", privacy__mode='"client"', privacy__noise_multiplier="0"), **QUIET)
    b = run(tiny_cfg(tiny, "noise-1", privacy__mode='"client"', privacy__noise_multiplier="1"), **QUIET)
    ta = load_file(Path(a["adapter"]) / "adapter_model.safetensors")
    tb = load_file(Path(b["adapter"]) / "adapter_model.safetensors")
    assert any(not torch.allclose(ta[k], tb[k]) for k in ta)


# ---- accounting -------------------------------------------------------------------------------------


def direct_epsilon(q, sigma, count, delta, orders=None):
    """dp-accounting's own composition, written out here."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders) if orders else RdpAccountant()
    inner = dp_accounting.GaussianDpEvent(sigma)
    event = inner if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, inner)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return acc.get_epsilon(delta)


def test_published_dp_sgd_values():
    """fedlora's events against published ε: Opacus's compute_dp_sgd_privacy documentation, q = 0.01,
    σ = 1.0, 300 steps, δ = 1e-5 at RDP orders (2, 5, 10, 20, 100): ε = 2.39; and TF Privacy's
    classic RDP → (ε, δ) conversion for MNIST (60,000 examples, batch 256, σ = 1.12, 60 epochs,
    orders 10, 20, 100): ε = 2.95. At dp-accounting's default orders (a finer grid, which fedlora
    uses) the first is 1.45: a tighter bound of the same mechanism, never a looser one."""
    from dp_accounting.rdp import RdpAccountant

    from fedlora.privacy.accounting import epsilon, sampled_gaussian

    acc = RdpAccountant([2, 5, 10, 20, 100])
    acc.compose(sampled_gaussian(0.01, 1.0, 300))
    assert acc.get_epsilon(1e-5) == pytest.approx(2.39, abs=0.005)
    mine = epsilon(sampled_gaussian(0.01, 1.0, 300), 1e-5)
    assert mine <= 2.39 and mine == pytest.approx(direct_epsilon(0.01, 1.0, 300, 1e-5), rel=1e-12)
    orders = [10, 20, 100]
    acc = RdpAccountant(orders)
    acc.compose(sampled_gaussian(256 / 60000, 1.12, 60 * 60000 // 256))
    classic = min(r + math.log(1e5) / (o - 1) for r, o in zip(acc._rdp, orders))
    assert classic == pytest.approx(2.95, abs=0.015)


def test_client_level_epsilon_is_dp_accountings_for_the_same_events(tiny):
    summary = run(tiny_cfg(tiny, "eps-client", privacy__mode='"client"', privacy__noise_multiplier="1.3",
                           partition__num_clients="6", train__clients_per_round="2", train__rounds="3"), **QUIET)
    rows = [json.loads(line) for line in open(Path(summary["run_dir"]) / "metrics.jsonl")]
    for t, row in enumerate(rows):
        assert row["privacy"]["epsilon"] == pytest.approx(direct_epsilon(2 / 6, 1.3, t + 1, 1e-5), rel=1e-9)
    assert summary["privacy"]["epsilon"] == rows[-1]["privacy"]["epsilon"]
    assert "Poisson" in summary["privacy"]["sampling"]
    full = run(tiny_cfg(tiny, "eps-full", privacy__mode='"client"', privacy__noise_multiplier="1.3"), **QUIET)
    assert full["privacy"]["epsilon"] == pytest.approx(direct_epsilon(1.0, 1.3, 2, 1e-5), rel=1e-9)


def test_sample_level_epsilon_is_the_worst_clients_own_steps(tiny):
    summary = run(tiny_cfg(tiny, "eps-sample", privacy__mode='"sample"', privacy__noise_multiplier="1.1",
                           partition__method='"quantity_skew"', partition__num_clients="4",
                           train__clients_per_round="2", train__rounds="3"), **QUIET)
    rows = [json.loads(line) for line in open(Path(summary["run_dir"]) / "metrics.jsonl")]
    part = json.loads((Path(summary["run_dir"]) / "partition.json").read_text())
    ckpt = torch.load(Path(summary["run_dir"]) / "checkpoint.pt", weights_only=False)
    sizes = [len(ix) for ix in ckpt["extra"]["client_train"]]
    assert len(sizes) == len(part["sizes"]) == 4
    steps = {k: 0 for k in range(4)}
    for row in rows:
        for k in row["clients"]:
            steps[k] += 2  # train.local_steps
        want = max(direct_epsilon(8 / sizes[k], 1.1, n, 1e-5) for k, n in steps.items() if n)
        assert row["privacy"]["epsilon"] == pytest.approx(want, rel=1e-9)


def test_target_epsilon_calibrates_sigma_and_max_epsilon_stops_the_run(tiny):
    summary = run(tiny_cfg(tiny, "target", privacy__mode='"client"', privacy__target_epsilon="5",
                           train__rounds="3"), **QUIET)
    sigma = summary["privacy"]["noise_multiplier"]
    assert summary["privacy"]["epsilon"] == pytest.approx(5.0, rel=2e-3) and summary["privacy"]["epsilon"] <= 5.0
    assert direct_epsilon(1.0, sigma, 3, 1e-5) == pytest.approx(summary["privacy"]["epsilon"], rel=1e-9)
    # a budget that allows two of the three rounds at this σ
    budget = (direct_epsilon(1.0, 1.0, 2, 1e-5) + direct_epsilon(1.0, 1.0, 3, 1e-5)) / 2
    stopped = run(tiny_cfg(tiny, "budget", privacy__mode='"client"', privacy__noise_multiplier="1.0",
                           train__rounds="3", privacy__max_epsilon=str(budget)), **QUIET)
    assert stopped["rounds_completed"] == 2 and stopped["status"].startswith("stopped: privacy budget")
    assert stopped["privacy"]["epsilon"] <= budget


def test_poisson_client_sampling():
    from types import SimpleNamespace

    from fedlora.runtime.federation import sample_clients

    cfg = SimpleNamespace(clients_per_round=10, client_fraction=1.0)
    counts = [len(sample_clients(3, t, 100, cfg, poisson=True)) for t in range(400)]
    assert sample_clients(3, 5, 100, cfg, poisson=True) == sample_clients(3, 5, 100, cfg, poisson=True)
    assert len(set(counts)) > 5  # the count varies
    assert sum(counts) / len(counts) == pytest.approx(10, rel=0.05)  # its mean is q·N (sd of the mean ≈ 0.15)
    assert all(len(sample_clients(3, t, 100, cfg)) == 10 for t in range(20))  # without DP: exactly 10


# ---- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, match", [
    ("privacy.mode=\"central\"", "privacy.mode"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
    ("privacy.delta=1", r"privacy.delta = 1\.0: must be in \(0, 1\)"),
    ("privacy.clip=0", "privacy.clip"),
    ("privacy.clip_quantile=1", "privacy.clip_quantile"),
    ("privacy.count_noise=-1", "privacy.count_noise"),
])
def test_bad_privacy_settings_name_the_key(setting, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["privacy.mode=\"client\"", setting])


# ---- adaptive clipping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("start, factor", [(1e3, math.exp(-0.2 * (1 - 0.5))), (1e-7, math.exp(0.2 * 0.5))])
def test_adaptive_clip_follows_the_geometric_rule(tiny, start, factor):
    """Every update within C (C huge): b̃ = 1 and C shrinks by exp(−η(1 − γ)) each round; none within
    (C tiny): b̃ = 0 and C grows by exp(ηγ). The count noise is made negligible to see the rule."""
    summary = run(tiny_cfg(tiny, f"adaptive-{start}", privacy__mode='"client"', privacy__adaptive_clip="true",
                           privacy__clip=str(start), privacy__count_noise="1e-9", train__rounds="3"), **QUIET)
    rows = [json.loads(line) for line in open(Path(summary["run_dir"]) / "metrics.jsonl")]
    clip = start
    for row in rows:
        assert row["privacy"]["clip"] == pytest.approx(clip, rel=1e-9)
        assert row["privacy"]["next_clip"] == pytest.approx(clip * factor, rel=1e-6)
        clip = row["privacy"]["next_clip"]


def test_adaptive_clip_keeps_the_total_noise_multiplier(tiny):
    from fedlora.runtime.federation import prepare
    from fedlora.runtime.privacy import RunPrivacy

    fed = prepare(tiny_cfg(tiny, "adaptive-sigma", privacy__mode='"client"', privacy__adaptive_clip="true",
                           privacy__noise_multiplier="1.5", privacy__count_noise="2"), log=lambda s: None)
    dp = RunPrivacy.open(fed, [])
    assert dp.update_sigma > 1.5
    assert dp.update_sigma ** -2 + (2 * 2.0) ** -2 == pytest.approx(1.5 ** -2, rel=1e-12)
    with pytest.raises(ConfigError, match="count noise σ_b = 0.5 must exceed σ/2 = 0.75"):
        RunPrivacy.open(prepare(tiny_cfg(tiny, "adaptive-bad", privacy__mode='"client"', privacy__adaptive_clip="true",
                                         privacy__noise_multiplier="1.5", privacy__count_noise="0.5"),
                                log=lambda s: None), [])
    with pytest.raises(ConfigError, match="needs privacy.mode = 'client'"):
        tiny_cfg(tiny, "adaptive-sample", privacy__mode='"sample"', privacy__adaptive_clip="true")


def test_settings_that_override_each_other_and_strategies_without_a_mechanism_are_refused():
    with pytest.raises(ConfigError, match="noise_multiplier = 1.0 and privacy.target_epsilon = 3.0 are both set"):
        load_config(None, ["privacy.mode=\"client\"", "privacy.noise_multiplier=1", "privacy.target_epsilon=3"])
    for name in ("flexlora", "flora", "fedex", "svd", "subspace", "lorafair"):
        with pytest.raises(ConfigError, match=f"strategy '{name}' needs each client's upload"):
            load_config(None, ["privacy.mode=\"client\"", f"strategy.name={name}"])
        load_config(None, ["privacy.mode=\"sample\"", f"strategy.name={name}"])  # DP-SGD: every strategy
    assert load_config(None, ["privacy.mode=\"client\"", "privacy.clip=1e30"]).privacy.clip == 1e30
    with pytest.raises(ConfigError, match="privacy.target_epsilon = 3.0 is set but privacy.mode = 'none'"):
        load_config(None, ["privacy.target_epsilon=3"])


# ---- both engines --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["client", "sample"])
def test_embedded_and_flower_release_the_same_noised_model(tiny, mode):
    from engines import flower_run

    extra = dict(privacy__mode=f'"{mode}"', privacy__noise_multiplier="0.8", strategy__name='"fedsa"')
    a = run(tiny_cfg(tiny, f"emb-{mode}", **extra), **QUIET)
    b = flower_run(tiny_cfg(tiny, f"flw-{mode}", **extra), **QUIET)
    ta = load_file(Path(a["adapter"]) / "adapter_model.safetensors")
    tb = load_file(Path(b["adapter"]) / "adapter_model.safetensors")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    assert a["privacy"]["epsilon"] == b["privacy"]["epsilon"]


# ---- Opacus on real models --------------------------------------------------------------------------------


def clipped_reference(model, params, examples, loss_of, clip):
    """Σ_i clip_C(∇ loss_i) / n by one backward pass per example (no Opacus)."""
    total = [torch.zeros_like(p) for p in params]
    for ex in examples:
        model.zero_grad(set_to_none=True)
        loss_of(model, [ex]).backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / norm)
    return [t / len(examples) for t in total]


def check_opacus_clipping(shared, examples, loss_of, clip):
    from fedlora.privacy.dpsgd import PrivateTraining

    params = shared.set_trainable(frozenset({"A", "B"}), True)
    with torch.no_grad():  # B ≠ 0, so that A has a gradient too
        for key, p in shared.params(shared.active).items():
            if ".lora_B." in key:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    shared.model.train()  # Opacus records activations in training mode only; no dropout, so that the
    for m in shared.model.modules():  # reference and Opacus see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    want = clipped_reference(shared.model, params, examples, loss_of, clip)
    opt = torch.optim.SGD(params, lr=0.0)
    with PrivateTraining(shared.model, opt, sigma=0.0, clip=clip, expected_batch_size=len(examples), seed=0) as pt:
        shared.model.zero_grad(set_to_none=True)
        loss_of(shared.model, examples).backward()
        per_example = torch.stack([g.reshape(len(examples), -1).double().norm(dim=1)
                                   for g in (p.grad_sample for p in params)], dim=1).norm(dim=1)
        assert float(per_example.min()) > clip  # the clip binds for every example
        clipped = per_example * torch.clamp(clip / (per_example + 1e-6), max=1.0)
        assert float(clipped.max()) <= clip * (1 + 1e-6)
        assert pt.optimizer.pre_step()
        for p, w in zip(params, want):
            torch.testing.assert_close(p.grad, w, rtol=1e-3, atol=1e-7)


@pytest.fixture(scope="module")
def catalog():
    from fedlora.assets import AssetError, resolve_model

    try:
        return {name: resolve_model(name) for name in ("minilm", "smollm2-135m")}
    except AssetError as e:
        pytest.skip(f"catalog assets unavailable: {e}")


@pytest.mark.slow
def test_opacus_clips_per_example_gradients_on_real_minilm(catalog):
    pytest.importorskip("opacus")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.runtime.model import SharedModel

    tok = AutoTokenizer.from_pretrained(catalog["minilm"])
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(catalog["minilm"], num_labels=2)
    shared = SharedModel(base, task_type="SEQ_CLS", rank=4, alpha=8, dropout=0.0, target_modules=["query", "value"])
    examples = [("area man wins the lottery twice", 1), ("senate passes the budget bill", 0),
                ("nation's dogs demand better treats", 1), ("rain expected in the north", 0)]

    def loss_of(model, batch):
        x = tok([t for t, _ in batch], padding=True, return_tensors="pt")
        y = torch.tensor([label for _, label in batch])
        return torch.nn.functional.cross_entropy(model(**x).logits, y)

    check_opacus_clipping(shared, examples, loss_of, clip=1e-3)


@pytest.mark.slow
def test_opacus_clips_per_example_gradients_on_real_smollm2(catalog):
    pytest.importorskip("opacus")
    from transformers import AutoModelForCausalLM

    from fedlora.runtime.model import SharedModel

    base = AutoModelForCausalLM.from_pretrained(catalog["smollm2-135m"])
    shared = SharedModel(base, task_type="CAUSAL_LM", rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(10, 1000, (12,), generator=g) for _ in range(3)]

    def loss_of(model, batch):
        ids = torch.stack(batch)
        logits = model(input_ids=ids).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                      reduction="none").reshape(len(batch), -1)
        return per_token.mean(dim=1).mean()  # the mean over examples of each example's mean

    check_opacus_clipping(shared, examples, loss_of, clip=1e-3)
