"""The same federated work under the embedded engine, Flower's simulation runtime, a Flower
deployment on loopback (SuperLink + SuperNodes + flwr run) with a fresh ClientApp process per
message, and the same deployment with resident nodes (``fedlora flower node``), side by side: round
wall time, total wall time, peak memory of the whole process tree (sampled from /proc every 0.1 s),
the model loads of the whole federation, and where a deployed round's time goes.

    python benchmarks/bench_flower.py                 # tiny BERT, 3 clients, 3 rounds; JSON + table
    python benchmarks/bench_flower.py --model minilm --clients 3 --rounds 4 --local-steps 20 \
        --modes embedded,flower-deploy,flower-resident            # the README's table (real MiniLM)

Writes benchmarks/results/flower.json. Each mode runs in its own Python process, so imports, model
loading and (for Flower) Ray or SuperLink start-up are all counted; "round" is the ServerApp's (or
the engine's) own per-round wall time from metrics.jsonl. The breakdown of a deployed round comes
from the times each node reports with its reply (``node_timing`` in metrics.jsonl) and the server's
push and pull times; all processes share this machine's clock. Measurements, not tests: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODES = ("embedded", "flower-sim", "flower-deploy", "flower-resident", "flower-resident-shared")

RUNNER = textwrap.dedent("""
    import sys
    from fedlora.config import load_config
    mode, cfg_path, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = load_config(cfg_path)
    if mode == "embedded":
        import torch
        from fedlora.sim import run
        torch.manual_seed(cfg.run.seed)
        run(cfg, progress=False, log=lambda s: None)
    elif mode == "flower-sim":
        from fedlora.flower.cli import run_sim
        from fedlora.flower.serverapp import FlowerOptions
        run_sim(cfg, FlowerOptions(min_replies=1))
    else:
        from fedlora.flower.cli import write_app
        from fedlora.flower.deploy import LocalDeployment
        resident, shared = mode.startswith("flower-resident"), mode == "flower-resident-shared"
        app = write_app(out + "/app", cfg_path, resident=resident)
        with LocalDeployment(out + "/deploy", cfg.partition.num_clients, resident=resident,
                             threads=0 if shared else threads, shared_worker=shared) as d:
            r = d.run_app(app, timeout=1800)
            if r.returncode:
                sys.exit(r.stdout[-3000:])
