"""``fedlora flower sim CONFIG`` (Flower's simulation runtime; ``--in-process``: the fedlora apps over
real Flower Messages in this process, without Ray) and ``fedlora flower app DIR`` (write a Flower App
directory for ``flwr run`` against a SuperLink). Deployment recipes: docs/flower.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

APP_PYPROJECT = """\
# A Flower App that runs fedlora: `flwr run {dir} <connection> --stream`.
# Written by `fedlora flower app`; its run config names the fedlora TOML on the SuperLink's machine.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlora-flower-app"
version = "0.1.0"
dependencies = []  # fedlora[flower] is installed on every machine; nothing to install at run time

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.flower.serverapp:app"
clientapp = "fedlora.flower.{clientapp}"

[tool.flwr.app.config]
config = "{config}"
overrides = "{overrides}"
min-replies = {min_replies}
round-timeout = {round_timeout}
node-wait = 120.0
secagg = {secagg}
"""


#: ``flower sim`` options that only Ray uses, and their defaults (``--in-process`` refuses others)
RAY_ONLY = {"cpus_per_client": 1.0, "gpus_per_client": 0.0}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``flower sim`` and ``flower app`` to the ``fedlora`` command line."""
    p = sub.add_parser("flower", help="run on Flower (simulation, or a SuperLink with SuperNodes)",
                       description="Run a fedlora config on Flower. Deployment: see docs/flower.md.")
    fsub = p.add_subparsers(dest="flower_command", metavar="SUBCOMMAND")
    s = fsub.add_parser("sim", help="a Flower simulation (Ray, or --in-process), one virtual SuperNode per client",
                        description="Run a fedlora config under Flower's simulation runtime (Ray), one virtual "
                                    "SuperNode per client; with --in-process, without Ray.")
    s.add_argument("config", nargs="?", help="TOML config (as for fedlora run)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted Flower run from its last complete round, with its own config "
                        "(--set train.rounds=N adds rounds)")
    s.add_argument("--min-replies", type=int, default=1, help="valid replies a round needs (default 1)")
    s.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for replies (default 600)")
    s.add_argument("--secagg", action="store_true",
                   help="aggregate with Flower's SecAgg+ (strategies with secure_aggregation only)")
    s.add_argument("--cpus-per-client", type=float, default=RAY_ONLY["cpus_per_client"],
                   help="Ray CPUs per ClientApp (default 1; not with --in-process)")
    s.add_argument("--gpus-per-client", type=float, default=RAY_ONLY["gpus_per_client"],
                   help="Ray GPUs per ClientApp (default 0; not with --in-process)")
    s.add_argument("--in-process", action="store_true",
                   help="run the fedlora ServerApp and one ClientApp per client in this process over real Flower "
                        "Messages, without Ray (fast; for debugging and small runs; not a Flower runtime)")
    s.set_defaults(func=cmd_sim)
    a = fsub.add_parser("app", help="write a Flower App directory (pyproject.toml) for `flwr run`")
    a.add_argument("dir", help="the app directory to write")
    a.add_argument("--config", required=True, help="fedlora TOML config (path on the SuperLink's machine)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--min-replies", type=int, default=1)
    a.add_argument("--round-timeout", type=float, default=600.0)
    a.add_argument("--secagg", action="store_true", help="SecAgg+ (the ClientApp with secaggplus_mod)")
    a.add_argument("--resident", action="store_true",
                   help="the ClientApp forwards each message to the node's resident worker (SuperNodes started "
                        "with `fedlora flower node`): model and data load once per run, not once per round")
    a.set_defaults(func=cmd_app)
    from fedlora.flower.node import register as register_node

    register_node(fsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def write_app(directory: str | Path, config: str | Path, overrides: list[str] = (), min_replies: int = 1,
              round_timeout: float = 600.0, secagg: bool = False, resident: bool = False) -> Path:
    """Write a Flower App directory whose ServerApp/ClientApp are fedlora's; returns its path.
    ``resident``: the ClientApp is the forwarder to each node's resident worker (``fedlora flower node``)."""
    from fedlora.files import atomic_write

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    text = APP_PYPROJECT.format(dir=d, config=Path(config).resolve().as_posix(), overrides=";".join(overrides),
                                min_replies=int(min_replies), round_timeout=float(round_timeout),
                                clientapp=("forwarder:" if resident else "clientapp:") + ("secagg_app" if secagg else "app"),
                                secagg="true" if secagg else "false")
    atomic_write(d / "pyproject.toml", text)
    return d


def run_sim(cfg, options=None, *, resume: str | Path | None = None, faults: dict[int, str] | None = None,
            cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) ``cfg`` under Flower's simulation runtime; returns
    {"summary", "state", "rows"}. Ctrl-C or SIGTERM stops the run after its last complete round, as
    ``fedlora run`` does (the ServerApp runs in a thread that gets no signals, so the handler asks it
    to stop), and raises KeyboardInterrupt once the summary is written; a second one stops at once."""
    import os

    from flwr.simulation import run_simulation

    from fedlora.flower.clientapp import make_client_app
    from fedlora.flower.serverapp import FlowerOptions, make_server_app
    from fedlora.runtime.signals import signals_set_stop

    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    results: dict[str, Any] = {}
    cpus = max(1, os.cpu_count() or 1)
    options = options or FlowerOptions()
    with signals_set_stop():
        run_simulation(make_server_app(cfg, options, results, resume), make_client_app(faults, secagg=options.secagg),
                       num_supernodes=cfg.partition.num_clients,
                       backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
                                       "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                     "log_to_driver": False}})
    if "error" in results:
        raise results["error"]
    if "summary" not in results:
        from fedlora.errors import FedLoRAError

        raise FedLoRAError("the Flower simulation ended without a result; its log above says why")
    return results


def require_flower(ray: bool = True) -> None:
    """A clear error when the optional Flower extra (and, with ``ray``, Ray) is missing."""
    import importlib.util

    from fedlora.errors import FedLoRAError

    needed = (("flwr", "fedlora[flower]"),) + ((("ray", "fedlora[flower] (flwr[simulation])"),) if ray else ())
    for module, extra in needed:
        if importlib.util.find_spec(module) is None:
            raise FedLoRAError(f"fedlora flower needs {module!r}: pip install \"{extra}\"")


def cmd_sim(args) -> int:
    if args.in_process:
        check_in_process(args)
    require_flower(ray=not args.in_process)
    from fedlora.flower.serverapp import FlowerOptions
    from fedlora.runtime.rundir import RunDir

    cfg = RunDir.command_config(args.config, args.overrides, args.resume)
    options = FlowerOptions(min_replies=args.min_replies, round_timeout=args.round_timeout, secagg=args.secagg)
    if args.in_process:
        from fedlora.flower.inprocess import run_inprocess
        from fedlora.runtime.signals import signals_set_stop

        with signals_set_stop():  # as run_sim: Ctrl-C stops after the last complete round, a second at once
            summary = run_inprocess(cfg, resume=args.resume, options=options)
    else:
        summary = run_sim(cfg, options, resume=args.resume, cpus_per_client=args.cpus_per_client,
                          gpus_per_client=args.gpus_per_client)["summary"]
    print(f"run directory: {summary['run_dir']}")
    return 0


def check_in_process(args) -> None:
    """Refuse the Ray-only options (given other than their defaults) with ``--in-process``."""
    from fedlora.errors import FedLoRAError

    given = [f"--{name.replace('_', '-')} {getattr(args, name):g}" for name, default in RAY_ONLY.items()
             if getattr(args, name) != default]
    if given:
        raise FedLoRAError(f"{', '.join(given)}: Ray resources per ClientApp, which --in-process does not use "
                           "(it runs every client in this process, without Ray); leave them out, or run without "
                           "--in-process")


def cmd_app(args) -> int:
    d = write_app(args.dir, args.config, args.overrides, args.min_replies, args.round_timeout, args.secagg,
                  args.resident)
    print(f"Flower App written to {d}; run it with: flwr run {d} <connection> --stream")
    if args.resident:
        print("its ClientApp forwards to resident workers: start each SuperNode with `fedlora flower node "
              "--superlink HOST:PORT --node-config 'partition-id=K num-partitions=N' ...`")
    return 0
