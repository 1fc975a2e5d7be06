"""Compare runs: a table of headline numbers and a plot of accuracy and aggregation error per round.

Reads only what runs write (``config.toml``, ``summary.json``, ``metrics.jsonl``), so it works on
finished, interrupted and resumed runs alike. A grid report (:func:`grid_report`) puts runs in one
row only when their configs have the same result settings (seeds apart), labels rows by the
settings in which they differ, and averages only runs that completed every round with readable
metrics; the others are listed apart with why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import NEUTRAL_KEYS, RunConfig, fingerprint, load_config, result_settings
from fedlora.errors import ConfigError

#: what one row of a grid report averages over: the seeds, besides the settings that change nothing
REPORT_IGNORE = NEUTRAL_KEYS | {"run.seed"}


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"{path}: cannot read the run's summary ({e})") from e
    if not isinstance(summary, dict):
        raise ConfigError(f"{path}: cannot read the run's summary (not a JSON object)")
    return summary


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of a run's metrics.jsonl, and what is wrong with the file, in words (None when
    nothing is), read by the same rules as a resume (:meth:`fedlora.runtime.rundir.RunDir.read_metrics`):
    a torn last line is left out, any other damaged or out-of-order row is a problem naming its
    line. A missing file gives no rows and no problem: whether rows were due is for the caller."""
    from fedlora.runtime.rundir import RunDir

    try:
        return RunDir(Path(run_dir)).read_metrics(), None
    except ConfigError as e:
        return [], str(e)
    except OSError as e:
        return [], f"metrics.jsonl cannot be read ({e})"


def _read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's summary and metrics rows; ConfigError (naming the file and line) when either is unreadable."""
    path = Path(run_dir)
    summary = _read_summary(path)
    rows, problem = read_metrics(path)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return summary, rows


def _check_run(run_dir: Path, rounds: int | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """A run's summary and metrics rows, and why its numbers cannot be averaged (None when they can):
    no summary yet, a status other than completed, fewer rounds than it was set to run (``rounds``
    from its config when the summary does not say), or metrics that are unreadable or do not hold
    every round the summary counts."""
    if not (run_dir / "summary.json").is_file():
        return None, [], "no summary.json: still running, or killed before it wrote one"
    try:
        summary = _read_summary(run_dir)
    except ConfigError as e:
        return None, [], f"summary.json cannot be read ({e.__cause__ or 'not a JSON object'})"
    done, total = summary.get("rounds_completed"), summary.get("rounds", rounds)
    if summary.get("status") != "completed":
        return summary, [], f"{summary.get('status')} (after {done} of {total} rounds)"
    if not isinstance(done, int) or done != total:
        return summary, [], f"completed {done} of {total} rounds"
    rows, problem = read_metrics(run_dir)
    if problem is None and [r["round"] for r in rows] != list(range(done)):
        problem = (f"metrics.jsonl holds {len(rows)} of the {done} rounds summary.json says were completed"
                   if (run_dir / "metrics.jsonl").is_file() else
                   f"metrics.jsonl is missing, but summary.json says {done} rounds were completed")
    return summary, rows, problem


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

def _save_figure(fig, path: str | Path) -> Path:
    """Write a pyplot figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from fedlora.files import atomic_figure

    try:
        return atomic_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


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


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_stats(run_dir: str | Path) -> dict[str, Any]:
    """One run's numbers for the grid table: best (the engine's best over rounds: max for accuracy),
    final and mean-of-last-5 global metric, mean relative aggregation error, mean basis overlap, mean
    FedRot rotation size, best and final personalised metric (weighted; None without a personalised
    evaluation), bytes (up + down) per round, wall time; and the per-round series behind them.
    ConfigError when its summary or metrics cannot be read."""
    return _stats(*_read_run(run_dir))


def _stats(s: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`run_stats` from a run's summary and metrics rows."""
    m = s.get("metric", "accuracy")
    acc = _series(rows, lambda r: r["eval"]["global"][m])
    personal = _series(rows, lambda r: r["eval"]["personal"][f"{m}_weighted"])
    series = {
        m: acc,
        f"personal_{m}": personal,
        "agg_error_rel": _series(rows, lambda r: r["diagnostics"]["agg_error_rel"]),
        "basis_overlap": _series(rows, lambda r: r["diagnostics"]["basis_overlap"]),
        "rotation_size": _series(rows, lambda r: r["diagnostics"]["rotation_size_mean"]),
    }
    rounds = s.get("rounds_completed") or len(rows)
    return {
        "metric": m, "strategy": s.get("strategy"), "status": s.get("status"),
        "best": s.get(f"best_{m}"), "final": s.get(f"final_{m}"),
        "last5": _mean([v for _, v in acc[-5:]]),
        "agg_error_rel": s.get("mean_agg_error_rel"),
        "overlap": _mean([v for _, v in series["basis_overlap"]]),
        "rotation": _mean([v for _, v in series["rotation_size"]]),
        "personal_best": s.get(f"best_personal_{m}_weighted"),
        "personal_final": s.get(f"final_personal_{m}_weighted"),
        "bytes_per_round": (s.get("bytes_up", 0) + s.get("bytes_down", 0)) / rounds if rounds else None,
        "wall_s": s.get("wall_s"),
        "series": series,
    }


