"""Server-side cost per round of every registered strategy, at RoBERTa-large shapes.

A benchmark, not a test: it measures and reports, it asserts nothing.

- Server cost: ``strategy.aggregate(updates, state)`` for every name in ``strategy_names()``, with
  N random full client adapters (48 adapted 1024×1024 layers, rank r, float32). Strategies that
  train only one factor take full adapters too: the server cost does not depend on the values.
- FedRot's client-side alignment: ``FedRot.before_upload`` for all N clients (round 1 aligns A,
  round 2 aligns B), as a percentage of a FedIT aggregation at the same shape.
- The exact factored aggregate (``factors.factored_aggregate``) against a dense SVD of the formed
  Σ p_k B_k A_k (forming included), for one d×d layer, at every grid point and at d=1024, N=10, r=8.

Every time is the median of several ``time.perf_counter`` runs after one warm-up run. Slow cells get
fewer runs (``--cell-budget``) and cells are skipped once the whole run passes ``--budget``; both are
recorded in the output. All ratios come from the same run, side by side, so a busy machine slows
both sides alike; absolute times are only as good as the machine was quiet.

    python benchmarks/bench_server.py            # full grid → benchmarks/results/server.json
    python benchmarks/bench_server.py --quick    # small shapes, a smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting stall each other and every small
# op (an r×r SVD) can take 10× longer; passive waiting does the same work. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedlora.diagnostics import round_diagnostics  # noqa: E402
from fedlora.files import atomic_write  # noqa: E402
from fedlora.factors import Adapter, LoRAPair, factored_aggregate  # noqa: E402
from fedlora.strategies import ClientContext, ClientUpdate, get_strategy, strategy_names  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "server.json"
FULL = dict(layers=48, d=1024, ranks=(4, 16, 64), clients=(3, 10, 50), headline=(1024, 10, 8))
CORE = ("fedit", "fedrot")  # measured first at every grid point: the figures the targets are about
QUICK = dict(layers=4, d=128, ranks=(4, 16), clients=(3, 10), headline=(128, 10, 8))


class RunTooLong(Exception):
    """One run passed the per-run cap (``--max-cell``)."""


@contextlib.contextmanager
def run_cap(seconds: float):
    """Raise RunTooLong in the main thread after ``seconds`` (checked between torch ops; Unix only)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def _stop(signum, frame):
        raise RunTooLong

    old = signal.signal(signal.SIGALRM, _stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed(fns: dict[str, Callable[[], object]], repeats: dict[str, int], cell_budget: float,
          cap: float) -> dict[str, dict]:
    """Median (and min) seconds of each function over up to ``repeats[name]`` runs after one warm-up.

    The functions' runs alternate (a, b, a, b, …), so a burst of load from other processes falls on
    both sides of a ratio alike. Each warm-up's time sets how many of its runs fit in ``cell_budget``
    seconds (at least one); a function whose warm-up alone exceeds the budget keeps that one time
    (``runs`` = 0 says so); a warm-up stopped at ``cap`` seconds gives ``{"over_s": cap}``.
    """
    out: dict[str, dict] = {}
    todo: dict[str, int] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            with run_cap(cap):
                fn()
        except RunTooLong:
            out[name] = {"over_s": cap, "runs": 0, "note": f"stopped after {cap} s"}
            continue
        warm = time.perf_counter() - t0
        if warm > cell_budget:
            out[name] = {"median_s": warm, "min_s": warm, "runs": 0, "note": "warm-up only (over the cell budget)"}
        else:
            todo[name] = max(1, min(repeats[name], int(cell_budget / max(warm, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in todo}
    while todo:
        for name in list(todo):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            if len(times[name]) == todo[name]:
                del todo[name]
    for name, ts in times.items():
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}
    return out


def random_adapter(layers: int, d: int, r: int, g: torch.Generator) -> Adapter:
    """``layers`` d×d layers of rank r with factors of unit-variance entries scaled like trained LoRA."""
    return Adapter({f"layer{i}.q_proj": LoRAPair(torch.randn(r, d, generator=g) / d**0.5,
                                                 torch.randn(d, r, generator=g) / d**0.5)
                    for i in range(layers)},
                   {"classifier.dense.weight": torch.randn(d, d, generator=g) / d**0.5,
                    "classifier.out_proj.weight": torch.randn(3, d, generator=g) / d**0.5})


class Run:
    """One benchmark run: the grid, the clock and the collected rows."""

    def __init__(self, args: argparse.Namespace, cfg: dict):
        self.args, self.cfg = args, cfg
        self.start = time.perf_counter()
        self.skipped: list[str] = []
        self.server: list[dict] = []
        self.align: list[dict] = []
        self.dense: list[dict] = []
        self.too_slow: dict[str, str] = {}  # strategy → the grid point where one run passed --max-cell

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.start > self.args.budget:
            self.skipped.append(what)
            return True
        return False

    def time(self, fns: dict[str, Callable[[], object]], repeats: dict[str, int] | None = None) -> dict[str, dict]:
        reps = {name: self.args.repeats for name in fns} | (repeats or {})
        return timed(fns, reps, self.args.cell_budget, self.args.max_cell)

    def inputs(self, r: int, n: int) -> tuple[Adapter, list[Adapter]]:
        """The round's start adapter and N client adapters; the same for a grid point in both phases."""
        g = torch.Generator().manual_seed(1000 * r + n)
        layers, d = self.cfg["layers"], self.cfg["d"]
        return random_adapter(layers, d, r, g), [random_adapter(layers, d, r, g) for _ in range(n)]

    def aggregate_cell(self, name: str, r: int, n: int, start: Adapter, clients: list[Adapter],
                       beside: dict[str, Callable[[], object]] | None = None) -> dict | None:
        """Time ``aggregate`` of one strategy at one grid point; None (and a note) when skipped.

        ``beside``: functions timed in turn with the aggregate (for ratios); their results are in
        the returned row under "beside".
        """
        if self.over_budget(f"{name} r={r} N={n}"):
            return None
        if name in self.too_slow:  # grid points run cheapest first: a larger one would be slower still
            self.skipped.append(f"{name} r={r} N={n} (over {self.args.max_cell} s at {self.too_slow[name]})")
            return None
        row: dict = {"strategy": name, "r": r, "N": n}
        try:
            strategy = get_strategy(name)
            state = strategy.init_state(start, alpha=16.0)
            updates = [ClientUpdate(client_id=k, adapter=a, num_samples=100 + k,
                                    scaling=strategy.scaling(ClientContext(client_id=k, round=0), r))
                       for k, a in enumerate(clients)]
            res = self.time({"aggregate": lambda: strategy.aggregate(updates, state)} | (beside or {}))
            row.update(res.pop("aggregate"))
            if beside:
                row["beside"] = res
        except Exception as e:  # a strategy that cannot run here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"
        if "over_s" in row or row.get("median_s", 0) > self.args.max_cell:
            self.too_slow[name] = f"r={r} N={n}"
        self.server.append(row)
        return row

    def core_point(self, r: int, n: int) -> None:
        """FedIT and FedRot aggregates, FedRot's client alignment beside FedIT's, and factored vs dense SVD."""
        start, clients = self.inputs(r, n)
        names = strategy_names()
        beside = {}
        if "fedrot" in names:
            fedrot = get_strategy("fedrot")
            reference = fedrot.init_state(start).adapter

            def align(rnd: int) -> Callable[[], object]:
                ctxs = [ClientContext(client_id=k, round=rnd) for k in range(n)]
                return lambda: [fedrot.before_upload(a, reference, c) for a, c in zip(clients, ctxs)]

            beside = {1: align(1), 2: align(2)}  # round 1 aligns A, round 2 aligns B
        fedit = self.aggregate_cell("fedit", r, n, start, clients, beside) if "fedit" in names else None
        if "fedrot" in names:
            self.aggregate_cell("fedrot", r, n, start, clients)
            fedit_s = fedit.get("median_s") if fedit else None
            measured = fedit.pop("beside", None) if fedit else None
            if measured is None and not self.over_budget(f"fedrot alignment r={r} N={n}"):
                measured = self.time(beside)  # FedIT absent or failed: alignment alone
            for rnd, res in (measured or {}).items():
                res.update(r=r, N=n, round=rnd, factor=fedrot.aligned_factor(rnd))
                if "median_s" in res:
                    res["per_client_s"] = res["median_s"] / n
                    res["pct_of_fedit_aggregate"] = 100 * res["median_s"] / fedit_s if fedit_s else None
                    # clients align in parallel: one client's alignment is what a round's wall time gains
                    res["per_client_pct_of_fedit_aggregate"] = 100 * res["per_client_s"] / fedit_s if fedit_s else None
                self.align.append(res)
        if not self.over_budget(f"factored vs dense r={r} N={n}"):
            self.dense.append(self.factored_vs_dense(clients, self.cfg["d"], r, n, layer=next(iter(start.layers))))

    def strategy_point(self, r: int, n: int) -> None:
        """Every other registered strategy's aggregate."""
        others = [s for s in strategy_names() if s not in CORE]
        if not others or self.over_budget(f"other strategies r={r} N={n}"):
            return
        start, clients = self.inputs(r, n)
        for name in others:
            self.aggregate_cell(name, r, n, start, clients)

    def factored_vs_dense(self, clients: list[Adapter], d: int, r: int, n: int, layer: str) -> dict:
        """One layer: the factored exact aggregate against a dense SVD of the formed sum."""
        Bs = [c.layers[layer].B for c in clients]
        As = [c.layers[layer].A for c in clients]
        p = torch.arange(1, n + 1, dtype=torch.float64)
        p = p / p.sum()

        def dense() -> object:
            W = torch.zeros(d, d)
            for pk, B, A in zip(p.tolist(), Bs, As):
                W.addmm_(B, A, alpha=pk)
            return torch.linalg.svd(W, full_matrices=False)

        res = self.time({"factored": lambda: factored_aggregate(Bs, As, p), "dense": dense},
                        repeats={"dense": min(self.args.repeats, self.args.dense_repeats)})
        fact, dens = res["factored"], res["dense"]
        ok = "median_s" in fact and "median_s" in dens  # False only if a run passed --max-cell
        return {"d": d, "r": r, "N": n, "factored_s": fact.get("median_s"), "factored_min_s": fact.get("min_s"),
                "factored_runs": fact["runs"], "dense_s": dens.get("median_s"), "dense_min_s": dens.get("min_s"),
                "dense_runs": dens["runs"], "speedup": dens["median_s"] / fact["median_s"] if ok else None,
                "speedup_of_min": dens["min_s"] / fact["min_s"] if ok else None,
                # factored_aggregate itself takes the dense route once the stacked rank reaches d
                "factored_path": "dense" if n * r >= d else "factored"}

    def headline(self) -> dict:
        d, n, r = self.cfg["headline"]
        g = torch.Generator().manual_seed(7)
        clients = [Adapter({"layer": LoRAPair(torch.randn(r, d, generator=g), torch.randn(d, r, generator=g))})
                   for _ in range(n)]
        return self.factored_vs_dense(clients, d, r, n, "layer")

    def diagnostics_cost(self, r: int = 16, n: int = 10) -> dict:
        """``round_diagnostics`` after a FedIT round at the grid's shape (all layers, N clients)."""
        start, clients = self.inputs(r, n)
        strategy = get_strategy("fedit")
        state = strategy.init_state(start)
        updates = [ClientUpdate(client_id=k, adapter=a, num_samples=100 + k, scaling=state.scaling)
                   for k, a in enumerate(clients)]
        new, weights = strategy.aggregate(updates, state), strategy.weights(updates)
        res = self.time({"diagnostics": lambda: round_diagnostics(updates, weights, new)})["diagnostics"]
        return res | {"layers": self.cfg["layers"], "d": self.cfg["d"], "r": r, "N": n}


def fmt_s(row: dict, key: str = "median_s") -> str:
    if "error" in row:
        return "error"
    if "over_s" in row:
        return f"> {row['over_s']:.0f} s"
    v = row.get(key)
    if v is None:
        return "n/a"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def report(console: Console, out: dict) -> None:
    grid = [(p["r"], p["N"]) for p in out["factored_vs_dense"]] or sorted({(s["r"], s["N"]) for s in out["server"]})
    t = Table(title=f"server aggregate per round ({out['meta']['layers']} layers {out['meta']['d']}×{out['meta']['d']}, "
                    f"float32, {out['meta']['torch_threads']} threads), median")
    t.add_column("strategy")
    for r, n in grid:
        t.add_column(f"r={r} N={n}", justify="right")
    by = {(s["strategy"], s["r"], s["N"]): s for s in out["server"]}
    for name in sorted({s["strategy"] for s in out["server"]}):
        t.add_row(name, *[fmt_s(by[(name, r, n)]) if (name, r, n) in by else "skipped" for r, n in grid])
    console.print(t)

    if out["fedrot_client_alignment"]:
        t = Table(title="FedRot.before_upload as % of a FedIT aggregate (target ≤ 5%); clients align in parallel")
        for col in ("r", "N", "aligned", "all clients", "per client", "all: % of fedit", "per client: % of fedit"):
            t.add_column(col, justify="right")
        for a in out["fedrot_client_alignment"]:
            pct = a.get("pct_of_fedit_aggregate")
            per = a.get("per_client_pct_of_fedit_aggregate")
            t.add_row(str(a["r"]), str(a["N"]), a["factor"], fmt_s(a), fmt_s(a, "per_client_s"),
                      "n/a" if pct is None else f"{pct:.1f}%", "n/a" if per is None else f"{per:.1f}%")
        console.print(t)

    t = Table(title="one layer: factored_aggregate vs dense SVD of the formed sum (target ≥ 20× at d=1024 N=10 r=8)")
    for col in ("d", "r", "N", "factored", "dense (form + SVD)", "speed-up", "factored path"):
        t.add_column(col, justify="right")
    for p in [out["headline"]] + out["factored_vs_dense"]:
        t.add_row(str(p["d"]), str(p["r"]), str(p["N"]), fmt_s(p, "factored_s"), fmt_s(p, "dense_s"),
                  "n/a" if p["speedup"] is None else f"{p['speedup']:.1f}×", p["factored_path"])
    console.print(t)
    dg = out["diagnostics"]
    console.print(f"round_diagnostics ({dg['layers']} layers {dg['d']}×{dg['d']}, r={dg['r']}, N={dg['N']}): {fmt_s(dg)}")
    for note in out["meta"]["notes"]:
        console.print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and grid, a smoke check")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell after the warm-up (default 5)")
    ap.add_argument("--dense-repeats", type=int, default=3, help="cap on the dense-SVD runs per cell (default 3)")
    ap.add_argument("--cell-budget", type=float, default=4.0,
                    help="seconds a cell may take; slower cells get fewer runs (default 4)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for the whole run; later cells are skipped past it (default 540)")
    ap.add_argument("--max-cell", type=float, default=30.0,
                    help="a strategy whose one run takes longer is skipped at the larger grid points (default 30)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.dense_repeats = min(args.repeats, 2), min(args.dense_repeats, 2)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    console = Console()
    console.print(f"strategies: {', '.join(strategy_names())}")

    run = Run(args, cfg)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    headline = run.headline()
    diagnostics = run.diagnostics_cost()
    # cheapest grid points first, so the time budget, if it bites, cuts the slowest ones; the target
    # figures (FedIT, FedRot, factored vs dense) for the whole grid before the other strategies
    grid = sorted(((r, n) for r in cfg["ranks"] for n in cfg["clients"]), key=lambda rn: (rn[0] * rn[1], rn[0]))
    for r, n in grid:
        console.print(f"fedit, fedrot, factored vs dense: r={r} N={n} …")
        run.core_point(r, n)
    for r, n in grid:
        console.print(f"other strategies: r={r} N={n} …")
        run.strategy_point(r, n)

    notes = [f"median of up to {args.repeats} runs after one warm-up (dense SVD: up to {args.dense_repeats}); "
             f"cells slower than {args.cell_budget} s get fewer runs, 'runs' records how many",
             "ratios are measured side by side in the same run; other processes on the machine disturb absolute "
             "times more than the ratios",
             "client adapters are random full adapters (A, B and a classifier head) for every strategy"]
    slow = [f"{s['strategy']} r={s['r']} N={s['N']}" for s in run.server if "median_s" in s and s["runs"] == 0]
    if slow:
        notes.append(f"warm-up only (one run, over the cell budget): {', '.join(slow)}")
    stopped = [f"{s['strategy']} r={s['r']} N={s['N']}" for s in run.server if "over_s" in s]
    if stopped:
        notes.append(f"stopped after --max-cell {args.max_cell} s, no time: {', '.join(stopped)}")
    if run.skipped:
        notes.append(f"skipped (whole-run budget {args.budget} s, or a strategy over --max-cell): "
                     f"{', '.join(run.skipped)}")
    out = {
        "meta": {"command": " ".join(["python", *sys.argv]), "quick": args.quick, "layers": cfg["layers"],
                 "d": cfg["d"], "ranks": list(cfg["ranks"]), "clients": list(cfg["clients"]), "dtype": "float32",
                 "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                 "machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_start": load_start,
                 "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                 "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "wall_s": round(time.perf_counter() - run.start, 1), "strategies": strategy_names(), "notes": notes},
        "headline": headline,
        "diagnostics": diagnostics,
        "server": run.server,
        "fedrot_client_alignment": run.align,
        "factored_vs_dense": run.dense,
    }
    atomic_write(Path(args.out), json.dumps(out, indent=1) + "\n")
    report(console, out)
    console.print(f"wrote {args.out} ({out['meta']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
