"""Compare runs: a table of headline numbers and a plot of accuracy and aggregation error per round.

Reads only what runs write (``config.toml``, ``summary.json``, ``metrics.jsonl``), so it works on
finished, interrupted and resumed runs alike. A grid report (:func:`grid_report`) puts runs in one
row only when their configs have the same result settings (seeds apart), labels rows by the
settings in which they differ, and averages only runs that completed every round with readable
metrics; the others are listed apart with why.

The grid report's parts live beside it: ``run_results`` (what is read from one run, and its
numbers), ``grouping`` (which runs are one row, and its label), ``report_tables`` (summary.md's
markdown) and ``report_plots`` (its figures); ``alignment_report`` adds the FedRot section.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError
from fedlora.experiments.alignment_report import alignment_section
from fedlora.experiments.grouping import _collect
from fedlora.experiments.report_plots import _save_figure, _setting_plot
from fedlora.experiments.report_tables import _apart_section, _overview, _setting_table
from fedlora.experiments.run_results import _read_run, _read_summary


def compare_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run: strategy, status, best and final global accuracy, final personalised accuracy
    (weighted), mean relative aggregation error, uploaded MB, rounds completed (and set) and wall time."""
    out = []
    for d in run_dirs:
        s = _read_summary(Path(d))
        m = s.get("metric", "accuracy")
        out.append({
            "run": str(d), "strategy": s.get("strategy"), "status": s.get("status"), "rounds_total": s.get("rounds"),
            "best": s.get(f"best_{m}"), "final": s.get(f"final_{m}"),
            "personal": s.get(f"final_personal_{m}_weighted"),
            "agg_error_rel": s.get("mean_agg_error_rel"),
            "up_mb": s.get("bytes_up", 0) / 2**20, "rounds": s.get("rounds_completed"), "wall_s": s.get("wall_s"),
        })
    return out


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_comparison(rows: Sequence[dict[str, Any]], console=None) -> None:
    """Print the comparison as a rich table; with a status column when a run did not complete (its
    numbers are then those of the rounds it completed, ``rounds`` says how many of how many)."""
    from rich.console import Console
    from rich.table import Table

    unfinished = any(r.get("status") != "completed" for r in rows)
    table = Table("strategy", *(["status"] if unfinished else []), "best acc", "final acc", "personal", "agg.err",
                  "up MB", "rounds", "s", title="fedlora comparison")
    for r in rows:
        rounds = _fmt(r["rounds"], "d")
        if r.get("rounds_total") not in (None, r["rounds"]):
            rounds += f"/{r['rounds_total']}"
        table.add_row(str(r["strategy"]), *([str(r.get("status"))] if unfinished else []), _fmt(r["best"], ".4f"),
                      _fmt(r["final"], ".4f"), _fmt(r["personal"], ".4f"), _fmt(r["agg_error_rel"], ".2e"),
                      _fmt(r["up_mb"], ".2f"), rounds, _fmt(r["wall_s"], ".0f"))
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

def grid_report(root: str | Path | Sequence[str | Path], out: str | Path | None = None, *,
                say: Callable[[str], None] | None = None) -> Path:
    """Write ``summary.md`` (one table per setting folder, one row per set of result settings: mean ±
    population std over seeds) and one PNG per setting (``plots/<setting>.png``: accuracy,
    aggregation error on a log scale, basis overlap, rotation size) for every run under ``root`` (one
    folder, or several merged: settings of the same name become one table); with more than one
    setting, an overview table of best accuracies, and for a one-key numeric grid (``--grid
    lora.r=4,64,256``) ``plots/sweep.png``. Runs that cannot be averaged are listed apart in
    ``summary.md`` (and counted through ``say``). ``out`` (default: the single root) is where they
    go; returns the summary path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedlora.files import atomic_write

    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    if out is None:
        if len(roots) != 1:
            raise ConfigError(f"report: {len(roots)} folders given; say where the merged report goes (--output)")
        out = roots[0]
    out = Path(out)
    settings, apart = _collect(roots)
    labels = list(dict.fromkeys(r["label"] for runs in settings.values() for r in runs))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    lines = [f"# fedlora report: {', '.join(str(r) for r in roots)}", "",
             "Each cell is mean ± std over seeds; std is the population std (ddof = 0), as the papers' tables "
             "(methods-reference §3.3). Best: each run's best global metric over rounds, then mean ± std "
             "over seeds. Agg. error: mean over rounds of ‖Σ p_k ΔW_k − ΔW_global‖ / ‖Σ p_k ΔW_k‖. Basis "
             "overlap: mean over rounds of ‖Q_kᵀ Q_g‖_F / √r (client vs global B). Personalised: each "
             "client's own model on its held-out slice, weighted by slice size.", ""]
    if len(settings) > 1:
        lines += _overview(settings, out, colors)
    for setting, runs in settings.items():
        mine = [label for label in labels if any(r["label"] == label for r in runs)]
        lines += [f"## {setting}", "", *_setting_table(runs, mine)]
        slug = setting.replace("/", "__")
        plot = _setting_plot(setting, runs, colors, out / "plots" / f"{slug}.png")
        lines += ["", f"![{setting}]({plot.relative_to(out).as_posix()})", ""]
    lines += alignment_section(settings, out)  # FedRot's rounds split by the aligned factor; none without fedrot
    if apart:
        lines += _apart_section(apart)
        if say:
            say(f"{len(apart)} run(s) not included (unfinished, failed or unreadable): listed in {out / 'summary.md'}")
    path = out / "summary.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
