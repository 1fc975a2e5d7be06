"""The grid report's markdown: one table per setting folder, the overview of every setting, and
the list of runs left out; each cell is mean ± population std over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.experiments.report_plots import _sweep_plot
from fedlora.experiments.run_results import _mean_std


#: the grid table's columns: key in :func:`~fedlora.experiments.run_results.run_stats`, header, format, and
#: whether it is shown only when some run of the setting has a value (the personalised and FedRot-only columns)
TABLE_COLUMNS = [("best", "best {m} (max over rounds)", ".4f", False), ("final", "final {m}", ".4f", False),
                 ("last5", "mean last 5 rounds", ".4f", False), ("agg_error_rel", "mean rel. agg. error", ".2e", False),
                 ("overlap", "mean basis overlap", ".4f", True), ("rotation", "mean ‖R − I‖_F", ".3f", True),
                 ("personal_best", "best personalised {m} (w)", ".4f", True),
                 ("personal_final", "final personalised {m} (w)", ".4f", True),
                 ("epsilon", "ε (DP)", ".3f", True), ("sigma", "noise σ (DP)", ".3f", True),
                 ("bytes_per_round", "MB / round (up+down)", ".3f", False), ("wall_s", "wall s", ".0f", False)]


def _cell(stat: tuple[float, float] | None, spec: str, scale: float = 1.0) -> str:
    return "—" if stat is None else f"{format(stat[0] * scale, spec)} ± {format(stat[1] * scale, spec)}"


def _apart_section(apart: Sequence[dict[str, Any]]) -> list[str]:
    """summary.md's list of the runs in no table or plot, each with its folder, label and why."""
    def cell(text: Any) -> str:  # one markdown table cell, whatever an error message holds
        return " ".join(str(text).split()).replace("|", "\\|")

    return ["## Runs not included", "",
            "These runs are in no table or plot above: only runs that completed every round they were set to "
            "run, with readable metrics, are averaged.", "",
            "| run | setting | why |", "|---|---|---|",
            *(f"| {cell(r['run_dir'])} | {cell(r['label'])} | {cell(r['why'])} |" for r in apart), ""]


def _setting_table(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[str]:
    m = runs[0]["metric"]
    cols = [c for c in TABLE_COLUMNS if not c[3] or any(r[c[0]] is not None for r in runs)]
    lines = ["| strategy | seeds | " + " | ".join(h.format(m=m) for _, h, _, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        seeds = ",".join(str(r["seed"]) for r in mine if r["seed"] is not None) or str(len(mine))
        cells = [_cell(_mean_std([r[k] for r in mine]), spec, 2**-20 if k == "bytes_per_round" else 1.0)
                 for k, _, spec, _ in cols]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _sweep_axis(settings: Sequence[str]) -> tuple[str, list[float]] | None:
    """When every setting is one ``key-number`` of the same key (``r-4``, ``r-64``…), the key and
    the numbers; else None."""
    import re

    keys, values = set(), []
    for s in settings:
        m = re.fullmatch(r"([A-Za-z_]+)-(-?[\d.]+(?:e[-+]?\d+)?)", s)
        if not m:
            return None
        keys.add(m.group(1))
        values.append(float(m.group(2)))
    return (keys.pop(), values) if len(keys) == 1 and len(settings) > 1 else None


def _overview(settings: dict[str, list[dict[str, Any]]], out: Path, colors: dict[str, Any]) -> list[str]:
    """One table of every label × setting (best global, and best personalised where there is one),
    and, for a one-key numeric grid, ``plots/sweep.png``: the best metric against the key's value."""
    labels = list(dict.fromkeys(r["label"] for runs in settings.values() for r in runs))
    names = list(settings)
    axis = _sweep_axis(names)
    if axis:  # numeric settings in numeric order (r-4, r-64, r-256), not in folder order
        names = [n for _, n in sorted(zip(axis[1], names))]
        axis = (axis[0], sorted(axis[1]))
    m = next(iter(settings.values()))[0]["metric"]
    lines = ["## Overview", "",
             f"Best {m} (max over rounds, mean ± std over seeds); in brackets, the best personalised {m} "
             "where the runs have one.", "",
             "| strategy | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        cells = []
        for name in names:
            mine = [r for r in settings[name] if r["label"] == label]
            best, pers = _mean_std([r["best"] for r in mine]), _mean_std([r["personal_best"] for r in mine])
            cells.append(_cell(best, ".4f") + (f" [{_cell(pers, '.4f')}]" if pers else "") if mine else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if axis:
        key, values = axis  # in the same (numeric) order as names
        plot = _sweep_plot(settings, labels, names, key, values, colors, out / "plots" / "sweep.png")
        lines += [f"![best {m} against {key}]({plot.relative_to(out).as_posix()})", ""]
    return lines
