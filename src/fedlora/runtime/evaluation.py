"""Evaluation, shared by both engines: the global model on the global validation subset, and each
client's personal model on its held-out slice, wherever that client lives.

The round loop evaluates the global model itself; a transport evaluates the personal models
(in process, or on the nodes that hold the personal state) with :func:`evaluate_client`, and the
loop combines them with :func:`personal_summary`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlora.factors import Adapter
from fedlora.runtime.federation import Federation, client_context
from fedlora.strategies import GlobalState


def evaluate_global(fed: Federation, state: GlobalState) -> dict[str, Any]:
    """The global adapter on the global validation subset."""
    ev = fed.cfg.eval
    fed.shared.load(state.adapter, state.scaling)
    return fed.task.evaluate(fed.shared.model, fed.validation, fed.eval_indices, ev.batch_size, fed.device,
                             fed.autocast())


def evaluate_client(fed: Federation, state: GlobalState, personal: Adapter | None, k: int) -> dict[str, Any] | None:
    """Client ``k``'s own model (``client_start`` with its personal state) on its held-out slice (the
    first ``eval.client_examples`` of it, if set); None when the slice is empty."""
    ev = fed.cfg.eval
    idx = fed.client_heldout[k]
    if ev.client_examples > 0:
        idx = idx[: ev.client_examples]
    if len(idx) == 0:
        return None
    ctx = client_context(fed, k, state.round, fed.num_clients)
    start = fed.strategy.client_start(state, personal, ctx)
    rank = next(iter(start.layers.values())).rank
    fed.shared.load(start, fed.strategy.scaling(ctx, rank))
    return fed.task.evaluate(fed.shared.model, fed.train, idx, ev.batch_size, fed.device, fed.autocast())


def personal_summary(per_client: Mapping[int, Mapping[str, Any]], metrics: list[str]) -> dict[str, Any] | None:
    """Each metric over the clients' personal evaluations, weighted by held-out slice size and
    unweighted (mean over clients), the number of clients, and the headline metric per client."""
    if not per_client:
        return None
    ks = sorted(per_client)
    sizes = np.array([per_client[k]["examples"] for k in ks], dtype=float)
    out: dict[str, Any] = {}
    for metric in metrics:
        vals = np.array([per_client[k][metric] for k in ks], dtype=float)
        out[f"{metric}_weighted"] = float((vals * sizes).sum() / sizes.sum())
        out[f"{metric}_unweighted"] = float(vals.mean())
    out["clients"] = len(ks)
    out["per_client"] = {str(k): per_client[k][metrics[0]] for k in ks}
    return out
