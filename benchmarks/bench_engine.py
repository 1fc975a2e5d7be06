"""Engine benchmarks: the cost of a simulated round against a bare PyTorch loop, and memory against N.

1. Overhead. The engine runs R rounds of K clients × S local steps (no evaluation in the timed
   rounds). After each engine round, a bare loop does round t's forward/backward/optimiser steps
   on the same batches (the engine's own batch order and collation), on an identically wrapped PEFT
   model, with none of the engine's work around them (adapter copies, strategy hooks, aggregation,
   diagnostics, metrics, checkpoints). Interleaving the two makes them share the machine's load.
   Target: engine / bare ≤ 1.10.
2. Memory. A run (one process each) with N = 10 and N = 100 clients, 10 of them per round for
   N/10 rounds, for fedit (no per-client state) and fedsa (each client that trained keeps its B).
   The peak RSS of the rounds (the high-water mark is reset when they start) minus the RSS at their
   start is what the rounds hold; the base model is shared, so its growth from N = 10 to 100 should
   be about (the extra personal states) × (their size). (With every client in every round the server also holds every upload of the round, and
   the diagnostics' Gram matrices grow as (Σ r_k)²: memory per round, not per federation.)

The Flower comparison (issue 4's third row) is not run here: it needs ``flwr[simulation]``; see
the Flower benchmark for it.

    python benchmarks/bench_engine.py [--model minilm] [--rounds 3] [--clients 4] [--steps 10]

Writes benchmarks/results/bench_engine.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def overrides(args, out: str, **extra) -> list[str]:
    values = {
        "model.name": f'"{args.model}"', "data.source": f'"{args.data}"', "partition.num_clients": str(args.clients),
        "train.rounds": str(args.rounds), "train.local_steps": str(args.steps), "train.batch_size": "16",
        "eval.every": "1000", "eval.personalised": "false", "data.eval_examples": "64",
        "run.output_dir": f'"{out}"', "run.progress": "false", "model.threads": str(args.threads),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def bare_round(fed, cfg, t: int) -> float:
    """Round ``t``'s training steps with nothing around them: per sampled client a fresh AdamW over
    the LoRA parameters and head, the client's batches in the engine's order, the same clipping."""
    import torch

    from fedlora.runtime import training as C
    from fedlora.runtime.federation import sample_clients

    model = fed.shared.model  # an identically wrapped PEFT model; the bare loop never moves adapters
    params = fed.shared.set_trainable(frozenset({"A", "B"}), True)
    t0 = time.perf_counter()
    for k in sample_clients(cfg.run.seed, t, fed.num_clients, cfg.train):
        opt = torch.optim.AdamW(params, lr=cfg.train.lr)
        seed = C.client_seed(cfg.run.seed, t, k)
        torch.manual_seed(seed)
        model.train()
        for idx in C.batch_order(fed.client_train[k], cfg.train.batch_size,
                                 C.steps_for(len(fed.client_train[k]), cfg.train), seed):
            batch = fed.task.collate(fed.train, idx, fed.device)
            loss = fed.task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            float(loss.detach())
    return time.perf_counter() - t0


def overhead(args) -> dict:
    """Engine rounds and bare rounds, interleaved (engine round t, then bare round t) so both see the
    same machine load. A row's ``wall_s`` ends before that round's checkpoint is written, so the
    checkpoint writes are timed and added to the engine's side."""
    from fedlora.config import load_config
    from fedlora.runtime.federation import prepare
    from fedlora.sim import run
    from fedlora.runtime.rundir import RunDir

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, overrides(args, out, **{"strategy.name": f'"{args.strategy}"'}))
        fed = prepare(cfg, log=lambda s: None)  # the bare loop's own copy of the model and data
        bare_round(fed, cfg, 0)  # warm-up: allocator, kernels
        bare, ckpt_s = [], []
        append, save = RunDir.append_metrics, RunDir.save_checkpoint

        def append_then_bare(self, row):
            append(self, row)
            bare.append(bare_round(fed, cfg, row["round"]))

        def timed_save(self, *a, **kw):
            t0 = time.perf_counter()
            save(self, *a, **kw)
            ckpt_s.append(time.perf_counter() - t0)

        RunDir.append_metrics, RunDir.save_checkpoint = append_then_bare, timed_save
        try:
            summary = run(cfg, log=lambda s: None)
        finally:
            RunDir.append_metrics, RunDir.save_checkpoint = append, save
        rows = [json.loads(line) for line in open(Path(summary["run_dir"]) / "metrics.jsonl")]
        engine = [r["wall_s"] - r["eval_s"] + c for r, c in zip(rows, ckpt_s)]
    steps = args.clients * args.steps * args.rounds
    return {"model": args.model, "strategy": args.strategy, "rounds": args.rounds, "clients": args.clients,
            "steps_per_client": args.steps, "engine_round_s": engine, "bare_round_s": bare, "checkpoint_s": ckpt_s,
            "engine_s_per_step": sum(engine) / steps, "bare_s_per_step": sum(bare) / steps,
            "ratio": sum(engine) / sum(bare), "ratio_per_round": [e / b for e, b in zip(engine, bare)]}


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: its peak), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib() -> float:
    return status_mib("VmRSS")


