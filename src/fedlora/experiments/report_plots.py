"""The grid report's figures, each written as a PNG atomically: per setting folder, the per-round
panels (mean over seeds with a ±1 std band); for a one-key numeric grid, the sweep plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.experiments.run_results import _mean_std


def _save_figure(fig, path: str | Path) -> Path:
    """Write a pyplot figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from fedlora.files import atomic_figure

    try:
        return atomic_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


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


def _setting_plot(setting: str, runs: Sequence[dict[str, Any]], colors: dict[str, Any], path: str | Path) -> Path:
    """One setting folder's panels: global metric, aggregation error on a log scale, basis overlap,
    and rotation size (or, without a FedRot run but with a personalised evaluation, the personalised
    metric), against round."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    m = runs[0]["metric"]
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
    return _save_figure(fig, path)


def _sweep_plot(settings: dict[str, list[dict[str, Any]]], labels: Sequence[str], names: Sequence[str], key: str,
                values: Sequence[float], colors: dict[str, Any], path: str | Path) -> Path:
    """A one-key numeric grid's sweep plot: the best global metric (and the best personalised one,
    where a run has it) against the key's ``values`` (in the order of ``names``, the setting
    folders), mean ± std over seeds, one line per label."""
    import matplotlib.pyplot as plt

    m = next(iter(settings.values()))[0]["metric"]
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
    return _save_figure(fig, path)
