"""``fedlora run CONFIG.toml --set key=value …`` (``--resume RUN_DIR``): the embedded engine."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` to the ``fedlora`` command line."""
    p = sub.add_parser("run", help="run a federated simulation from a TOML config",
                       description="Run a federated LoRA simulation. Keys: run.*, model.*, lora.*, data.*, "
                                   "partition.*, train.*, strategy.name, strategy.options.*, eval.*")
    p.add_argument("config", nargs="?", help="TOML config file (omit with --resume, or to use the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-3 --set strategy.name=fedrot")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars: neither fedlora's nor those of datasets, transformers and "
                        "huggingface_hub (as run.progress=false)")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from fedlora.runtime.rundir import RunDir
    from fedlora.sim import run

    cfg = RunDir.command_config(args.config, args.overrides, args.resume)
    summary = run(cfg, resume=args.resume, progress=False if args.quiet else None)
    print(f"run directory: {summary['run_dir']}")
    return 0
