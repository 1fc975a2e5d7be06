"""Which runs of a grid report are one row, and what the row is called.

Runs are put in one row only when their configs have the same result settings, seeds apart
(:data:`REPORT_IGNORE`); rows are labelled by the strategy and the settings in which they differ
(:func:`run_label`). :func:`_collect` reads every run under the report's folders, and sets apart,
with why, those whose numbers cannot be averaged.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import NEUTRAL_KEYS, RunConfig, fingerprint, load_config, result_settings
from fedlora.errors import ConfigError
from fedlora.experiments.run_results import _check_run, _stats

#: what one row of a grid report averages over: the seeds, besides the settings that change nothing
REPORT_IGNORE = NEUTRAL_KEYS | {"run.seed"}


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