""")


def tree_memory(pid: int, with_root: bool = True) -> tuple[int, int, dict[str, int]]:
    """Memory of ``pid`` (unless ``with_root`` is false) and all its descendants now: the sum of
    their RSS, the sum of their PSS (proportional set size: a page shared by n of them, such as
    torch's libraries, counts 1/n in each, so the sum is what the tree occupies), and the PSS by
    process kind."""
    from fedlora.flower.deploy import descendants

    rss_total, pss_total, kinds = 0, 0, {}
    for p in [pid] * with_root + descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.endswith("kB\n")}
            with open(f"/proc/{p}/cmdline", "rb") as f:
                kind = process_kind(f.read().split(b"\0"))
        except (OSError, ValueError, IndexError):
            continue
        rss_total += fields.get("Rss", 0)
        pss_total += fields.get("Pss", 0)
        kinds[kind] = kinds.get(kind, 0) + fields.get("Pss", 0)
    return rss_total, pss_total, kinds


def process_kind(argv: list[bytes]) -> str:
    """A short name for a process of the benchmark's tree: the Flower executable, the fedlora worker
    or node supervisor, or the benchmark's runner."""
    words = [a.decode(errors="replace") for a in argv if a]
    for w in words[:3]:
        name = os.path.basename(w)
        if name.startswith(("flower-", "flwr")):
            return name
    if "--worker" in words:
        return "fedlora worker"
    if "node" in words and "flower" in words:
        return "fedlora flower node"
    return "runner (engine / simulation)" if "-c" in words else os.path.basename(words[0]) if words else "?"


#: the parts of a deployed round, in order (see breakdown)
PARTS = {"wait_before": "message to the node (SuperNode poll, SuperExec poll, process spawn)",
         "process": "ClientApp process start: interpreter, flwr, fetching the message",
         "imports": "ClientApp module imports (torch, transformers, peft, fedlora)",
         "load_model": "model load", "load_data": "data load and encoding", "train": "local training",
         "node_other": "other node work (adapter, personal state; resident: channel, queue at a shared worker)",
         "wait_after": "reply to the server (transport, SuperNode and ServerApp polls)",
         "server": "server: aggregation, diagnostics, global evaluation, checkpoint"}


def breakdown(rows: list[dict]) -> dict | None:
    """Where a deployed round's time goes, averaged over the rounds after the first: per node (mean
    over nodes, so the node parts overlap in time across nodes) and the server's own share."""
    rounds = [r for r in rows[1:] if r.get("node_timing")]
    if not rounds:
        return None
    acc = {k: 0.0 for k in PARTS}
    for r in rounds:
        nodes = list(r["node_timing"].values())
        for t in nodes:
            loads = t.get("load-model-s", 0.0) + t.get("load-data-s", 0.0)
            part = {"wait_before": t["t-start"] - t["t-push"],
                    "process": t["t-handler"] - t["t-start"] - t.get("imports-s", 0.0),
                    "imports": t.get("imports-s", 0.0), "load_model": t.get("load-model-s", 0.0),
                    "load_data": t.get("load-data-s", 0.0), "train": t.get("train-s", 0.0),
                    "node_other": t["t-end"] - t["t-handler"] - loads - t.get("train-s", 0.0),
                    "wait_after": t["t-reply"] - t["t-end"]}
            for k, v in part.items():
                acc[k] += v / len(nodes) / len(rounds)
        span = max(t["t-reply"] for t in nodes) - min(t["t-push"] for t in nodes)
        acc["server"] += (r["wall_s"] - span) / len(rounds)
    return acc


def run_mode(mode: str, cfg_path: Path, out: Path, threads: int = 0) -> dict:
    """Run one mode in a fresh process; its wall time, peak tree RSS and per-round times."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", RUNNER, mode, str(cfg_path), str(out), str(threads)],
                         stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    peak, peak_pss, at_peak = 0, 0, {}
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_pss, at_peak
        while not stop.is_set():
            # a deployment's runner only starts the processes and waits (a user runs `flwr run`): not counted
            rss, pss, kinds = tree_memory(p.pid, with_root=mode in ("embedded", "flower-sim"))
            peak = max(peak, rss)
            if pss > peak_pss:
                peak_pss, at_peak = pss, kinds
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = p.wait()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    from fedlora.config import load_config

    cfg = load_config(cfg_path)
    metrics = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rounds = [r["wall_s"] for r in rows]
    later = rounds[1:] or rounds
    return {"mode": mode, "rc": rc, "wall_s": wall, "peak_rss_mb": peak / 2**20, "peak_pss_mb": peak_pss / 2**20,
            "peak_pss_by_process_mb": {k: v / 2**20 for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])},
            "round_s": rounds,
            "round_mean_s": sum(rounds) / len(rounds) if rounds else None,
            "round_after_first_s": sum(later) / len(later) if later else None,
            "model_loads": sum(r.get("model_loads", 0) for r in rows) if mode.startswith("flower-") else None,
            "breakdown_s": breakdown(rows),
            "final_accuracy": rows[-1]["eval"]["global"]["accuracy"] if rows and rows[-1].get("eval") else None,
            "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
            "log": str(out / "log.txt")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="catalog name or folder (default: a tiny random BERT)")
    ap.add_argument("--data", default="", help="data.source (default: a toy dataset, or sarcasm with --model)")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--strategy", default="fedrot")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per resident worker (default: CPUs / clients, at least 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flower.json"))
    args = ap.parse_args()

    from fedlora.config import load_config, to_toml

    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    os.environ.setdefault("FEDLORA_CACHE", str(work / "cache"))
    overrides = [f"partition.num_clients={args.clients}", f"train.rounds={args.rounds}",
                 f"train.local_steps={args.local_steps}", f'strategy.name="{args.strategy}"',
                 "eval.personalised=false", 'model.device="cpu"', "run.progress=false",
                 f'run.output_dir="{work / "runs"}"', 'partition.method="iid"']
    if args.model:
        overrides += [f'model.name="{args.model}"', f'data.source="{args.data or "sarcasm"}"', "data.eval_examples=500"]
    else:
        from sim_tiny import make_tiny_model, make_toy_data

        model, data = make_tiny_model(work / "tiny-bert"), make_toy_data(work / "toy.jsonl", n=600)
        overrides += [f'model.name="{model}"', f'data.source="{data}"', 'data.columns={text = "sentence", label = "y"}',
                      "data.eval_examples=100", "train.batch_size=8"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.clients)
    results = []
    for mode in args.modes.split(","):
        cfg = load_config(None, overrides + [f'run.name="{mode}"'])
        cfg_path = work / f"{mode}.toml"
        cfg_path.write_text(to_toml(cfg))
        print(f"running {mode} …", flush=True)
        results.append(run_mode(mode, cfg_path, work / mode, threads))
    base = next((r for r in results if r["mode"] == "embedded" and r["round_after_first_s"]), None)
    for r in results:  # against the embedded engine, measured side by side in this run
        if base and r["round_after_first_s"]:
            r["round_vs_embedded"] = r["round_after_first_s"] / base["round_after_first_s"]
            r["memory_vs_embedded"] = r["peak_pss_mb"] / base["peak_pss_mb"]
            r["rss_vs_embedded"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    info = {"model": args.model or "tiny random BERT (2 layers, hidden 64)", "clients": args.clients,
            "rounds": args.rounds, "local_steps": args.local_steps, "strategy": args.strategy,
            "cpus": os.cpu_count(), "resident_threads": threads, "results": results}
    from fedlora.files import atomic_write

    atomic_write(Path(args.out), json.dumps(info, indent=2))
    print(f"\n{info['model']}, {args.clients} clients, {args.rounds} rounds × {args.local_steps} local steps, "
          f"{args.strategy}, {os.cpu_count()} CPUs\n")
    print(f"{'mode':<24}{'total s':>8}{'round s':>9}{'× emb.':>8}{'rounds s':>26}{'PSS MB':>8}{'× emb.':>8}"
          f"{'RSS MB':>8}{'× emb.':>8}{'model loads':>12}{'acc':>7}")
    for r in results:
        rs = " ".join(f"{x:.1f}" for x in r["round_s"])
        mean = f"{r['round_after_first_s']:.1f}" if r["round_after_first_s"] is not None else "-"
        acc = f"{r['final_accuracy']:.3f}" if r["final_accuracy"] is not None else "-"
        ratios = [f"{r[k]:.2f}" if k in r else "-" for k in ("round_vs_embedded", "memory_vs_embedded", "rss_vs_embedded")]
        loads = "-" if r["model_loads"] is None else str(r["model_loads"])
        print(f"{r['mode']:<24}{r['wall_s']:>8.1f}{mean:>9}{ratios[0]:>8}{rs:>26}{r['peak_pss_mb']:>8.0f}{ratios[1]:>8}"
              f"{r['peak_rss_mb']:>8.0f}{ratios[2]:>8}{loads:>12}{acc:>7}"
              + ("" if r["rc"] == 0 else f"  (exit {r['rc']}; see {r['log']})"))
    print("(round s: mean of the rounds after the first; PSS and RSS: the peak of their sums over the process tree)")
    parts = [r for r in results if r["breakdown_s"]]
    if parts:
        print("\na deployed round after the first, per node (mean over nodes and rounds), s:")
        print(f"{'part':<86}" + "".join(f"{r['mode']:>24}" for r in parts))
        for key, label in PARTS.items():
            print(f"{label:<86}" + "".join(f"{r['breakdown_s'][key]:>24.2f}" for r in parts))
    print("\nat each mode's PSS peak, MB by process kind:")
    for r in results:
        print(f"  {r['mode']:<24}" + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_pss_by_process_mb"].items()))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
