"""What a report reads from one run directory, and the numbers it takes from it.

Only what runs write is read (``summary.json``, ``metrics.jsonl``), so finished, interrupted and
resumed runs read alike: :func:`read_metrics` by the same rules as a resume, :func:`_check_run`
saying why a run cannot be averaged, :func:`run_stats` one run's headline numbers and per-round
series; :func:`_mean` and :func:`_mean_std` (over seeds) are what the tables put in a cell.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError


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
    evaluation), ε and σ of a private run (None otherwise), bytes (up + down) per round, wall time; and the per-round series behind them.
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
        "epsilon": (s.get("privacy") or {}).get("epsilon"),  # None: no privacy, or σ = 0 (ε = ∞)
        "sigma": (s.get("privacy") or {}).get("noise_multiplier"),
        "bytes_per_round": (s.get("bytes_up", 0) + s.get("bytes_down", 0)) / rounds if rounds else None,
        "wall_s": s.get("wall_s"),
        "series": series,
    }
