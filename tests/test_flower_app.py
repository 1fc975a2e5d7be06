"""The fedlora ServerApp and ClientApp driven through real Flower Messages and per-node Contexts,
in process (no Ray, no SuperLink): base-weight changes and partial downloads reach the nodes,
faulty replies are dropped, too few replies fail the round, SecAgg+ refuses incompatible strategies."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from fedlora.errors import ConfigError  # noqa: E402
from fedlora.factors import Adapter, LoRAPair  # noqa: E402
from fedlora.flower import records as rec  # noqa: E402
from fedlora.flower.clientapp import make_client_app  # noqa: E402
from fedlora.flower.inprocess import InProcessGrid  # noqa: E402
from fedlora.flower.serverapp import FlowerOptions, FlowerServer, RoundFailedError  # noqa: E402
from flower_common import assert_close_adapters, cfg_for, engine_run, tiny  # noqa: E402,F401


def flower_run(cfg, faults=None, drop=(), **options):
    opts = FlowerOptions(**{"min_replies": 1, "round_timeout": 30.0, "node_wait": 1.0, **options})
    server = FlowerServer(cfg, opts, log=lambda s: None)
    server.run(InProcessGrid(make_client_app(faults), cfg.partition.num_clients, drop=drop))
    return server


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedex", "fedsa"])
def test_partial_participation_matches_the_engine(tiny, strategy):
    """2 of 3 clients per round, 3 rounds: FedEx's base changes reach nodes that missed a round
    (several nodes share one cached model), FedSA's partial download uses each node's cached A/B."""
    extra = dict(strategy__name=f'"{strategy}"', train__rounds=3, train__clients_per_round=2)
    want, erows = engine_run(cfg_for(tiny, f"engine-{strategy}", **extra))
    server = flower_run(cfg_for(tiny, f"flower-{strategy}", **extra))
    assert [r["clients"] for r in server.rows] == [r["clients"] for r in erows]
    assert len({tuple(r["clients"]) for r in erows}) > 1  # some node really missed a round
    assert_close_adapters(server.state.adapter, want.adapter)
    for row, erow in zip(server.rows, erows):
        assert row["train_loss"] == pytest.approx(erow["train_loss"], rel=1e-4)
        assert row["bytes_up"] == erow["bytes_up"] == row["bytes_up_sent"]
        assert row["bytes_down"] == erow["bytes_down"]
        assert row["eval"]["global"]["accuracy"] == pytest.approx(erow["eval"]["global"]["accuracy"])


@pytest.mark.slow
def test_a_nan_reply_is_dropped_like_a_failed_client_in_the_engine(tiny):
    server = flower_run(cfg_for(tiny, "flower-nan"), faults={2: "nan"})
    for row in server.rows:
        assert row["clients"] == [0, 1, 2] and [f["client"] for f in row["failed"]] == [2]
        assert "NaN" in row["failed"][0]["error"] and "client 2" in row["failed"][0]["error"]

    def loss_fn(model, batch, client):  # the engine loses client 2 every round (one forward: same dropout draws)
        if client == 2:
            return torch.tensor(float("nan"))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    want, _ = engine_run(cfg_for(tiny, "engine-nan"), loss_fn=loss_fn)
    assert_close_adapters(server.state.adapter, want.adapter)


def test_too_few_valid_replies_fail_the_round_with_the_reasons(tiny):
    with pytest.raises(RoundFailedError, match=r"round 1: 1 valid replies of 3 sampled, fewer than the minimum 2"
                       r"; failures: client 1: invalid reply: .*rank mismatch.*; client 2: invalid reply: .*NaN"):
        flower_run(cfg_for(tiny, "flower-few"), faults={1: "shape", 2: "nan"}, min_replies=2)


def test_a_node_that_never_answers_does_not_stop_the_round(tiny):
    server = flower_run(cfg_for(tiny, "flower-drop", train__rounds=1), drop=[1], round_timeout=1.0)
    (row,) = server.rows
    assert row["failed"] == [{"client": 1, "error": "no reply within the round timeout (1 s)"}]
    assert list(row["client_loss"]) == ["0", "2"]


def test_secagg_refuses_a_strategy_that_needs_individual_uploads(tiny):
    server = FlowerServer(cfg_for(tiny, "secagg-flora", strategy__name='"flora"'), FlowerOptions(secagg=True))
    with pytest.raises(ConfigError, match="'flora' cannot run under SecAgg\\+: SecAgg\\+ reveals only the sum"):
        server.run(InProcessGrid(make_client_app(), 3))


def test_records_round_trip_adapters_and_base_changes():
    a = Adapter({"m.q": LoRAPair(torch.randn(2, 5), torch.randn(4, 2))}, {"m.classifier.weight": torch.randn(2, 4)})
    back = rec.record_to_adapter(rec.adapter_to_record(a))
    assert all(torch.equal(back.tensors()[k], v) for k, v in a.tensors().items())
    assert rec.record_nbytes(rec.adapter_to_record(a, ("B",))) == a.nbytes(("B",))
    delta = {"m.q": LoRAPair(torch.randn(3, 5), torch.randn(4, 3))}
    got = rec.record_to_base_delta(rec.base_delta_to_record(delta))
    assert torch.equal(got["m.q"].A, delta["m.q"].A) and torch.equal(got["m.q"].B, delta["m.q"].B)
    with pytest.raises(Exception, match="lacks factor B"):
        rec.record_to_base_delta(rec.tensors_to_record({"m.q::A": torch.zeros(1, 2)}))


def test_a_node_without_a_partition_id_is_told_how_to_start(tiny):
    grid = InProcessGrid(make_client_app(), 3)
    for ctx in grid.contexts.values():
        ctx.node_config.pop("partition-id")
    with pytest.raises(ConfigError, match="node 10..: its node_config has no partition-id; start it with --node-config"):
        FlowerServer(cfg_for(tiny, "no-pid"), FlowerOptions(node_wait=0.5), log=lambda s: None).run(grid)


def test_flower_app_command_writes_a_flower_app(tmp_path):
    import argparse
    import tomllib

    from fedlora.flower import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    (tmp_path / "run.toml").write_text("[train]\nrounds = 2\n")
    args = parser.parse_args(["flower", "app", str(tmp_path / "app"), "--config", str(tmp_path / "run.toml"),
                              "--set", "train.lr=0.01", "--min-replies", "2"])
    assert args.func(args) == 0
    app = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedlora.flower.serverapp:app",
                                 "clientapp": "fedlora.flower.clientapp:app"}
    from fedlora.flower.serverapp import config_from_run_config

    cfg, opts = config_from_run_config(app["config"])
    assert cfg.train.rounds == 2 and cfg.train.lr == 0.01 and opts.min_replies == 2


@pytest.mark.slow
def test_secagg_plus_gives_the_plain_result_within_the_quantisation_step(tiny):
    """fedsa (sum-compatible) under Flower's SecAgg+ equals the embedded engine's plain run to within
    the quantisation error after one round. The bound is closed form. Each of the K clients' float32
    payloads x_k is scaled by its weight ratio n_k/Σn, itself rounded to 1/Q, and mapped onto
    Q = 2^22 levels over [-8, 8] (step 16/Q). Stochastic rounding errs by < 1 step, and the float32
    arithmetic before it by ≤ 1/4 step (x + 8 and (x + 8)·Q/16 near 2^21 have float32 spacings of
    1/8 and 1/4 of a step). The server divides the unmasked sum by the rounded ratios' total. So
    |got − plain| < K·1.25·step + K·max|x|/Q. One round only: a second round trains from the
    perturbed global, which no closed form bounds."""
    cfg = cfg_for(tiny, "secagg-fedsa", strategy__name='"fedsa"', train__rounds=1)
    server = FlowerServer(cfg, FlowerOptions(secagg=True, round_timeout=60, node_wait=1), log=lambda s: None)
    server.run(InProcessGrid(make_client_app(secagg=True), 3))
    want, erows = engine_run(cfg_for(tiny, "plain-fedsa", strategy__name='"fedsa"', train__rounds=1))
    step = 2 * 8.0 / 4194304  # SecAggPlusWorkflow's clipping_range and quantization_range
    got, ref = server.state.adapter.tensors(), want.adapter.tensors()
    err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    k = len(server.rows[0]["clients"])
    assert len(server.rows) == 1 and k == 3
    bound = k * 1.25 * step + k * max(float(t.abs().max()) for t in ref.values()) / 4194304
    assert 0 < err < bound  # masked (not bit-identical), yet within the quantisation error
    for row, erow in zip(server.rows, erows):
        assert row["diagnostics"] is None  # the server never sees an individual upload
        assert (row["bytes_up"], row["bytes_down"]) == (erow["bytes_up"], erow["bytes_down"])


def test_flower_sim_in_process_refuses_ray_options_and_runs_secagg(tiny, capsys):
    """`fedlora flower sim --in-process`: Ray's resource options are refused before anything loads;
    --secagg runs (SecAgg+ over the in-process nodes: no per-client diagnostics)."""
    from fedlora.cli import main
    from fedlora.runtime.rundir import RunDir
    from sim_tiny import tiny_overrides

    root, model, data = tiny
    sets = [a for o in tiny_overrides(root / "runs", model, data, run__name='"cli-secagg"', train__rounds=1,
                                      strategy__name='"fedsa"') for a in ("--set", o)]
    assert main(["flower", "sim", "--in-process", "--gpus-per-client", "0.5", *sets]) == 2
    assert "fedlora: error: --gpus-per-client 0.5: Ray resources per ClientApp, which --in-process does not use" \
        in capsys.readouterr().err
    assert not (root / "runs").exists() or not list((root / "runs").glob("cli-secagg*"))
    assert main(["flower", "sim", "--in-process", "--secagg", *sets]) == 0
    run_dir = capsys.readouterr().out.splitlines()[-1].removeprefix("run directory: ")
    (row,) = RunDir.open(run_dir).read_metrics()
    assert row["clients"] == [0, 1, 2] and row["diagnostics"] is None and not row["failed"]




def secagg_error_and_bound(tiny, name, **extra):
    """(largest |SecAgg+ − embedded| over the global adapter after one round, the closed-form bound of
    the test above), for the same config on both."""
    cfg = cfg_for(tiny, f"secagg-{name}", train__rounds=1, **extra)
    server = FlowerServer(cfg, FlowerOptions(secagg=True, round_timeout=60, node_wait=1), log=lambda s: None)
    server.run(InProcessGrid(make_client_app(secagg=True), 3))
    want, _ = engine_run(cfg_for(tiny, f"plain-{name}", train__rounds=1, **extra))
    got, ref = server.state.adapter.tensors(), want.adapter.tensors()
    err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    bound = 3 * 1.25 * (2 * 8.0 / 4194304) + 3 * max(float(t.abs().max()) for t in ref.values()) / 4194304
    return err, bound, server, want


@pytest.mark.slow
def test_secagg_plus_with_uniform_weights_keeps_the_quantisation_bound(tiny):
    """With weights of 1 SecAgg+'s max_weight must be the number of clients, not their samples: a
    max_weight of Σ n_k scales every payload by 1/Σ n_k before quantising and the error grew ~70×
    (2.5e-4 on this model) before the fix."""
    err, bound, _, _ = secagg_error_and_bound(tiny, "uniform", strategy__name='"fedsa"',
                                              strategy__options='{weighting = "uniform"}')
    assert err < bound


@pytest.mark.slow
def test_secagg_plus_with_client_level_dp_releases_the_embedded_noised_model(tiny):
    """Client-level DP over SecAgg+: clients clip and weigh 1, SecAgg+ reveals the mean of the clipped
    uploads, the server adds the seeded noise to their sum. Equal to the embedded engine's DP run
    (same seed, same noise) within the quantisation bound (the noise and the fixed denominator N = K
    leave the mean's error as it is)."""
    pytest.importorskip("dp_accounting")
    from fedlora.privacy.accounting import epsilon, sampled_gaussian

    extra = dict(strategy__name='"fedsa"', privacy__mode='"client"', privacy__clip="0.05",
                 privacy__noise_multiplier="0.7")
    err, bound, server, want = secagg_error_and_bound(tiny, "dp", **extra)
    assert err < bound
    quiet, _ = engine_run(cfg_for(tiny, "plain-dp-quiet", train__rounds=1, **dict(extra, privacy__noise_multiplier="0")))
    ref, q = want.adapter.tensors(), quiet.adapter.tensors()
    assert max(float((ref[k] - q[k]).abs().max()) for k in ref) > 100 * bound  # the noise is there
    assert server.rows[0]["privacy"]["epsilon"] == pytest.approx(epsilon(sampled_gaussian(1.0, 0.7, 1), 1e-5))
    server = FlowerServer(cfg_for(tiny, "secagg-adaptive", **dict(extra, privacy__adaptive_clip="true")),
                          FlowerOptions(secagg=True))
    with pytest.raises(ConfigError, match="adaptive_clip with SecAgg"):
        server.run(InProcessGrid(make_client_app(secagg=True), 3))