def rss_child(args) -> None:
    """One run in this process; prints its peak RSS (MiB) and the personal-state bytes as JSON."""
    from fedlora.config import load_config
    from fedlora.runtime.rundir import RunDir
    from fedlora.sim import run

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, overrides(args, out, **{
            "partition.num_clients": str(args.rss_clients), "partition.method": '"iid"',
            "train.rounds": str(max(1, args.rss_clients // 10)),
            "train.local_steps": "1", "strategy.name": f'"{args.strategy}"', "data.eval_examples": "16",
            "train.clients_per_round": "10",
            "lora.r": str(args.rss_rank), "lora.alpha": str(2.0 * args.rss_rank)}))
        # the peak while loading the model and data is the same for any N; reset the high-water mark
        # (Linux: write 5 to /proc/self/clear_refs) when the rounds start, to see what the rounds add
        from fedlora.runtime import records

        enter = records.Display.__enter__

        def reset_then_enter(self):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss_before_rounds.append(current_rss_mib())
            return enter(self)

        rss_before_rounds: list[float] = []
        records.Display.__enter__ = reset_then_enter
        summary = run(cfg, log=lambda s: None)
        rss_now = current_rss_mib()
        rounds_peak = status_mib("VmHWM")
        ckpt = RunDir(Path(summary["run_dir"])).load_checkpoint()
        personal = [a for a in ckpt["personal"].values() if a is not None]
        per_client = personal[0].nbytes() if personal else 0
        held = len(personal)
        adapter = ckpt["state"].adapter.nbytes()
    print(json.dumps({"clients": args.rss_clients, "strategy": args.strategy,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_run_mib": rss_now, "rss_before_rounds_mib": rss_before_rounds[0],
                      "peak_rss_rounds_mib": rounds_peak, "rank": args.rss_rank,
                      "personal_bytes_per_client": per_client, "personal_states": held, "adapter_bytes": adapter}))


def memory(args) -> list[dict]:
    results = []
    for strategy in ("fedit", "fedsa"):
        for n in (10, 100):
            cmd = [sys.executable, __file__, "--rss-clients", str(n), "--strategy", strategy, "--model", args.model,
                   "--data", args.data, "--threads", str(args.threads), "--rss-rank", str(args.rss_rank)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--data", default="sarcasm")
    p.add_argument("--strategy", default="fedrot")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rss-clients", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--rss-rank", type=int, default=64, help="LoRA rank of the memory runs (a bigger state shows)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_engine.json"))
    args = p.parse_args()
    if args.rss_clients:
        rss_child(args)
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    result = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    if not args.skip_overhead:
        result["overhead"] = overhead(args)
    if not args.skip_memory:
        result["memory"] = memory(args)
    from fedlora.files import atomic_write

    atomic_write(Path(args.out), json.dumps(result, indent=2) + "\n")

    console = Console()
    o = result.get("overhead")
    t = o and Table("", "engine", "bare PyTorch loop", "ratio", title=f"Round time: {o['model']}, {o['strategy']}, "
              f"{o['clients']} clients × {o['steps_per_client']} steps, {o['rounds']} rounds")
    if o:
        t.add_row("s per round (mean)", f"{np.mean(o['engine_round_s']):.2f}", f"{np.mean(o['bare_round_s']):.2f}",
                  f"{o['ratio']:.3f}×")
        t.add_row("s per step", f"{o['engine_s_per_step']:.3f}", f"{o['bare_s_per_step']:.3f}", "")
        console.print(t)
    if "memory" in result:
        m = Table("strategy", "clients", "peak RSS", "rounds' peak − start", "personal states",
                  "state / client", "adapter", title=f"Memory (MiB) against clients, LoRA rank {args.rss_rank}")
        for r in result["memory"]:
            m.add_row(r["strategy"], str(r["clients"]), f"{r['peak_rss_mib']:.1f}",
                      f"{r['peak_rss_rounds_mib'] - r['rss_before_rounds_mib']:.1f}", str(r["personal_states"]),
                      f"{r['personal_bytes_per_client'] / 1024:.0f} KiB", f"{r['adapter_bytes'] / 1024:.0f} KiB")
        console.print(m)
        for strategy in ("fedit", "fedsa"):
            rs = {r["clients"]: r for r in result["memory"] if r["strategy"] == strategy}
            grow = [rs[n]["peak_rss_rounds_mib"] - rs[n]["rss_before_rounds_mib"] for n in (10, 100)]
            more = rs[100]["personal_states"] - rs[10]["personal_states"]
            expect = more * rs[100]["personal_bytes_per_client"] / 2**20
            console.print(f"{strategy}: what the rounds add, 10 → 100 clients: {grow[1] - grow[0]:+.1f} MiB; "
                          f"{more} more personal states = {expect:.1f} MiB")
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
