"""fedlora on Flower's simulation runtime (Ray): the same global adapter as the embedded engine, and
the bytes Flower carried equal the core's count. Each test is one simulation (≈10 s of Ray start-up)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from fedlora.flower.cli import run_sim  # noqa: E402
from fedlora.flower.serverapp import FlowerOptions  # noqa: E402
from fedlora.runtime.federation import prepare  # noqa: E402
from flower_common import assert_close_adapters, cfg_for, engine_run, tiny  # noqa: E402,F401

pytestmark = pytest.mark.slow


def initial_adapter(cfg):
    torch.manual_seed(cfg.run.seed)
    fed = prepare(cfg, log=lambda s: None)
    return fed.strategy.init_state(fed.shared.initial_adapter(), alpha=cfg.lora.alpha, seed=cfg.run.seed).adapter


@pytest.mark.parametrize("strategy", ["fedrot", "fedsa"])
def test_flower_simulation_matches_the_embedded_engine(tiny, strategy):
    want, erows = engine_run(cfg_for(tiny, f"engine-{strategy}", strategy__name=f'"{strategy}"'))
    fcfg = cfg_for(tiny, f"flower-{strategy}", strategy__name=f'"{strategy}"')
    out = run_sim(fcfg, FlowerOptions(min_replies=3, round_timeout=600))
    got = out["state"]
    assert got.round == want.round == 2
    assert_close_adapters(got.adapter, want.adapter)
    for row, erow in zip(out["rows"], erows):
        assert row["clients"] == erow["clients"] == [0, 1, 2] and not row["failed"]
        assert row["diagnostics"]["ideal_norm"] == pytest.approx(erow["diagnostics"]["ideal_norm"], rel=1e-4)
        assert row["train_loss"] == pytest.approx(erow["train_loss"], rel=1e-4)
        # communication: what Flower carried equals the core's count
        assert row["bytes_up"] == erow["bytes_up"] == row["bytes_up_sent"]
        assert row["bytes_down"] == erow["bytes_down"] == row["bytes_down_sent"]
    # the adapter moved: the comparison is not between two untouched initial adapters
    init = initial_adapter(fcfg).tensors()
    assert max(float((v - init[k]).abs().max()) for k, v in got.adapter.tensors().items()) > 1e-3
