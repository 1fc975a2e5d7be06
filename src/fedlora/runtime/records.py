"""What a run says and records, shared by both engines: one metrics.jsonl row per round, the line
printed for it, the progress display, and the summary computed from the rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np

from fedlora.runtime.rundir import ResumePoint, RunDir


def metrics_row(t: int, sampled: list[int], failed: list[dict], losses: dict[int, tuple[float, int]],
                evaluation: dict[str, Any] | None, diag, comm: dict[str, Any], *, t0: float, train_s: float,
                eval_s: float, **extra: Any) -> dict[str, Any]:
    """One metrics.jsonl row. ``losses`` maps client → (train loss, samples); the round's train loss is
    their sample-weighted mean. ``extra`` adds engine-specific keys (e.g. the bytes Flower carried)."""
    weights = np.array([n for _, n in losses.values()], dtype=float)
    values = [loss for loss, _ in losses.values()]
    row = {
        "round": t,
        "clients": sampled,
        "failed": failed,
        "train_loss": float(np.dot(weights, values) / weights.sum()) if losses else None,
        "client_loss": {str(k): loss for k, (loss, _) in losses.items()},
        "eval": evaluation,
        "diagnostics": diag.to_dict() if diag is not None else None,
        "bytes_up": comm["bytes_up_total"],
        "bytes_down": comm["bytes_down_total"],
    }
    row.update(extra)
    row.update(train_s=train_s, eval_s=eval_s, wall_s=time.perf_counter() - t0)
    return row


class Display:
    """Rich progress (round, ETA) and one readable line per round; silent when ``enabled`` is False."""

    def __init__(self, console, enabled: bool, total: int, done: int):
        self.console = console
        self.enabled = enabled
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=self.console, transient=True)
            self.task = self.progress.add_task("", total=total, completed=done)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def round_done(self, line: str) -> None:
        self.console.print(line)
        if self.progress is not None:
            self.progress.advance(self.task)


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The one-line summary of a metrics row."""
    parts = [f"round {row['round'] + 1}/{rounds}", f"{len(row['clients'])} clients"]
    if row["failed"]:
        parts.append(f"[red]{len(row['failed'])} failed[/]")
    if row["train_loss"] is not None:
        parts.append(f"loss {row['train_loss']:.4f}")
    ev = row.get("eval")
    if ev:
        parts.append(metric_line(ev["global"]))
        p = ev.get("personal")
        if p and "accuracy_weighted" in p:
            parts.append(f"personal {p['accuracy_weighted']:.3f} (w) / {p['accuracy_unweighted']:.3f} (u)")
    d = row.get("diagnostics")
    if d and d.get("agg_error_rel") is not None:
        parts.append(f"agg.err {d['agg_error_rel']:.2e}")
    if row.get("privacy"):
        eps = row["privacy"].get("epsilon")
        parts.append("ε ∞" if eps is None else f"ε {eps:.3g}")
    parts.append(f"↑{row['bytes_up'] / 2**20:.2f} MB ↓{row['bytes_down'] / 2**20:.2f} MB")
    parts.append(f"{row['wall_s']:.1f}s")
    return " · ".join(parts)


def metric_line(evaluation: dict[str, Any]) -> str:
    """A global evaluation's headline: ``acc 0.744`` or ``eval loss 1.2345``."""
    g = evaluation
    return f"acc {g['accuracy']:.3f}" if "accuracy" in g else f"eval loss {g['loss']:.4f}"


#: the communication of a round that sent nothing
NO_BYTES = {"bytes_up_total": 0, "bytes_down_total": 0}


def resume_line(rundir: RunDir, point: ResumePoint) -> str:
    """What a resume starts from, and what it cut from metrics.jsonl."""
    line = f"resuming {rundir.path} at round {point.round + 1} ({point.round} rounds done)"
    if point.redone is not None:
        line += f"; round {point.redone + 1} was logged after the last checkpoint, so it is run again"
    if point.torn_line is not None:
        line += f"; cut the torn last line of metrics.jsonl (line {point.torn_line}, a write cut short)"
    return line


def completed_line(summary: dict[str, Any]) -> str:
    """The last line of a completed run: its rounds and, if any, its failed client-rounds."""
    line = f"completed {summary['rounds_completed']} rounds"
    n = summary["failed_client_rounds"]
    if n:
        line += f"; {n} client-round{'s' if n > 1 else ''} failed (first: {summary['first_failure']})"
    return line


def summarize(rows: list[dict[str, Any]], metric: str, higher_is_better: bool = True) -> dict[str, Any]:
    """Best and final values of the headline metric (global and personal), mean aggregation error,
    bytes, and failed client-rounds (how many, and the first), from metrics rows."""
    best = max if higher_is_better else min
    def series(get):
        out = []
        for r in rows:
            with contextlib.suppress(KeyError, TypeError):
                v = get(r)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    out.append(v)
        return out

    glob = series(lambda r: r["eval"]["global"][metric])
    pers_w = series(lambda r: r["eval"]["personal"][f"{metric}_weighted"])
    pers_u = series(lambda r: r["eval"]["personal"][f"{metric}_unweighted"])
    err = series(lambda r: r["diagnostics"]["agg_error_rel"])
    failures = [f"round {r['round'] + 1}, {f['error']}" for r in rows for f in r["failed"]]
    return {
        "metric": metric,
        f"best_{metric}": best(glob) if glob else None,
        f"final_{metric}": glob[-1] if glob else None,
        f"best_personal_{metric}_weighted": best(pers_w) if pers_w else None,
        f"final_personal_{metric}_weighted": pers_w[-1] if pers_w else None,
        f"final_personal_{metric}_unweighted": pers_u[-1] if pers_u else None,
        "mean_agg_error_rel": float(np.mean(err)) if err else None,
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "failed_client_rounds": len(failures),
        "first_failure": failures[0] if failures else None,
    }
