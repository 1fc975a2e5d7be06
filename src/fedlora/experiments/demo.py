"""``fedlora demo``: every strategy on a synthetic federation, in seconds, with no downloads.

Each client k owns a target update T_k = T + H_k for every layer (a shared low-rank part T and a
client-specific part H_k: non-IID). Local training is a few SGD steps on the relative error
‖W₀ + s·B·A − (W_init + T_k)‖² / ‖T_k‖² over the factors the strategy trains, with the strategy's
regulariser, scaling, personal state, pre-upload transform and base-weight merges, i.e. every hook
in the order an engine calls them. The table reports the mean relative aggregation error and how
far the resulting global model is from the mean target: a tour of the core, not a benchmark.
"""

from __future__ import annotations

import argparse
import time

# torch is imported inside the functions: `fedlora --help` builds every command's parser and must
# not load torch to do it


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="every strategy on a synthetic federation (no downloads, seconds)")
    p.add_argument("--strategies", default="", help="comma-separated names (default: all registered)")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def _targets(args, g):
    """Per layer: the shared part T and each client's T_k (rank-2 heterogeneity on top)."""
    import torch

    shared = {f"layer{i}": torch.randn(args.dim, 3, generator=g) @ torch.randn(3, args.dim, generator=g) * 0.1
              for i in range(args.layers)}
    return shared, [
        {n: T + torch.randn(args.dim, 2, generator=g) @ torch.randn(2, args.dim, generator=g) * 0.08
         for n, T in shared.items()}
        for _ in range(args.clients)]


class Diverged(RuntimeError):
    """Local training produced a non-finite loss (e.g. too large a scaling for the demo's step size)."""


def _local_train(strategy, start, personal_ref, target, base, scaling, rnd, steps=15, lr=0.5):
    """SGD on the relative error to the client's target, over the strategy's trainable factors."""
    import torch

    from fedlora.factors import Adapter, LoRAPair

    trainable = strategy.trainable(rnd)
    params = {n: LoRAPair(p.A.clone().requires_grad_("A" in trainable), p.B.clone().requires_grad_("B" in trainable))
              for n, p in start.layers.items()}
    leaves = [t for p in params.values() for t in p if t.requires_grad]
    opt = torch.optim.SGD(leaves, lr=lr)
    for _ in range(steps):
        live = Adapter(params, start.extras)
        loss = sum(((base[n] + scaling * p.B @ p.A - target[n]) ** 2).sum() / (target[n] ** 2).sum()
                   for n, p in params.items()) / len(params)
        reg = strategy.regularizer(live, personal_ref, scaling)
        if reg is not None:
            loss = loss + reg
        if not torch.isfinite(loss):
            raise Diverged(f"local training diverged in round {rnd} (scaling {scaling:.3g})")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Adapter({n: LoRAPair(p.A.detach(), p.B.detach()) for n, p in params.items()}, dict(start.extras))


def simulate(name: str, args) -> dict:
    import torch

    from fedlora.diagnostics import round_diagnostics
    from fedlora.factors import Adapter, LoRAPair
    from fedlora.strategies import ClientContext, ClientUpdate, get_strategy

    g = torch.Generator().manual_seed(args.seed)
    shared, client_targets = _targets(args, g)
    strategy = get_strategy(name)
    init = Adapter({n: LoRAPair(torch.randn(args.rank, args.dim, generator=g) / args.dim ** 0.5,
                                torch.zeros(args.dim, args.rank)) for n in shared})
    state = strategy.init_state(init, alpha=2 * args.rank, seed=args.seed)
    base = {n: torch.zeros(args.dim, args.dim) for n in shared}  # W₀ − W_init: what merges have added
    personal: dict[int, Adapter | None] = {}
    errors, up_bytes = [], 0
    for rnd in range(args.rounds):
        updates = []
        for k, target in enumerate(client_targets):
            ctx = ClientContext(client_id=k, round=rnd, num_samples=10 + 5 * k, rank=args.rank,
                                alpha=2 * args.rank, num_clients=args.clients, total_clients=args.clients,
                                seed=args.seed)
            start = strategy.client_start(state, personal.get(k), ctx)
            s = strategy.scaling(ctx, args.rank)
            trained = _local_train(strategy, start, start, target, base, s, rnd)
            adapter, info = strategy.before_upload(trained, start, ctx)
            personal[k] = strategy.personal_state(adapter)
            payload = strategy.payload(adapter, rnd)
            up_bytes += sum(t.numel() * t.element_size() for t in payload.values())
            updates.append(ClientUpdate(k, strategy.receive(payload, state, rnd), ctx.num_samples, s, info))
        state = strategy.aggregate(updates, state)
        diag = round_diagnostics(updates, strategy.weights(updates), state).to_dict()
        if diag["agg_error_rel"] is not None:  # None when the ideal update is zero
            errors.append(diag["agg_error_rel"])
        for n, delta in (state.base_delta or {}).items():
            base[n] += delta.B @ delta.A
    mean_target = {n: sum(t[n] for t in client_targets) / len(client_targets) for n in shared}
    model = {n: base[n] + state.scaling * p.B @ p.A for n, p in state.adapter.layers.items()}
    gap = sum(float((model[n] - mean_target[n]).norm() ** 2) for n in shared) ** 0.5 / \
        sum(float(mean_target[n].norm() ** 2) for n in shared) ** 0.5
    return {"strategy": name, "agg_error_rel": sum(errors) / max(len(errors), 1), "gap": gap,
            "up_mb": up_bytes / 2 ** 20}


def run_demo(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedlora.strategies import strategy_names

    names = [s for s in args.strategies.split(",") if s] or strategy_names()
    console = Console()
    console.print(f"[bold]fedlora demo[/]: {args.clients} clients, {args.layers} layers of {args.dim}×{args.dim}, "
                  f"rank {args.rank}, {args.rounds} rounds, synthetic non-IID targets")
    table = Table("strategy", "mean rel. aggregation error", "global gap to mean target", "upload MB", "s")
    for name in names:
        t0 = time.perf_counter()
        try:
            res = simulate(name, args)
        except Diverged as e:
            table.add_row(name, "[red]diverged[/]", str(e), "", f"{time.perf_counter() - t0:.1f}")
            continue
        table.add_row(name, f"{res['agg_error_rel']:.2e}", f"{res['gap']:.3f}", f"{res['up_mb']:.2f}",
                      f"{time.perf_counter() - t0:.1f}")
    console.print(table)
    console.print("Aggregation error: ‖Σ p_k s_k B_k A_k − global update‖ / ‖Σ p_k s_k B_k A_k‖ per round, "
                  "averaged. For fedsa/sfed the global adapter is only the shared A: their models are personal.")
    return 0
