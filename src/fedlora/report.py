"""Compare runs: a table of headline numbers and a plot of accuracy and aggregation error per round.

Reads only what runs write (``summary.json``, ``metrics.jsonl``), so it works on finished,
interrupted and resumed runs alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError


def _read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = Path(run_dir)
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path / 'summary.json'}: cannot read the run's summary ({e})") from e
    rows = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return summary, rows


def compare_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run: strategy, best and final global accuracy, final personalised accuracy
    (weighted), mean relative aggregation error, uploaded MB, rounds and wall time."""
    out = []
    for d in run_dirs:
        s, _ = _read_run(d)
        m = s.get("metric", "accuracy")
        out.append({
            "run": str(d), "strategy": s.get("strategy"),
            "best": s.get(f"best_{m}"), "final": s.get(f"final_{m}"),
            "personal": s.get(f"final_personal_{m}_weighted"),
            "agg_error_rel": s.get("mean_agg_error_rel"),
            "up_mb": s.get("bytes_up", 0) / 2**20, "rounds": s.get("rounds_completed"), "wall_s": s.get("wall_s"),
        })
    return out


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_comparison(rows: Sequence[dict[str, Any]], console=None) -> None:
    """Print the comparison as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table("strategy", "best acc", "final acc", "personal", "agg.err", "up MB", "rounds", "s",
                  title="fedlora comparison")
    for r in rows:
        table.add_row(str(r["strategy"]), _fmt(r["best"], ".4f"), _fmt(r["final"], ".4f"), _fmt(r["personal"], ".4f"),
                      _fmt(r["agg_error_rel"], ".2e"), _fmt(r["up_mb"], ".2f"), _fmt(r["rounds"], "d"),
                      _fmt(r["wall_s"], ".0f"))
    console = console or Console()
    console.print(table)
    console.print("acc: global validation accuracy (best and final round); personal: each client's own model on "
                  "its held-out slice, weighted by slice size (final round); agg.err: mean over rounds of "
                  "‖Σ p_k ΔW_k − ΔW_global‖ / ‖Σ p_k ΔW_k‖")


def plot_runs(run_dirs: Sequence[str | Path], path: str | Path) -> Path:
    """Accuracy (global) and relative aggregation error against round, one line per run; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    for d in run_dirs:
        s, rows = _read_run(d)
        m = s.get("metric", "accuracy")
        label = s.get("strategy") or Path(d).name
        acc = [(r["round"] + 1, r["eval"]["global"][m]) for r in rows if r.get("eval")]
        err = [(r["round"] + 1, r["diagnostics"]["agg_error_rel"]) for r in rows
               if r.get("diagnostics") and r["diagnostics"].get("agg_error_rel") is not None]
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", label=label)
        if err:
            ax_err.plot(*zip(*err), marker="o", label=label)
    ax_acc.set(xlabel="round", ylabel="global validation accuracy", title="Accuracy")
    ax_err.set(xlabel="round", ylabel="‖ΔW* − ΔW_global‖ / ‖ΔW*‖", title="Relative aggregation error")
    ax_err.set_yscale("log")
    for ax in (ax_acc, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


# ---- grid reports (``fedlora report DIR``) ---------------------------------------------------------

def _save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    # population std (ddof=0), as the papers' tables (methods-reference §3.3)
    import numpy as np

    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals, ddof=0))) if vals else None


def _series(rows: Sequence[dict[str, Any]], get) -> list[tuple[int, float]]:
    out = []
    for r in rows:
        try:
            v = get(r)
        except (KeyError, TypeError):
            continue
        if v is not None:
            out.append((r["round"] + 1, float(v)))
    return out


def run_stats(run_dir: str | Path) -> dict[str, Any]:
    """One run's numbers for the grid table: best (the engine's best over rounds: max for accuracy),
    final and mean-of-last-5 global metric, mean relative aggregation error, bytes (up + down) per
    round, wall time; and its per-round series (metric, agg_error_rel, basis_overlap, rotation_size)."""
    s, rows = _read_run(run_dir)
    m = s.get("metric", "accuracy")
    acc = _series(rows, lambda r: r["eval"]["global"][m])
    rounds = s.get("rounds_completed") or len(rows)
    return {
        "metric": m, "strategy": s.get("strategy"), "status": s.get("status"),
        "best": s.get(f"best_{m}"), "final": s.get(f"final_{m}"),
        "last5": sum(v for _, v in acc[-5:]) / len(acc[-5:]) if acc else None,
        "agg_error_rel": s.get("mean_agg_error_rel"),
        "bytes_per_round": (s.get("bytes_up", 0) + s.get("bytes_down", 0)) / rounds if rounds else None,
        "wall_s": s.get("wall_s"),
        "series": {
            m: acc,
            "agg_error_rel": _series(rows, lambda r: r["diagnostics"]["agg_error_rel"]),
            "basis_overlap": _series(rows, lambda r: r["diagnostics"]["basis_overlap"]),
            "rotation_size": _series(rows, lambda r: r["diagnostics"]["rotation_size_mean"]),
        },
    }


