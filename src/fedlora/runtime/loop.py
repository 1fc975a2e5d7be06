"""The round loop, once, for both engines. Read :func:`run` top to bottom (design.md, "One round,
as data"):

    sample clients → the transport trains them (each: load the global adapter and its personal
    state, train locally with the strategy's regulariser, transform before upload, upload) →
    aggregate → merge any base-weight change → diagnostics → evaluate (global here; personal models
    through the transport) → one metrics row → atomic checkpoint.

The transport (:mod:`fedlora.runtime.transport`) is the only thing an engine provides. Everything
that can be wrong with the inputs is checked by :func:`~fedlora.runtime.federation.prepare` before
the first training step, and the strategy is driven only through its generic hooks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FedLoRAError, RoundFailedError
from fedlora.runtime.evaluation import evaluate_global, personal_summary
from fedlora.runtime.federation import (Federation, checkpoint_extra, client_context, prepare,
                                        restore_checkpoint_extra, sample_clients, start_state)
from fedlora.runtime.quiet import quiet_unless_progress
from fedlora.runtime.records import (NO_BYTES, Display, completed_line, metric_line, metrics_row, resume_line,
                                     round_line, summarize)
from fedlora.runtime.privacy import RunPrivacy
from fedlora.runtime.rundir import INITIAL_EVAL, RunDir
from fedlora.runtime.signals import raise_if_stopped, signals_deferred, stop_signals_interrupt
from fedlora.runtime.transport import RoundReplies, Transport
from fedlora.strategies import GlobalState


@stop_signals_interrupt()
@quiet_unless_progress  # no progress display: no datasets/transformers/hub bars either
def run(cfg: RunConfig, transport: Transport, *, resume: str | Path | None = None, progress: bool | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a federation over ``transport``; returns the summary (also in summary.json).

    ``resume`` is an existing run directory: the run continues from its last complete round. ``cfg``
    may differ from the config stored there only in ``RESUMABLE_KEYS`` (e.g. more rounds); a run
    already complete for ``cfg.train.rounds`` is left untouched.

    Ctrl-C or SIGTERM stops after writing the summary (status "interrupted") and re-raises
    KeyboardInterrupt; complete rounds are never lost. A round with fewer valid updates than
    ``transport.min_replies`` (one: every sampled client failed) cannot complete: the run ends with
    status "failed: …" and raises RoundFailedError naming the failures; so does any other
    FedLoRAError mid-run (e.g. ``train.fail_fast``). Rounds where only some clients fail complete
    without them; the summary counts those client-rounds (``failed_client_rounds``, ``first_failure``).
    """
    from rich.console import Console

    from fedlora.data import plot_partition
    from fedlora.tracking import open_trackers, require_trackers

    t_start = time.perf_counter()
    show = cfg.run.progress if progress is None else progress
    console = Console(highlight=False)
    say = log or console.print

    # what can be checked without the model or the data is checked first, and touches no file
    if resume is not None:
        rundir = RunDir.open(resume)
        rundir.check_resume_config(cfg)
        finished = rundir.finished_summary(cfg.train.rounds)
        if finished is not None:
            say(f"run {rundir.path} is already complete: {cfg.train.rounds} of {cfg.train.rounds} rounds; "
                "add rounds with --set train.rounds=N")
            return finished
        point = rundir.resume_point()
        if cfg.train.rounds < point.round:
            raise ConfigError(f"train.rounds = {cfg.train.rounds}: the run in {str(rundir.path)!r} has already "
                              f"completed {point.round} rounds; ask for at least that many")
    else:
        RunDir.check_location(cfg)
    require_trackers(cfg)  # an unknown tracker or a missing package: before the model loads

    fed = prepare(cfg, say)  # every input error surfaces here, before any training
    strategy, shared = fed.strategy, fed.shared
    state = start_state(fed, say)
    for k in range(fed.num_clients):  # a client the strategy cannot start (e.g. its rank) fails now, not mid-run
        strategy.client_start(state, None, client_context(fed, k, 0, fed.num_clients))
    checkpoint = None
    if resume is not None:
        if point.checkpoint is not None:
            checkpoint = point.checkpoint
            state = checkpoint["state"]
            restore_checkpoint_extra(fed, checkpoint, rundir.checkpoint_path)
        rundir.cut_metrics(point)
        rundir.write_config(cfg)  # e.g. more rounds, set on the command line of the resume
        say(resume_line(rundir, point))
    else:
        rundir = RunDir.create(cfg)
        rundir.write_json("partition.json", fed.partition_summary)
        plot_partition(fed.partition_summary, rundir.path / "partition.png")  # (atomic)
        if cfg.lora.init_adapter:  # where the start adapter stands, before any training
            rundir.write_json(INITIAL_EVAL, evaluate_global(fed, state))
            say(f"start adapter {cfg.lora.init_adapter}: {metric_line(rundir.read_json(INITIAL_EVAL))}")
    say(f"run directory: {rundir.path}")
    dp = RunPrivacy.open(fed, [json.loads(line) for line in point.lines] if resume is not None else [])
    if dp is not None:
        say(dp.describe())

    status = "completed"
    complete = (state, dict(shared.base_merged))  # the last round that is fully written
    failed_row = None  # the row of a round that could not complete (it is not in metrics.jsonl)
    display = Display(console, show, cfg.train.rounds, state.round)
    trackers = open_trackers(cfg, rundir.path, resume=resume is not None)  # run.trackers; none: imports nothing
    try:
        transport.open(fed, checkpoint)
        with display:
            while state.round < cfg.train.rounds:
                raise_if_stopped()
                t = state.round
                t0 = time.perf_counter()
                sampled = dp.sample(t) if dp else sample_clients(cfg.run.seed, t, fed.num_clients, cfg.train)
                stop = dp.over_budget(sampled) if dp else None
                if stop is not None:
                    status = f"stopped: {stop}"
                    say(stop)
                    break
                # under client-level DP a Poisson round may sample no one: the server releases noise alone
                replies = transport.train(state, sampled, display.status) if sampled else RoundReplies()
                t_train = time.perf_counter() - t0
                needed = 0 if dp and dp.client_level else transport.min_replies
                if len(replies.updates) < needed:  # a model carried over unchanged is no round's result
                    failed_row = metrics_row(t, sampled, replies.failed, {}, None, None, NO_BYTES, t0=t0,
                                             train_s=t_train, eval_s=0.0)
                    raise RoundFailedError(too_few_message(t, replies, sampled, transport.min_replies))

                display.status("aggregating")
                state, diag, comm = aggregate_round(fed, state, replies, dp)
                evaluation, t_eval = evaluate_if_due(fed, transport, state, t, display.status)
                privacy = {"privacy": dp.record(sampled, state)} if dp else {}
                row = metrics_row(t, sampled, replies.failed, replies.losses, evaluation, diag, comm, t0=t0,
                                  train_s=t_train, eval_s=t_eval, **replies.row, **privacy)
                with signals_deferred():  # a signal here lands after the row, the checkpoint and `complete` agree
                    rundir.commit_round(row, state, transport.personal_states(), shared.base_merged,
                                        dict(checkpoint_extra(fed), transport=transport.state_dict()))
                    complete = (state, dict(shared.base_merged))
                trackers.log_row(row)  # after the commit: a tracker never holds a row metrics.jsonl lacks
                display.round_done(round_line(row, cfg.train.rounds))
    except KeyboardInterrupt:
        status = "interrupted"
        say(f"interrupted after {complete[0].round} complete rounds of {cfg.train.rounds}; "
            f"resume with: {transport.resume_command} {rundir.path}")
    except FedLoRAError as e:  # a failed round, fail_fast, a strategy rejecting the round: keep what is complete
        transport.close()
        finish(fed, rundir, *complete, f"failed: {e}", time.perf_counter() - t_start, transport.engine,
               failed_row=failed_row, dp=dp)
        raise
    finally:
        trackers.close("failed" if sys.exc_info()[0] is not None else status)
    transport.close()
    summary = finish(fed, rundir, *complete, status, time.perf_counter() - t_start, transport.engine, dp=dp)
    if status == "interrupted":
        raise KeyboardInterrupt
    say(completed_line(summary))
    return summary


