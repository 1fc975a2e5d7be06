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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
