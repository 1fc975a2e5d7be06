"""The same federated work under the embedded engine, Flower's simulation runtime and a Flower
deployment on loopback (SuperLink + SuperNodes + flwr run), side by side: round wall time, total
wall time and peak memory of the whole process tree (sampled from /proc every 0.1 s).

    python benchmarks/bench_flower.py                 # tiny BERT, 3 clients, 3 rounds; JSON + table
    python benchmarks/bench_flower.py --model minilm --clients 4 --rounds 3   # a real model (catalog)

Writes benchmarks/results/flower.json. Each mode runs in its own Python process, so imports, model
loading and (for Flower) Ray or SuperLink start-up are all counted; "round" is the ServerApp's (or
the engine's) own per-round wall time from metrics.jsonl. Measurements, not tests: nothing asserts.
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

MODES = ("embedded", "flower-sim", "flower-deploy")

RUNNER = textwrap.dedent("""
    import sys, torch
    from fedlora.config import load_config
    mode, cfg_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = load_config(cfg_path)
    if mode == "embedded":
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
        app = write_app(out + "/app", cfg_path)
        with LocalDeployment(out + "/deploy", cfg.partition.num_clients) as d:
            r = d.run_app(app, timeout=1800)
            if r.returncode:
                sys.exit(r.stdout[-3000:])
""")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants now."""
    from fedlora.flower.deploy import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_mode(mode: str, cfg_path: Path, out: Path) -> dict:
    """Run one mode in a fresh process; its wall time, peak tree RSS and per-round times."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", RUNNER, mode, str(cfg_path), str(out)],
                         stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(p.pid))
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
    return {"mode": mode, "rc": rc, "wall_s": wall, "peak_rss_mb": peak / 2**20, "round_s": rounds,
            "round_mean_s": sum(rounds) / len(rounds) if rounds else None,
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
    results = []
    for mode in args.modes.split(","):
        cfg = load_config(None, overrides + [f'run.name="{mode}"'])
        cfg_path = work / f"{mode}.toml"
        cfg_path.write_text(to_toml(cfg))
        print(f"running {mode} …", flush=True)
        results.append(run_mode(mode, cfg_path, work / mode))
    info = {"model": args.model or "tiny random BERT (2 layers, hidden 64)", "clients": args.clients,
            "rounds": args.rounds, "local_steps": args.local_steps, "strategy": args.strategy,
            "cpus": os.cpu_count(), "results": results}
    from fedlora.files import atomic_write

    atomic_write(Path(args.out), json.dumps(info, indent=2))
    print(f"\n{info['model']}, {args.clients} clients, {args.rounds} rounds × {args.local_steps} local steps, "
          f"{args.strategy}, {os.cpu_count()} CPUs\n")
    print(f"{'mode':<15}{'total s':>9}{'round s (mean)':>16}{'rounds s':>24}{'peak RSS MB':>13}{'acc':>7}")
    for r in results:
        rs = " ".join(f"{x:.1f}" for x in r["round_s"])
        mean = f"{r['round_mean_s']:.1f}" if r["round_mean_s"] is not None else "-"
        acc = f"{r['final_accuracy']:.3f}" if r["final_accuracy"] is not None else "-"
        print(f"{r['mode']:<15}{r['wall_s']:>9.1f}{mean:>16}{rs:>24}{r['peak_rss_mb']:>13.0f}{acc:>7}"
              + ("" if r["rc"] == 0 else f"  (exit {r['rc']}; see {r['log']})"))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
