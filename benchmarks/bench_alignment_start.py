"""What Procrustes alignment does from a shared start: ‖R − I‖ by aligned factor, and what aligning one
factor does to the other, in the first rounds after B's zero init. MiniLM on sarcasm, PEFT LoRA.

A measurement, not a test: it asserts nothing.

Every round, every client starts from the global factors (A_ref, B_ref) and the shared head, trains
with plain SGD (no momentum, re-created each round) for ``--local-steps`` steps, and the trained
factors are snapshotted after the first step and after the last. For each snapshot and each layer it
computes the hard (λ = 1) Procrustes rotation that aligns A, B, or both jointly
(:func:`fedlora.align.alignment_rotation`) and records

- ‖R − I‖_F;
- what the rotation does to each factor's distance from its reference: ‖Rᵀ A_k − A_ref‖ / ‖A_k − A_ref‖
  and ‖B_k R − B_ref‖ / ‖B_k − B_ref‖ (1 = unchanged, < 1 = closer, > 1 = pushed away);
- with ``+guard`` (FedRot's ``guard = true``, :func:`fedlora.align.guard_rotation`), the share of
  (client, layer) rotations the guard put back to the identity;
- the round's relative aggregation error ‖mean(B_k A_k) − mean(B_k)·mean(A_k)‖ / ‖mean(B_k A_k)‖ over all
  layers, for the unrotated uploads (fedit) and for each alignment.

The next global adapter is the plain mean of the unrotated uploads (FedIT), so every alignment is
measured at the same references. Why it matters: the gradient of the loss is orthogonal to the
rotation orbit (tests/test_rotation_orbit.py), so one SGD step from a shared start leaves the joint
Procrustes rotation at I + O(η²), while each single-factor rotation moves at first order.

    python benchmarks/bench_alignment_start.py                    # → benchmarks/results/alignment_start.json
    python benchmarks/bench_alignment_start.py --rounds 2 --local-steps 3   # smoke check

The committed runs (10 rounds, 3 clients, Dirichlet 0.5, 20 SGD steps of batch 16, seed 0, about 3 minutes
each on 2 cores): ``--rounds 10 --lr 0.05 --out benchmarks/results/alignment_start-lr0.05.json`` and the same
with ``--lr 0.2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_server.py: spinning OpenMP threads on a shared machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedlora.align import alignment_rotation, guard_rotation, rotate  # noqa: E402
from fedlora.assets import resolve_model  # noqa: E402
from fedlora.data import load_source  # noqa: E402
from fedlora.data.partition import partition  # noqa: E402
from fedlora.factors import Adapter, LoRAPair  # noqa: E402
from fedlora.runtime.model import SharedModel, load_tokenizer  # noqa: E402
from fedlora.files import atomic_write  # noqa: E402
from fedlora.tasks import get_task  # noqa: E402

ALIGNS = ("A", "B", "joint", "A+guard", "B+guard")  # "+guard": FedRot's guard=true


def stacked(adapter: Adapter, names: list[str]) -> LoRAPair:
    return LoRAPair(torch.stack([adapter.layers[n].A for n in names]).double(),
                    torch.stack([adapter.layers[n].B for n in names]).double())


def rel_aggregation_error(pairs: list[LoRAPair]) -> float:
    """‖mean(B_k A_k) − mean(B_k) mean(A_k)‖ / ‖mean(B_k A_k)‖, pooled over the stacked layers."""
    ideal = sum(p.B @ p.A for p in pairs) / len(pairs)
    naive = (sum(p.B for p in pairs) / len(pairs)) @ (sum(p.A for p in pairs) / len(pairs))
    return float((ideal - naive).norm() / ideal.norm())


def measure(clients: list[LoRAPair], ref: LoRAPair) -> dict:
    """Rotation sizes and factor-distance ratios (median and max over clients × layers) and the
    aggregation error of each alignment, for the clients' stacked factors against the reference."""
    eye = torch.eye(ref.A.shape[-2], dtype=torch.float64)
    out = {"ref_norm_A": float(ref.A.norm(dim=(-2, -1)).mean()), "ref_norm_B": float(ref.B.norm(dim=(-2, -1)).mean()),
           "step_norm_A": float(statistics.mean(float((c.A - ref.A).norm(dim=(-2, -1)).mean()) for c in clients)),
           "step_norm_B": float(statistics.mean(float((c.B - ref.B).norm(dim=(-2, -1)).mean()) for c in clients)),
           "agg_error": {"fedit": rel_aggregation_error(clients)}}
    for how in ALIGNS:
        sizes, ratio_a, ratio_b, rotated, reset = [], [], [], [], []
        factor, guard = how.split("+")[0], how.endswith("+guard")
        for c in clients:
            R = alignment_rotation(c, ref, factor, lam=1.0, what=f"align {how}")
            if guard:
                R, was_reset = guard_rotation(c, ref, R)
                reset += was_reset.tolist()
            q = rotate(c, R)
            rotated.append(q)
            sizes += torch.linalg.matrix_norm(R - eye).tolist()
            ratio_a += ((q.A - ref.A).norm(dim=(-2, -1)) / (c.A - ref.A).norm(dim=(-2, -1))).tolist()
            ratio_b += ((q.B - ref.B).norm(dim=(-2, -1)) / (c.B - ref.B).norm(dim=(-2, -1))).tolist()
        out[how] = {"rot_median": statistics.median(sizes), "rot_max": max(sizes),
                    "dA_ratio_median": statistics.median(ratio_a), "dA_ratio_max": max(ratio_a),
                    "dB_ratio_median": statistics.median(ratio_b), "dB_ratio_max": max(ratio_b)}
        if guard:
            out[how]["guarded_fraction"] = sum(reset) / len(reset)
        out["agg_error"][how] = rel_aggregation_error(rotated)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dirichlet", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "alignment_start.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    path = str(resolve_model("minilm"))
    train = load_source("sarcasm", seed=args.seed)["train"]
    task = get_task("classification", load_tokenizer(path), args.max_length)
    data = task.encode(train)
    parts = partition(np.asarray(train["label"]), args.clients, "dirichlet", alpha=args.dirichlet, seed=args.seed)
    shared = SharedModel(task.load_model(path, torch.float32, train), task_type="SEQ_CLS", rank=args.rank,
                         alpha=args.alpha, dropout=0.0, target_modules=["query", "value"])
    scaling = args.alpha / args.rank
    global_adapter = shared.read()  # PEFT init: A Kaiming-uniform, B = 0
    names = list(global_adapter.layers)
    rng = np.random.default_rng(args.seed)
    rows = []
    for rnd in range(args.rounds):
        ref = stacked(global_adapter, names)
        snaps: dict[str, list[LoRAPair]] = {"step1": [], "final": []}
        uploads, losses = [], []
        for k in range(args.clients):
            shared.load(global_adapter, scaling)
            params = shared.set_trainable(frozenset("AB"), extras=True)
            opt = torch.optim.SGD(params, lr=args.lr)  # plain SGD, re-created each round (the authors' code)
            for step in range(args.local_steps):
                batch = task.collate(data, rng.choice(parts[k], args.batch_size, replace=False), torch.device("cpu"))
                loss = torch.nn.functional.cross_entropy(task.scores(shared.model, batch), batch["labels"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if step == 0:
                    snaps["step1"].append(stacked(shared.read(), names))
            trained = shared.read()
            snaps["final"].append(stacked(trained, names))
            uploads.append(trained.to_state_dict())
        row = {"round": rnd, "train_loss": statistics.mean(losses)}
        for when, clients in snaps.items():
            # in round 0 B_ref = 0: Bᵀ·B_ref = 0 and aligning B is degenerate (FedRot never aligns round 0)
            row[when] = measure(clients, ref)
        rows.append(row)
        mean = {key: sum(u[key] for u in uploads) / len(uploads) for key in uploads[0]}  # FedIT, uniform weights
        global_adapter = Adapter.from_state_dict(mean)
        print(f"round {rnd}: loss {row['train_loss']:.3f}, ‖B_ref‖ {row['final']['ref_norm_B']:.3g}, "
              + ", ".join(f"{how}: ‖R−I‖ {row['final'][how]['rot_median']:.3g} "
                          f"(dA× {row['final'][how]['dA_ratio_median']:.3g}, dB× {row['final'][how]['dB_ratio_median']:.3g})"
                          for how in ALIGNS if how in row["final"])
              + f"; agg err {json.dumps({k: round(v, 4) for k, v in row['final']['agg_error'].items()})}", flush=True)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rounds": rows,
              "seconds": time.perf_counter() - t0, "torch": torch.__version__, "python": sys.version.split()[0]}
    atomic_write(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
