"""``fedlora run CONFIG.toml --set key=value …`` and ``fedlora quickstart``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedlora.config import load_config

QUICKSTART_STRATEGIES = "fedit,fedrot"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` and ``quickstart`` to the ``fedlora`` command line."""
    p = sub.add_parser("run", help="run a federated simulation from a TOML config",
                       description="Run a federated LoRA simulation. Keys: run.*, model.*, lora.*, data.*, "
                                   "partition.*, train.*, strategy.name, strategy.options.*, eval.*")
    p.add_argument("config", nargs="?", help="TOML config file (omit with --resume, or to use the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-3 --set strategy.name=fedrot")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    q = sub.add_parser("quickstart", help="MiniLM on sarcasm, 10 non-IID clients: fedit against fedrot",
                       description="The main-job demo: MiniLM on sarcasm headlines, 10 clients (Dirichlet 0.5), "
                                   "LoRA rank 4, one run per strategy, then a comparison table and plot.")
    q.add_argument("--strategies", default=QUICKSTART_STRATEGIES, help=f"comma-separated (default {QUICKSTART_STRATEGIES})")
    q.add_argument("--config", default=None, help="preset to start from (default: configs/quickstart.toml's values)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--output-dir", default="runs/quickstart", help="where the runs and the comparison go")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)


def cmd_run(args) -> int:
    from fedlora.sim import run

    from fedlora.runtime.rundir import RunDir

    cfg = RunDir.command_config(args.config, args.overrides, args.resume)
    summary = run(cfg, resume=args.resume, progress=False if args.quiet else None)
    print(f"run directory: {summary['run_dir']}")
    return 0


def quickstart_preset() -> Path | None:
    """configs/quickstart.toml of a source checkout, when there is one."""
    path = Path(__file__).resolve().parents[3] / "configs" / "quickstart.toml"
    return path if path.is_file() else None


def cmd_quickstart(args) -> int:
    from rich.console import Console

    from fedlora.report import compare_runs, plot_runs, print_comparison
    from fedlora.sim import run

    console = Console(highlight=False)
    t0 = time.perf_counter()
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    out = Path(args.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    preset = args.config or quickstart_preset()
    run_dirs = []
    # check every strategy's config before the first (long) run starts
    configs = [load_config(preset, [*args.overrides, f"strategy.name={name}", f"run.name={name}-{stamp}",
                                    f"run.output_dir={out.as_posix()}"]) for name in names]
    for cfg in configs:
        console.rule(f"[bold]{cfg.strategy.name}")
        summary = run(cfg, progress=False if args.quiet else None)
        run_dirs.append(summary["run_dir"])
    rows = compare_runs(run_dirs)
    print_comparison(rows, console)
    plot = plot_runs(run_dirs, out / f"comparison-{stamp}.png")
    console.print(f"plot: {plot}")
    console.print(f"total time: {time.perf_counter() - t0:.0f} s")
    return 0
