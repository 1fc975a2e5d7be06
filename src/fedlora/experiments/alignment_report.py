"""The per-factor aggregation-error report of a grid holding FedRot runs (issue 14).

FedRot-LoRA aligns one factor per round: A in odd rounds, B in even rounds ≥ 2 (``align="alternate"``,
methods-reference §1.2), or always A, always B, or both at once (``align="joint"``). Whether it
reduces the aggregation error E = Σ p_k B_k A_k − B̄Ā (§1.1) may depend on which factor was matched,
so every round is put in a class: "0" (round 0: nothing is aligned, in any method), or the factor
the run's clients reported aligned (``diagnostics.aligned``). A run that aligned nothing (fedit, any
other strategy) takes the class alternate FedRot would give the round, A for odd t and B for even
t ≥ 2, so that fedit's odd rounds are compared with FedRot's A-aligned ones. Rounds are counted
from 0, as metrics.jsonl's ``round`` and FedRot's schedule count them.

For every variant (one row of the grid report: a setting folder and a label) and class: the mean
relative and absolute aggregation error over the class's rounds, and the mean ‖R − I‖_F; for every
variant that is not fedit, fedit's error over its own, paired by seed and round with the fedit run
of the same settings (strategy options apart): the mean over rounds of the per-round ratio, and the
ratio of the means over rounds. Each is computed per seed, then mean ± population std over seeds.

Only the runs the grid report averages (completed, readable) are used; their rows are read with
:func:`fedlora.experiments.run_results.read_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.config import fingerprint, result_settings
from fedlora.errors import ConfigError
from fedlora.experiments.grouping import REPORT_IGNORE, _toml_text, _varying_keys
from fedlora.experiments.report_plots import _save_figure
from fedlora.experiments.report_tables import _cell
from fedlora.experiments.run_results import _mean, _mean_std, read_metrics

#: round classes in table order: what each is called in a run that aligns (FedRot) and in one that
#: does not (classed by the schedule's parity), and its plot marker
CLASSES = {"0": ("round 0 (none aligned)", "round 0", "x"), "A": ("A-aligned", "odd t (FedRot's A rounds)", "o"),
           "B": ("B-aligned", "even t ≥ 2 (FedRot's B rounds)", "s"), "joint": ("joint", "—", "^")}
#: the errors a row carries: diagnostics key, table header
ERRORS = [("agg_error_rel", "rel."), ("agg_error", "abs.")]


def round_class(row: dict[str, Any]) -> str:
    """A metrics row's class: "0" for round 0, the factor its clients aligned ("A", "B", "joint"),
    and for a round that aligned nothing the factor of alternate FedRot's schedule (A in odd rounds,
    B in even rounds ≥ 2, methods-reference §1.2)."""
    t = row["round"]
    if t == 0:
        return "0"
    aligned = (row.get("diagnostics") or {}).get("aligned")
    return str(aligned) if aligned else ("A" if t % 2 == 1 else "B")


def run_rounds(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """round → {"class", "agg_error_rel", "agg_error", "rotation"} for every round of a run with
    diagnostics (a secure-aggregation round has none); ConfigError naming the file when its
    metrics cannot be read."""
    rows, problem = read_metrics(run_dir)
    if problem:
        raise ConfigError(f"{run_dir}: {problem}")
    out = {}
    for row in rows:
        d = row.get("diagnostics")
        if d:
            out[row["round"]] = {"class": round_class(row), "aligned": d.get("aligned") is not None,
                                 "agg_error_rel": d.get("agg_error_rel"), "agg_error": d.get("agg_error"),
                                 "rotation": d.get("rotation_size_mean")}
    return out


def _class_name(c: str, runs: Sequence[dict[str, Any]]) -> str:
    """Class ``c``'s name for a variant: by the factor when its runs aligned any round, else by parity."""
    aligns = any(x["aligned"] for r in runs for x in r["rounds"].values())
    return CLASSES[c][0 if aligns else 1]


def _pair_key(cfg) -> str:
    """What a run must share with its fedit partner: every result setting but the strategy's name and
    the options fedit does not take (λ, align, gauge); the seed is matched apart."""
    from fedlora.strategies.registry import strategy_options

    fedit_options = {f"strategy.options.{o}" for o in strategy_options("fedit")}
    own = {k for k in result_settings(cfg) if k.startswith("strategy.options.") and k not in fedit_options}
    return fingerprint(cfg, REPORT_IGNORE | {"strategy.name"} | own)


