"""Both transports behind one call, for the tests of what the shared round loop promises (resume,
Ctrl-C, failures): ``engine(cfg, resume=…, loss_fn=…, log=…)`` runs ``cfg`` in process
(``fedlora.sim.run``) or over real Flower Messages and node Contexts (``run_inprocess``: the
fedlora ServerApp's transport and ClientApp on an in-process grid)."""

from __future__ import annotations

import pytest

from fedlora.sim import run as embedded_run


def flower_run(cfg, **kwargs):
    pytest.importorskip("flwr")
    from fedlora.flower.inprocess import run_inprocess

    return run_inprocess(cfg, **kwargs)


ENGINES = {"embedded": embedded_run, "flower": flower_run}


@pytest.fixture(params=sorted(ENGINES))
def engine(request):
    """The run function of each transport in turn."""
    return ENGINES[request.param]