TABLE_COLUMNS = [("best", "best {m} (max over rounds)", ".4f"), ("final", "final {m}", ".4f"),
                 ("last5", "mean last 5 rounds", ".4f"), ("agg_error_rel", "mean rel. agg. error", ".2e"),
                 ("bytes_per_round", "MB / round (up+down)", ".3f"), ("wall_s", "wall s", ".0f")]


def _cell(stat: tuple[float, float] | None, spec: str, scale: float = 1.0) -> str:
    return "—" if stat is None else f"{format(stat[0] * scale, spec)} ± {format(stat[1] * scale, spec)}"


def _band_plot(ax, runs: Sequence[dict[str, Any]], key: str, colors: dict[str, Any]) -> bool:
    """Mean over seeds with a ±1 population-std band, one line per strategy (its colour the same in
    every panel), on the rounds every seed has."""
    import numpy as np

    drew = False
    by_strategy: dict[str, list[dict[int, float]]] = {}
    for r in runs:
        series = dict(r["series"][key])
        if series:
            by_strategy.setdefault(r["strategy"], []).append(series)
    for strategy, seeds in by_strategy.items():
        common = sorted(set.intersection(*(set(s) for s in seeds)))
        if not common:
            continue
        vals = np.array([[s[t] for t in common] for s in seeds])
        mean, std = vals.mean(0), vals.std(0, ddof=0)
        ax.plot(common, mean, marker="o", markersize=3, color=colors[strategy], label=f"{strategy} (n={len(seeds)})")
        ax.fill_between(common, mean - std, mean + std, color=colors[strategy], alpha=0.2)
        drew = True
    return drew


def grid_report(root: str | Path) -> Path:
    """Write ``root/summary.md`` (one table per setting: mean ± population std over seeds) and one PNG
    per setting (``root/plots/<setting>.png``: accuracy, aggregation error on a log scale, basis
    overlap, rotation size) for every run under ``root``; returns the summary path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from fedlora.experiments import find_runs
    from fedlora.sim.rundir import atomic_write

    root = Path(root)
    found = find_runs(root)
    if not found:
        raise ConfigError(f"{str(root)!r}: no run directories (summary.json) under it")
    settings: dict[str, list[dict[str, Any]]] = {}
    for f in found:
        st = run_stats(f["run_dir"])
        st.update(seed=f["seed"], run_dir=f["run_dir"])
        st["strategy"] = f["strategy"] or st["strategy"]
        settings.setdefault(f["setting"], []).append(st)
    lines = [f"# fedlora report: {root}", "",
             "Each cell is mean ± std over seeds; std is the population std (ddof = 0), as the papers' tables "
             "(methods-reference §3.3). Best: each run's best global metric over rounds, then mean ± std "
             "over seeds. Agg. error: mean over rounds of ‖Σ p_k ΔW_k − ΔW_global‖ / ‖Σ p_k ΔW_k‖.", ""]
    for setting, runs in settings.items():
        m = runs[0]["metric"]
        lines += [f"## {setting}", "",
                  "| strategy | seeds | " + " | ".join(h.format(m=m) for _, h, _ in TABLE_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(TABLE_COLUMNS)]
        strategies = list(dict.fromkeys(r["strategy"] for r in runs))
        for strategy in strategies:
            mine = [r for r in runs if r["strategy"] == strategy]
            seeds = ",".join(str(r["seed"]) for r in mine if r["seed"] is not None) or str(len(mine))
            unfinished = sum(r["status"] != "completed" for r in mine)
            cells = [_cell(_mean_std([r[k] for r in mine]), spec, 2**-20 if k == "bytes_per_round" else 1.0)
                     for k, _, spec in TABLE_COLUMNS]
            name = strategy + (f" ({unfinished} unfinished)" if unfinished else "")
            lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {st: cycle[i % len(cycle)] for i, st in enumerate(strategies)}
        panels = [(m, f"global validation {m}", "linear"), ("agg_error_rel", "relative aggregation error", "log"),
                  ("basis_overlap", "basis overlap (client vs global)", "linear"),
                  ("rotation_size", "rotation size ‖R − I‖_F (fedrot)", "linear")]
        for ax, (key, title, scale) in zip(axes.flat, panels):
            if _band_plot(ax, runs, key, colors):
                ax.legend(fontsize=8)
                ax.set_yscale(scale)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel="round", title=title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        fig.suptitle(f"{setting}: mean ± std over seeds")
        fig.tight_layout()
        slug = setting.replace("/", "__")
        plot = _save_figure(fig, root / "plots" / f"{slug}.png")
        lines += ["", f"![{setting}]({plot.relative_to(root).as_posix()})", ""]
    out = root / "summary.md"
    atomic_write(out, "\n".join(lines) + "\n")
    return out