def too_few_message(t: int, replies: RoundReplies, sampled: list[int], minimum: int) -> str:
    """Why round ``t`` could not complete, naming the failures."""
    if not replies.updates:
        return (f"round {t + 1}: every sampled client failed ({len(replies.failed)} of {len(sampled)}); "
                f"the first: {replies.failed[0]['error']}")
    return (f"round {t + 1}: {len(replies.updates)} valid replies of {len(sampled)} sampled, fewer than the minimum "
            f"{minimum}; failures: " + "; ".join(f"client {f['client']}: {f['error']}" for f in replies.failed))


def aggregate_round(fed: Federation, state: GlobalState, replies: RoundReplies,
                    dp: RunPrivacy | None = None) -> tuple[GlobalState, Any, dict]:
    """Aggregate a round's updates, merge any base-weight change into the shared model, and measure it.

    Returns (new state, diagnostics or None, communication bytes). Under secure aggregation the one
    update the server holds is aggregated instead, and the diagnostics, which need individual
    uploads, are skipped. Under client-level DP the strategy likewise aggregates one update, the
    noised mean of the clipped uploads (:meth:`RunPrivacy.noised_update`), and the diagnostics are
    skipped (they would publish what the noise hides); with SecAgg+ too, where clients weigh 1, so
    its replies are the plain mean of the clipped uploads once per client that took part, and their
    sum is the sum of the clipped updates up to SecAgg+'s quantisation."""
    from fedlora.diagnostics import communication_bytes, keeps_personal_state, round_diagnostics

    strategy = fed.strategy
    secure = replies.secure
    if dp is not None and dp.client_level:
        secure = dp.noised_update(state, replies.updates)
    new = strategy.aggregate([secure] if secure is not None else replies.updates, state)
    if dp is not None and dp.client_level:
        dp.next_clip(state, new, replies.updates)
    if new.base_delta:
        fed.shared.merge_base(new.base_delta)
    diag = None if secure is not None else round_diagnostics(
        replies.updates, strategy.weights(replies.updates), new, personalised=keeps_personal_state(strategy))
    return new, diag, communication_bytes(strategy, state, replies.updates, replies.contexts)