def _variant_label(cfg, varying: set[str]) -> str:
    """The strategy's name and, in brackets, the result settings that differ between the section's
    runs (``fedrot[align=A,lam=1.0]``); options shown by their bare name."""
    settings = result_settings(cfg, REPORT_IGNORE)
    extra = [f"{k.removeprefix('strategy.options.')}={_toml_text(v)}"
             for k, v in sorted(settings.items(), key=lambda kv: (not kv[0].startswith("strategy.options."), kv[0]))
             if k in varying]
    return f"{cfg.strategy.name}[{','.join(extra)}]" if extra else cfg.strategy.name


def _variants(settings: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """label → its runs, each with seed, strategy, the pairing key and its rounds; fedit first."""
    runs = [r for group in settings.values() for r in group]
    # one pseudo-folder: the keys that differ anywhere in the grid, not only within a setting folder
    varying = _varying_keys([{"cfg": r["cfg"], "setting": ""} for r in runs])
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r["strategy"] != "fedit"):  # stable: grid order otherwise
        out.setdefault(_variant_label(r["cfg"], varying), []).append(
            {"seed": r["seed"], "strategy": r["strategy"], "pair": _pair_key(r["cfg"]), "rounds": run_rounds(r["run_dir"])})
    return out


def _per_class(rounds: dict[int, dict[str, Any]], get) -> dict[str, list[float]]:
    """class → the values ``get(round record)`` of its rounds, rounds in order, Nones left out."""
    out: dict[str, list[float]] = {}
    for t in sorted(rounds):
        v = get(rounds[t])
        if v is not None:
            out.setdefault(rounds[t]["class"], []).append(float(v))
    return out