#: the grid table's columns: key in :func:`run_stats`, header, format, and whether it is shown only
#: when some run of the setting has a value (the personalised and FedRot-only columns)
TABLE_COLUMNS = [("best", "best {m} (max over rounds)", ".4f", False), ("final", "final {m}", ".4f", False),
                 ("last5", "mean last 5 rounds", ".4f", False), ("agg_error_rel", "mean rel. agg. error", ".2e", False),
                 ("overlap", "mean basis overlap", ".4f", True), ("rotation", "mean ‖R − I‖_F", ".3f", True),
                 ("personal_best", "best personalised {m} (w)", ".4f", True),
                 ("personal_final", "final personalised {m} (w)", ".4f", True),
                 ("bytes_per_round", "MB / round (up+down)", ".3f", False), ("wall_s", "wall s", ".0f", False)]


def _cell(stat: tuple[float, float] | None, spec: str, scale: float = 1.0) -> str:
    return "—" if stat is None else f"{format(stat[0] * scale, spec)} ± {format(stat[1] * scale, spec)}"


def _band_plot(ax, runs: Sequence[dict[str, Any]], key: str, colors: dict[str, Any]) -> bool:
    """Mean over seeds with a ±1 population-std band, one line per strategy label (its colour the
    same in every panel), on the rounds every seed has."""
    import numpy as np

    drew = False
    by_label: dict[str, list[dict[int, float]]] = {}
    for r in runs:
        series = dict(r["series"][key])
        if series:
            by_label.setdefault(r["label"], []).append(series)
    for label, seeds in by_label.items():
        common = sorted(set.intersection(*(set(s) for s in seeds)))
        if not common:
            continue
        vals = np.array([[s[t] for t in common] for s in seeds])
        mean, std = vals.mean(0), vals.std(0, ddof=0)
        ax.plot(common, mean, marker="o", markersize=3, color=colors[label], label=f"{label} (n={len(seeds)})")
        ax.fill_between(common, mean - std, mean + std, color=colors[label], alpha=0.2)
        drew = True
    return drew


def run_label(cfg: RunConfig, setting: str, varying: Collection[str] = ()) -> str:
    """The strategy's name, then in brackets its options, except those the setting's folder name
    already says (``fedsa[rslora=true]`` beside ``fedsa``, but ``fedrot``, not ``fedrot[lam=0.2]``,
    under the setting ``lam-0.2``), and every ``varying`` key its config sets
    (``fedit[train.lr=0.001]``)."""
    from fedlora.experiments.grid import _slug

    named = set(setting.split("_"))
    extra = []
    settings = result_settings(cfg, REPORT_IGNORE)
    for key in sorted(settings, key=lambda k: (not k.startswith("strategy.options."), k)):
        name, text = key.removeprefix("strategy.options."), _toml_text(settings[key])
        if key in varying or (name != key and _slug(name, text) not in named):
            extra.append(f"{name}={text}")
    return f"{cfg.strategy.name}[{','.join(extra)}]" if extra else cfg.strategy.name


