"""Both transports behind one fixture, for the tests of what the shared round loop promises (resume,
Ctrl-C, failures). A test names what it drives and gets each transport in turn:

- ``engine(cfg, resume=…, loss_fn=…, log=…)`` runs ``cfg`` in process (``fedlora.sim.run``) or over
  real Flower Messages and node Contexts (``run_inprocess``: the fedlora ServerApp's transport and
  ClientApp on an in-process grid);
- ``run_command`` is the command line that does the same: ``fedlora run --quiet …`` or
  ``fedlora flower sim --in-process …`` (append ``--set``, ``--resume RUN_DIR``; the same in
  ``main([...])`` and after ``python -m fedlora.cli`` in a subprocess).

A test that takes both gets them for the same transport (both follow the ``transport`` fixture).
tests/conftest.py loads this module as a plugin: a test just names the fixture.
"""

from __future__ import annotations

import pytest

from fedlora.sim import run as embedded_run


def flower_run(cfg, **kwargs):
    pytest.importorskip("flwr")
    from fedlora.flower.inprocess import run_inprocess

    return run_inprocess(cfg, **kwargs)


ENGINES = {"embedded": embedded_run, "flower": flower_run}
COMMANDS = {"embedded": ["run", "--quiet"], "flower": ["flower", "sim", "--in-process"]}


@pytest.fixture(params=sorted(ENGINES))
def transport(request) -> str:
    """The name of each transport in turn ("embedded", "flower")."""
    if request.param == "flower":
        pytest.importorskip("flwr")
    return request.param


@pytest.fixture
def engine(transport):
    """The run function of each transport in turn."""
    return ENGINES[transport]


@pytest.fixture
def run_command(transport) -> list[str]:
    """The ``fedlora`` arguments that run a config on each transport in turn."""
    return list(COMMANDS[transport])