def evaluate_if_due(fed: Federation, transport: Transport, state: GlobalState, t: int,
                    status: Callable[[str], None]) -> tuple[dict[str, Any] | None, float]:
    """After round ``t``, every ``eval.every`` rounds and after the last: the global model and, with
    ``eval.personalised``, the clients' personal models. Returns (metrics, seconds)."""
    cfg = fed.cfg
    if (t + 1) % cfg.eval.every != 0 and t + 1 != cfg.train.rounds:
        return None, 0.0
    status("evaluating")
    t1 = time.perf_counter()
    out: dict[str, Any] = {"global": evaluate_global(fed, state)}
    if cfg.eval.personalised:
        summary = personal_summary(transport.evaluate_personal(state), fed.task.metrics)
        if summary is not None:
            out["personal"] = summary
    return out, time.perf_counter() - t1


def finish(fed: Federation, rundir: RunDir, state: GlobalState, base_merged: dict, status: str, wall_s: float,
           engine: str, failed_row: dict[str, Any] | None = None, dp: RunPrivacy | None = None) -> dict[str, Any]:
    """Save the global adapter and merged base change of the last complete round, write summary.json.
    ``failed_row`` is the row of a round that could not complete: not logged, but its failures count.
    With privacy on, the summary has a ``privacy`` block (ε of the complete rounds, δ, σ, C, sampling)."""
    cfg = fed.cfg
    rundir.save_adapter(state.adapter, scaling=state.scaling, base_model=fed.model_path,
                        task_type=fed.task.peft_task_type, target_modules=fed.target_modules, dropout=cfg.lora.dropout,
                        base_delta=fed.shared.base_delta_state_dict(base_merged))
    rows = rundir.read_metrics()
    summary = summarize(rows + ([failed_row] if failed_row else []), fed.task.metrics[0],
                        higher_is_better=fed.task.higher_is_better)
    summary.update(status=status, strategy=cfg.strategy.name, model=cfg.model.name, dataset=cfg.data.source,
                   num_clients=fed.num_clients, num_labels=fed.num_labels, rounds_completed=state.round,
                   rounds=cfg.train.rounds, wall_s=wall_s, run_dir=str(rundir.path),
                   adapter=str(rundir.path / "adapter"),
                   base_delta=str(rundir.path / "base_delta.safetensors") if base_merged else None, engine=engine)
    if dp is not None:
        summary["privacy"] = dp.summary()
    initial = rundir.read_json(INITIAL_EVAL)
    if initial is not None:  # the evaluation of the start adapter, before round 1
        summary["initial_eval"] = initial
    samples = [r["eval"]["global"]["samples"] for r in rows if (r.get("eval") or {}).get("global", {}).get("samples")]
    if samples:  # generation tasks: the last evaluation's generated samples
        summary["samples"] = samples[-1]
    rundir.write_json("summary.json", summary)
    return summary