def paired_ratios(mine: dict[int, dict[str, Any]], fedit: dict[int, dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Per class of ``mine``'s rounds: fedit's error over this run's, round by round on the rounds
    both have (and where this run's error is not zero): {"per_round": [(t, ratio)], "mean_ratio": mean
    of the per-round ratios, "ratio_of_means": mean fedit error / mean error over those rounds}."""
    out: dict[str, dict[str, Any]] = {}
    for t in sorted(set(mine) & set(fedit)):
        a, b = fedit[t][key], mine[t][key]
        if a is None or not b:
            continue
        c = out.setdefault(mine[t]["class"], {"per_round": [], "fedit": [], "mine": []})
        c["per_round"].append((t, a / b))
        c["fedit"].append(a)
        c["mine"].append(b)
    for c in out.values():
        c["mean_ratio"] = _mean([x for _, x in c["per_round"]])
        c["ratio_of_means"] = _mean(c["fedit"]) / _mean(c["mine"])
    return out


def alignment_section(settings: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    """summary.md's "Aggregation error by aligned factor" section and ``plots/aligned-factor.png``
    for the averaged runs of a grid (``settings`` as :func:`fedlora.experiments.grouping._collect` gives them);
    no lines when the grid holds no fedrot run."""
    if not any(r["strategy"] == "fedrot" for group in settings.values() for r in group):
        return []
    variants = _variants(settings)
    fedit = {}  # (pairing key, seed) → rounds; equal settings and seed give the same run, so the first serves
    for runs in variants.values():
        for r in runs:
            if r["strategy"] == "fedit":
                fedit.setdefault((r["pair"], r["seed"]), r["rounds"])
    lines = ["## Aggregation error by aligned factor", "",
             "Rounds t count from 0. Each round is classed by the factor FedRot aligned in it (A, B, or both at "
             "once: joint); a run that aligned nothing (fedit) is classed by alternate FedRot's schedule: A for "
             "odd t, B for even t ≥ 2. Round 0 aligns nothing in any method. Per seed, the mean over the "
             "class's rounds; then mean ± population std over seeds. Rel.: ‖ΔW* − ΔW_g‖ / ‖ΔW*‖; abs.: "
             "‖ΔW* − ΔW_g‖ (over all layers).", "",
             "| variant | rounds | rounds per seed | seeds | mean rel. agg. error | mean abs. agg. error | mean ‖R − I‖_F |",
             "|---|---|---|---|---|---|---|"]
    ratio_lines = []
    ratios_by_variant: dict[str, list[dict[str, dict[str, Any]]]] = {}
    for label, runs in variants.items():
        per_run = [{key: _per_class(r["rounds"], lambda x, key=key: x[key]) for key in ("agg_error_rel", "agg_error", "rotation")}
                   for r in runs]
        seeds = ",".join(str(r["seed"]) for r in runs)
        for c in CLASSES:
            counts = {len(p["agg_error_rel"].get(c, [])) for p in per_run}
            if counts == {0}:
                continue
            cells = [_cell(_mean_std([_mean(p[key].get(c, [])) for p in per_run]), spec)
                     for key, spec in (("agg_error_rel", ".3e"), ("agg_error", ".3e"), ("rotation", ".3f"))]
            lines.append(f"| {label} | {_class_name(c, runs)} | {'/'.join(str(n) for n in sorted(counts))} | {seeds} | "
                         + " | ".join(cells) + " |")
        if all(r["strategy"] == "fedit" for r in runs):
            continue
        paired = [(r["seed"], {key: paired_ratios(r["rounds"], fedit[(r["pair"], r["seed"])], key) for key, _ in ERRORS})
                  for r in runs if (r["pair"], r["seed"]) in fedit]
        ratios_by_variant[label] = [p for _, p in paired]
        for c in CLASSES:
            if not any(c in p["agg_error_rel"] for _, p in paired):
                continue
            cells = [_cell(_mean_std([p[key][c][stat] for _, p in paired if c in p[key]]), ".3f")
                     for key, _ in ERRORS for stat in ("mean_ratio", "ratio_of_means")]
            seeds = ",".join(str(s) for s, p in paired if c in p["agg_error_rel"])
            ratio_lines.append(f"| {label} | {_class_name(c, runs)} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    if ratio_lines:
        lines += ["fedit's error over each variant's (> 1: the variant's error is smaller), paired with the fedit run "
                  "of the same settings and seed, round by round; per seed the mean over the class's rounds of the "
                  "per-round ratio, and the ratio of the two means over those rounds; then mean ± population std "
                  "over the paired seeds.", "",
                  "| variant | rounds | seeds paired | rel.: mean of per-round ratios | rel.: ratio of means | "
                  "abs.: mean of per-round ratios | abs.: ratio of means |", "|---|---|---|---|---|---|---|",
                  *ratio_lines, ""]
    plot = _plot(variants, ratios_by_variant, out / "plots" / "aligned-factor.png")
    lines += [f"![aggregation error by aligned factor]({plot.relative_to(out).as_posix()})", ""]
    return lines


def _plot(variants: dict[str, list[dict[str, Any]]], ratios: dict[str, list[dict[str, dict[str, Any]]]], path: Path) -> Path:
    """Left: relative aggregation error per round (mean over seeds, log scale), one line per variant,
    its rounds marked by class. Right: fedit's relative error over the variant's, per round (mean over
    the paired seeds), the same markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, (ax_err, ax_ratio) = plt.subplots(1, 2, figsize=(13, 4.8))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(variants.items()):
        color = cycle[i % len(cycle)]
        per_seed = [{t: x["agg_error_rel"] for t, x in r["rounds"].items() if x["agg_error_rel"] is not None} for r in runs]
        common = sorted(set.intersection(*(set(s) for s in per_seed)))
        classes = runs[0]["rounds"]
        _marked(ax_err, [(t, _mean([s[t] for s in per_seed]), classes[t]["class"]) for t in common], color, label)
        if ratios.get(label):
            by_round: dict[int, list[float]] = {}
            cls: dict[int, str] = {}
            for seed in ratios[label]:
                for c, stats in seed["agg_error_rel"].items():
                    for t, x in stats["per_round"]:
                        by_round.setdefault(t, []).append(x)
                        cls[t] = c
            full = [t for t in sorted(by_round) if len(by_round[t]) == len(ratios[label])]
            _marked(ax_ratio, [(t, _mean(by_round[t]), cls[t]) for t in full], color, label)
    ax_err.set(xlabel="round t", ylabel="‖ΔW* − ΔW_g‖ / ‖ΔW*‖", yscale="log",
               title="relative aggregation error (mean over seeds)")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_ratio.set(xlabel="round t", ylabel="fedit error / variant error", yscale="log",
                 title="fedit / variant, relative error (paired by seed and round)")
    present = {x["class"] for runs in variants.values() for r in runs for x in r["rounds"].values()}
    markers = [Line2D([], [], color="grey", marker=m, ls="", label=name if c in ("0", "joint") else f"{name} / {parity}")
               for c, (name, parity, m) in CLASSES.items() if c in present]
    for ax in (ax_err, ax_ratio):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + markers, fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def _marked(ax, points: Sequence[tuple[int, float, str]], color, label: str) -> None:
    """A thin line through ``points`` (round, value, class) and each point marked by its class."""
    if not points:
        return
    ax.plot([t for t, _, _ in points], [v for _, v, _ in points], color=color, lw=0.8, label=label)
    for c, (_, _, marker) in CLASSES.items():
        pts = [(t, v) for t, v, k in points if k == c]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, s=14)
