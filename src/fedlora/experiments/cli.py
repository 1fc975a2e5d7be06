"""The experiment commands: ``fedlora quickstart`` (fedit against fedrot on the quickstart preset),
``fedlora compare CONFIG --strategies … --seeds … [--grid key=v1,v2 …]`` and ``fedlora report DIR``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


QUICKSTART_STRATEGIES = "fedit,fedrot"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``quickstart``, ``compare`` and ``report`` to the ``fedlora`` command line."""
    q = sub.add_parser("quickstart", help="MiniLM on sarcasm, 10 non-IID clients: fedit against fedrot",
                       description="The main-job demo: MiniLM on sarcasm headlines, 10 clients (Dirichlet 0.5), "
                                   "LoRA rank 4, one run per strategy, then a comparison table and plot.")
    q.add_argument("--strategies", default=QUICKSTART_STRATEGIES, help=f"comma-separated (default {QUICKSTART_STRATEGIES})")
    q.add_argument("--config", default=None, help="preset to start from (default: configs/quickstart.toml's values)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--output-dir", default="runs/quickstart", help="where the runs and the comparison go")
    q.add_argument("--quiet", action="store_true",
                   help="no progress bars: neither fedlora's nor those of datasets, transformers and "
                        "huggingface_hub (as run.progress=false)")
    q.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("compare", help="run a grid: strategies × seeds × --grid values, resumable",
                       description="Run one federated simulation per (setting, strategy, seed) into "
                                   "OUTPUT/<setting>/<strategy>/seed-<s>. Finished runs are skipped and "
                                   "unfinished ones resumed, so re-running the same command continues the grid. A "
                                   "started run whose stored config.toml has other settings than this command "
                                   "gives its cell is never reused: the command refuses, naming the cells and "
                                   "keys, unless --force.")
    p.add_argument("config", help="TOML config (a preset in configs/)")
    p.add_argument("--strategies", required=True, help="comma-separated, e.g. fedit,fedrot,ffa")
    p.add_argument("--seeds", default="0", help="comma-separated run.seed values (default 0)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values, e.g. --grid strategy.options.lam=0,0.2,0.4 --grid lora.r=4,64")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value in every cell")
    p.add_argument("--output-dir", default=None, help="where the grid goes (default runs/compare/<config name>)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N cells at once, each in its own process with cpu_count/N torch threads and its "
                        "output in OUTPUT/logs/ (default 1: one cell at a time, output on the terminal)")
    p.add_argument("--force", action="store_true",
                   help="delete and rerun the grid's cells that were run with other settings (only those; "
                        "without it such cells stop the command before anything runs)")
    p.add_argument("--no-report", action="store_true", help="do not write summary.md and plots at the end")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars: neither fedlora's nor those of datasets, transformers and "
                        "huggingface_hub (as run.progress=false)")
    p.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="summary.md and plots for a folder of runs (a compare grid)",
                       description="Write DIR/summary.md (one table per setting, mean ± population std over "
                                   "seeds, one row per set of settings that change results, labelled by the keys in "
                                   "which they differ; an overview of every setting; the runs not averaged, being "
                                   "unfinished, failed or unreadable, listed apart) and DIR/plots/<setting>.png. Several "
                                   "folders are merged into one report (settings of the same name become one "
                                   "table) written to --output.")
    r.add_argument("dirs", nargs="+", metavar="dir", help="a folder of run directories, e.g. a `fedlora compare` output")
    r.add_argument("--output", default=None, help="where summary.md and plots/ go (default: the single DIR)")
    r.set_defaults(func=cmd_report)


def cmd_compare(args) -> int:
    from rich.console import Console

    from fedlora.errors import ConfigError
    from fedlora.experiments.grid import cell_log, expand_grid, parse_grid, parse_seeds, run_grid, split_list
    from fedlora.experiments.report import grid_report

    console = Console(highlight=False)
    out = Path(args.output_dir or Path("runs") / "compare" / Path(args.config).stem)
    cells = expand_grid(out, split_list(args.strategies, "--strategies"), parse_seeds(args.seeds),
                        parse_grid(args.grid))
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: expected 1 or more")
    t0 = time.perf_counter()

    def announce(i, n, cell, status):
        if args.jobs > 1:  # one line per queued cell: the cells' own output goes to logs/
            if status != "done":
                what = {"resume": "resuming", "replace": "replacing (--force)"}.get(status, "queued")
                console.print(f"[bold][{i + 1}/{n}][/] {cell.setting} · {cell.strategy} · seed {cell.seed}: {what}")
            return
        what = {"done": "[dim]done, skipped[/]", "resume": "[yellow]resuming[/]", "new": "[green]starting[/]",
                "replace": "[red]replacing (run with other settings; --force)[/]"}[status]
        elapsed = time.perf_counter() - t0
        console.rule(f"[bold][{i + 1}/{n}][/] {cell.setting} · {cell.strategy} · seed {cell.seed} — {what} "
                     f"[dim]({elapsed:.0f} s elapsed)[/]")

    def finished(cell, summary, error):
        elapsed = time.perf_counter() - t0
        where = f"{cell.setting} · {cell.strategy} · seed {cell.seed}"
        if error is not None:
            console.print(f"[red]failed[/] {where}: {error} [dim](log: {cell_log(cell)})[/]")
            return
        m = summary.get("metric", "accuracy")
        best = summary.get(f"best_{m}")
        console.print(f"[green]done[/] {where}: best {m} {best if best is None else format(best, '.4f')}, "
                      f"{summary.get('wall_s', 0):.0f} s [dim]({elapsed:.0f} s elapsed)[/]")

    result = run_grid(args.config, cells, args.overrides, force=args.force, progress=False if args.quiet else None,
                      announce=announce, jobs=args.jobs, finished=finished)
    replaced = f" ({len(result.replaced)} of them replaced cells of other settings)" if result.replaced else ""
    console.print(f"grid {out}: {len(result.ran)} ran{replaced}, {len(result.resumed)} resumed, "
                  f"{len(result.skipped)} skipped in {time.perf_counter() - t0:.0f} s")
    if not args.no_report:
        console.print(f"report: {grid_report(out, say=console.print)}")
    return 0


def cmd_report(args) -> int:
    from fedlora.experiments.report import grid_report

    print(f"report: {grid_report(args.dirs, args.output, say=print)}")
    return 0


def quickstart_preset() -> Path | None:
    """configs/quickstart.toml of a source checkout, when there is one."""
    path = Path(__file__).resolve().parents[3] / "configs" / "quickstart.toml"
    return path if path.is_file() else None


def cmd_quickstart(args) -> int:
    from rich.console import Console

    from fedlora.config import load_config
    from fedlora.experiments.report import compare_runs, plot_runs, print_comparison
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