def _toml_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _varying_keys(runs: Sequence[dict[str, Any]]) -> set[str]:
    """The result settings (seeds and the strategy's name apart) in which runs of one setting folder
    differ: what the labels must show to tell that folder's rows apart. A key is shown in every
    label that has it, so a row keeps its label across the folders of a grid."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["cfg"] is not None:
            by_setting.setdefault(r["setting"], []).append(result_settings(r["cfg"], REPORT_IGNORE))
    out = set()
    for flats in by_setting.values():
        out |= {k for k in set().union(*flats) if any(f.get(k) != flats[0].get(k) for f in flats)}
    return out - {"strategy.name"}


def _collect(roots: Sequence[Path]) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """``(settings, apart)`` for the runs under ``roots``. ``settings``: setting folder name → the
    stats (with seed, run_dir and label) of its runs that can be averaged; a setting of the same name
    in two roots is one setting, and within it one label is one set of result settings. ``apart``:
    the other runs (unfinished, failed, unreadable), each with its run_dir, label and ``why``."""
    from fedlora.experiments.grid import find_runs

    runs = []
    for root in roots:
        found = find_runs(root)
        if not found:
            raise ConfigError(f"{str(root)!r}: no run directories (summary.json or config.toml) under it")
        for f in found:
            d, cfg, why = f["run_dir"], None, None
            try:
                cfg = load_config(d / "config.toml")
            except ConfigError as e:  # its settings are unknown, so it cannot be put in any row
                why = f"config.toml cannot be read ({e})"
            summary, rows, problem = _check_run(d, cfg.train.rounds if cfg else None)
            strategy = cfg.strategy.name if cfg else f["strategy"] or (summary or {}).get("strategy") or "?"
            runs.append({**f, "cfg": cfg, "strategy": strategy, "why": problem or why,
                         "stats": None if problem or why else _stats(summary, rows)})
    # the keys that tell the averaged rows apart; a run listed apart may differ in more (e.g. fail_fast)
    varying_ok = _varying_keys([r for r in runs if not r["why"]])
    varying_all = _varying_keys(runs)
    first_fingerprint: dict[tuple[str, str], str] = {}
    settings: dict[str, list[dict[str, Any]]] = {}
    apart = []
    for r in runs:
        r["label"] = r["strategy"]
        if r["cfg"] is not None:
            r["label"] = run_label(r["cfg"], r["setting"], varying_all if r["why"] else varying_ok)
            fp = fingerprint(r["cfg"], REPORT_IGNORE)
            # other settings whose values print alike (the text "1" and the number 1) still get their own row
            if first_fingerprint.setdefault((r["setting"], r["label"]), fp) != fp:
                r["label"] += f" #{fp[:8]}"
        if r["why"]:
            apart.append(r)
        else:
            settings.setdefault(r["setting"], []).append(
                {**r["stats"], "strategy": r["strategy"], "seed": r["seed"], "run_dir": r["run_dir"], "label": r["label"],
                 "cfg": r["cfg"]})
    return settings, apart


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
    import matplotlib.pyplot as plt

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
        has_personal = any(r["personal_best"] is not None for runs in settings.values() for r in runs)
        fig, axes = plt.subplots(1, 2 if has_personal else 1, figsize=(11 if has_personal else 6, 4), squeeze=False)
        for ax, field, title in zip(axes[0], ("best", "personal_best"), (f"best global {m}", f"best personalised {m}")):
            for label in labels:
                pts = [(x, _mean_std([r[field] for r in settings[name] if r["label"] == label]))
                       for x, name in zip(values, names)]
                pts = [(x, st) for x, st in pts if st]
                if pts:
                    ax.errorbar([x for x, _ in pts], [st[0] for _, st in pts], yerr=[st[1] for _, st in pts],
                                marker="o", capsize=3, color=colors[label], label=label)
            ax.set(xlabel=key, title=f"{title} (mean ± std over seeds)")
            if min(values) > 0 and max(values) / min(values) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        plot = _save_figure(fig, out / "plots" / "sweep.png")
        lines += [f"![best {m} against {key}]({plot.relative_to(out).as_posix()})", ""]
    return lines


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
    from matplotlib.ticker import MaxNLocator

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
        m = runs[0]["metric"]
        mine = [label for label in labels if any(r["label"] == label for r in runs)]
        lines += [f"## {setting}", "", *_setting_table(runs, mine)]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        panels = [(m, f"global validation {m}", "linear"), ("agg_error_rel", "relative aggregation error", "log"),
                  ("basis_overlap", "basis overlap (client vs global)", "linear"),
                  ("rotation_size", "rotation size ‖R − I‖_F (fedrot)", "linear")]
        if not any(r["series"]["rotation_size"] for r in runs) and any(r["series"][f"personal_{m}"] for r in runs):
            panels[3] = (f"personal_{m}", f"personalised {m} (weighted)", "linear")
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
        plot = _save_figure(fig, out / "plots" / f"{slug}.png")
        lines += ["", f"![{setting}]({plot.relative_to(out).as_posix()})", ""]
    from fedlora.experiments.alignment_report import alignment_section  # here: it imports this module

    lines += alignment_section(settings, out)  # FedRot's rounds split by the aligned factor; none without fedrot
    if apart:
        lines += _apart_section(apart)
        if say:
            say(f"{len(apart)} run(s) not included (unfinished, failed or unreadable): listed in {out / 'summary.md'}")
    path = out / "summary.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
