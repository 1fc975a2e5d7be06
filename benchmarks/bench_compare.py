"""`fedlora compare --jobs`: the wall time of one grid run one cell at a time against N cells at a time.

The same grid (strategies × seeds on a real catalog model) runs through the `fedlora compare` command
line, as a user runs it, once with ``--jobs 1`` (one process, all cores to torch) and once with
``--jobs N`` (N spawned processes with cpu_count/N torch threads each), each into a fresh folder. The
modes alternate over the repeats (1, N, N, 1, …) so both see the same drift in machine load. Each
timing includes Python and torch start-up and model loading, as a user's run does. The ratio is
sequential wall time over parallel wall time: the grid's throughput gain. The cells' best accuracies
are compared too: different torch thread counts change floating-point reduction order, so they may
differ in the last digits; the benchmark reports the largest difference and asserts nothing.

    python benchmarks/bench_compare.py                       # MiniLM + sarcasm, 4 cells, --jobs 2
    python benchmarks/bench_compare.py --jobs 2 --repeats 2 --rounds 3 --steps 6

Writes benchmarks/results/compare_jobs.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def grid_command(args, out: Path, jobs: int) -> list[str]:
    sets = {
        "model.name": f'"{args.model}"', "data.source": f'"{args.data}"', "partition.num_clients": str(args.clients),
        "train.rounds": str(args.rounds), "train.local_steps": str(args.steps), "train.batch_size": "8",
        "data.eval_examples": str(args.eval_examples), "eval.personalised": "false",
    }
    cmd = [sys.executable, "-m", "fedlora.cli", "compare", str(ROOT / "configs" / "quickstart.toml"),
           "--strategies", args.strategies, "--seeds", args.seeds, "--jobs", str(jobs),
           "--quiet", "--no-report", "--output-dir", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def best_accuracies(out: Path) -> dict[str, float]:
    from fedlora.experiments.grid import find_runs

    return {f"{r['setting']}/{r['strategy']}/seed-{r['seed']}": json.load(open(Path(r["run_dir"]) / "summary.json"))
            ["best_accuracy"] for r in find_runs(out)}


def time_grid(args, jobs: int, work: Path, tag: str) -> dict:
    out = work / tag
    t0 = time.perf_counter()
    proc = subprocess.run(grid_command(args, out, jobs), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`fedlora compare --jobs {jobs}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"jobs": jobs, "wall_s": wall, "best": best_accuracies(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="sarcasm")
    ap.add_argument("--strategies", default="fedit,fedrot")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_jobs.json"))
    args = ap.parse_args()

    cells = len(args.strategies.split(",")) * len(args.seeds.split(","))
    order = [m for i in range(args.repeats) for m in ((1, args.jobs) if i % 2 == 0 else (args.jobs, 1))]
    runs, load_start = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i, jobs in enumerate(order):
            print(f"[{i + 1}/{len(order)}] {cells} cells with --jobs {jobs} …", flush=True)
            runs.append(time_grid(args, jobs, Path(tmp), f"run{i}-jobs{jobs}"))
            print(f"    {runs[-1]['wall_s']:.1f} s", flush=True)

    def walls(jobs):
        return [r["wall_s"] for r in runs if r["jobs"] == jobs]

    seq, par = walls(1), walls(args.jobs)
    bests = [r["best"] for r in runs]
    max_diff = max(abs(b[k] - bests[0][k]) for b in bests for k in bests[0])
    result = {
        "model": args.model, "data": args.data, "strategies": args.strategies, "seeds": args.seeds, "cells": cells,
        "clients": args.clients, "rounds": args.rounds, "steps": args.steps, "jobs": args.jobs,
        "cpus": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "runs": runs,
        "sequential_median_s": statistics.median(seq), "parallel_median_s": statistics.median(par),
        "speedup_median": statistics.median(seq) / statistics.median(par),
        "speedup_min": min(seq) / min(par), "max_best_accuracy_difference": max_diff,
    }
    atomic_write(Path(args.out), json.dumps(result, indent=2) + "\n")

    print(f"\n{cells} cells ({args.model} + {args.data}, {args.clients} clients, {args.rounds} rounds × "
          f"{args.steps} steps) on {os.cpu_count()} CPUs\n")
    print("| mode | runs (s) | median s | cells / min |")
    print("|---|---|---:|---:|")
    for jobs, ws in ((1, seq), (args.jobs, par)):
        print(f"| --jobs {jobs} | {', '.join(f'{w:.1f}' for w in ws)} | {statistics.median(ws):.1f} | "
              f"{60 * cells / statistics.median(ws):.2f} |")
    print(f"\nspeed-up of --jobs {args.jobs}: {result['speedup_median']:.2f}× (medians), "
          f"{result['speedup_min']:.2f}× (fastest runs); largest difference in a cell's best accuracy "
          f"between runs: {max_diff:.4f}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
