"""Causal-LM task benchmark: SmolLM2-135M per-step time and peak memory, fedlora against a bare loop.

For each precision (fp32, bf16 autocast) and sequence length (default 64 and 128, batch 4) two
cells run side by side, each in its own process so each has its own peak RSS:

- ``fedlora``: one client's local training as the engine does it: the shared PEFT model
  (``SharedModel``), ``CausalLMTask`` batches (chat template, answer-only labels, dynamic padding)
  and ``client.local_train`` (fresh AdamW, schedule, clipping, the task's loss);
- ``bare``: the same PEFT LoRA model and the very same batches (input ids, attention mask, labels)
  in a plain loop: ``model(**batch).loss``, ``backward``, clip, ``AdamW.step``.

Every example is a gsm-symbolic problem long enough to fill the sequence (so both sides see full
``batch × seq`` token batches). Each cell warms up for ``--warmup`` steps, then times ``--steps``
steps; the step time is their mean. Memory: the process's peak RSS, and its growth over the RSS
right after loading the model.

    python benchmarks/bench_tasks.py [--steps 4] [--warmup 2] [--seq 64 128] [--batch 4]

Writes benchmarks/results/bench_tasks.json and prints a table. Needs the catalog's smollm2-135m
and gsm-symbolic (``fedlora assets fetch``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall each other on a shared box

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tasks.json"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cell(impl: str, dtype: str, seq: int, batch: int, warmup: int, steps: int, threads: int) -> dict:
    """One (implementation, precision, length) measurement in this process."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from fedlora import assets
    from fedlora.config import TrainSection
    from fedlora.runtime import training as C
    from fedlora.runtime.model import SharedModel, autocast_for
    from fedlora.tasks.causal import CausalLMTask

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    path = str(assets.model_path("smollm2-135m"))
    task = CausalLMTask(AutoTokenizer.from_pretrained(path), seq, generate_examples=0)
    split = assets.load_dataset("gsm-symbolic")["train"]
    data = task.encode(split.select(range(batch * (warmup + steps) * 4)))
    full = np.array([i for i in range(len(data)) if len(data.features["prompt_ids"][i])
                     + len(data.features["target_ids"][i]) == seq])  # examples that fill the sequence
    torch.manual_seed(0)
    shared = SharedModel(task.load_model(path, torch.float32, split), task_type="CAUSAL_LM", rank=8, alpha=16,
                         dropout=0.0, target_modules=["q_proj", "v_proj"])
    cfg = TrainSection(batch_size=batch, lr=1e-4, grad_clip=1.0)
    autocast = autocast_for(dtype, device)
    base_rss = rss_mib()

    def fedlora_steps(n: int, seed: int) -> None:
        C.local_train(shared, task, data, full, cfg=cfg, lr=cfg.lr, steps=n, parts=frozenset({"A", "B"}),
                      train_extras=True, regularizer=lambda live: None, seed=seed, device=device, autocast=autocast)

    order = list(C.batch_order(full, batch, warmup + steps, 0))
    batches = [task.collate(data, b, device) for b in order]
    assert all(b["input_ids"].shape == (batch, seq) for b in batches)

    def bare_steps(todo: list[dict]) -> None:
        params = shared.set_trainable(frozenset({"A", "B"}), True)
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        for b in todo:
            with autocast:
                loss = shared.model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()

    if impl == "fedlora":
        fedlora_steps(warmup, seed=1)
        t0 = time.perf_counter()
        fedlora_steps(steps, seed=0)
    else:
        bare_steps(batches[:warmup])
        t0 = time.perf_counter()
        bare_steps(batches[warmup:])
    per_step = (time.perf_counter() - t0) / steps
    return {"impl": impl, "dtype": dtype, "seq": seq, "batch": batch, "steps": steps, "s_per_step": per_step,
            "peak_rss_mib": rss_mib(), "rss_growth_mib": rss_mib() - base_rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--cell", nargs=3, metavar=("IMPL", "DTYPE", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        impl, dtype, seq = args.cell
        print(json.dumps(cell(impl, dtype, int(seq), args.batch, args.warmup, args.steps, args.threads)))
        return

    t0 = time.perf_counter()
    rows = []
    for dtype in args.dtypes:
        for seq in args.seq:
            for impl in ("bare", "fedlora"):  # side by side: the pair runs back to back
                cmd = [sys.executable, __file__, "--cell", impl, dtype, str(seq), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(f"  {impl:8s} {dtype} seq {seq}: {rows[-1]['s_per_step']:.2f} s/step", flush=True)
    pairs = []
    for dtype in args.dtypes:
        for seq in args.seq:
            bare, fed = (next(r for r in rows if (r["impl"], r["dtype"], r["seq"]) == (i, dtype, seq))
                         for i in ("bare", "fedlora"))
            pairs.append({"dtype": dtype, "seq": seq, "batch": args.batch, "bare_s": bare["s_per_step"],
                          "fedlora_s": fed["s_per_step"], "ratio": fed["s_per_step"] / bare["s_per_step"],
                          "bare_peak_rss_mib": bare["peak_rss_mib"], "fedlora_peak_rss_mib": fed["peak_rss_mib"],
                          "bare_rss_growth_mib": bare["rss_growth_mib"],
                          "fedlora_rss_growth_mib": fed["rss_growth_mib"]})
    import torch
    import transformers

    result = {"pairs": pairs, "cells": rows,
              "meta": {"model": "smollm2-135m", "lora": "r=8, alpha=16, q_proj+v_proj", "threads": args.threads,
                       "warmup": args.warmup, "steps": args.steps, "machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "total_s": time.perf_counter() - t0}}
    from fedlora.files import atomic_write

    atomic_write(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"\n| precision | batch × seq | bare s/step | fedlora s/step | ratio | bare peak RSS | fedlora peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for p in pairs:
        print(f"| {p['dtype']} | {p['batch']} × {p['seq']} | {p['bare_s']:.2f} | {p['fedlora_s']:.2f} | "
              f"{p['ratio']:.2f} | {p['bare_peak_rss_mib']:.0f} MiB | {p['fedlora_peak_rss_mib']:.0f} MiB |")
    print(f"\nwrote {args.out} ({result['meta']['total_s']:.0f} s; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
