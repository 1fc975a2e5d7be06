"""fedlora on Flower's simulation runtime (Ray): the same global adapter as the embedded engine, and
a node whose reply holds NaN is dropped. Each test is one simulation (≈10 s of Ray start-up)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from fedlora.config import load_config  # noqa: E402
from fedlora.flower.cli import run_sim  # noqa: E402
from fedlora.flower.serverapp import FlowerOptions  # noqa: E402
from fedlora.sim.engine import prepare, run  # noqa: E402
from fedlora.sim.rundir import RunDir  # noqa: E402
from sim_tiny import make_tiny_model, make_toy_data, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLORA_CACHE", str(root / "cache"))
    yield root, make_tiny_model(root / "tiny-bert"), make_toy_data(root / "toy.jsonl")
    mp.undo()


def cfg_for(tiny, name, **extra):
    root, model, data = tiny
    return load_config(None, tiny_overrides(root / "runs", model, data, run__name=name, eval__personalised="false",
                                            model__device='"cpu"', **extra))


def engine_state(cfg):
    torch.manual_seed(cfg.run.seed)  # the Flower server seeds PEFT's init the same way
    summary = run(cfg, progress=False, log=lambda s: None)
    return RunDir.open(summary["run_dir"]).load_checkpoint()["state"], summary


def initial_adapter(cfg):
    torch.manual_seed(cfg.run.seed)
    fed = prepare(cfg, log=lambda s: None)
    return fed.strategy.init_state(fed.shared.initial_adapter(), alpha=cfg.lora.alpha, seed=cfg.run.seed).adapter


def assert_same_adapter(got, want, atol=1e-5):
    g, w = got.tensors(), want.tensors()
    assert g.keys() == w.keys()
    for k in w:
        torch.testing.assert_close(g[k], w[k], rtol=1e-4, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("strategy", ["fedrot", "fedsa"])
def test_flower_simulation_matches_the_embedded_engine(tiny, strategy):
    cfg = cfg_for(tiny, f"engine-{strategy}", strategy__name=f'"{strategy}"')
    want, engine_summary = engine_state(cfg)
    fcfg = cfg_for(tiny, f"flower-{strategy}", strategy__name=f'"{strategy}"')
    out = run_sim(fcfg, FlowerOptions(min_replies=3, round_timeout=120))
    got = out["state"]
    assert got.round == want.round == 2
    assert_same_adapter(got.adapter, want.adapter)
    for row, erow in zip(out["rows"], RunDir.open(engine_summary["run_dir"]).read_metrics()):
        assert row["clients"] == erow["clients"] == [0, 1, 2] and not row["failed"]
        assert row["diagnostics"]["ideal_norm"] == pytest.approx(erow["diagnostics"]["ideal_norm"], rel=1e-4)
        assert row["train_loss"] == pytest.approx(erow["train_loss"], rel=1e-4)
        # communication: what Flower carried equals the core's count
        assert row["bytes_up"] == erow["bytes_up"] == row["bytes_up_sent"]
        assert row["bytes_down"] == erow["bytes_down"] == row["bytes_down_sent"]
    # the adapter moved: the comparison is not between two untouched initial adapters
    init = initial_adapter(fcfg).tensors()
    assert max(float((v - init[k]).abs().max()) for k, v in got.adapter.tensors().items()) > 1e-3
