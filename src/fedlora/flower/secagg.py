"""SecAgg+ for sum-compatible strategies, through Flower 1.41's legacy SecAgg+ workflow.

In Flower 1.41 SecAgg+ exists only as ``flwr.server.workflow.SecAggPlusWorkflow`` (driven by a
``LegacyContext`` and a legacy ``configure_fit``/``aggregate_fit`` strategy) with the client mod
``secaggplus_mod``. Each round here:

- :class:`SecAggBridge` (a legacy strategy) hands the workflow one ``FitIns`` per sampled node: the
  fedlora TRAIN content flattened into its parameters (arrays) and config (scalars, plus the
  record/key layout as JSON);
- the node's ClientApp (built with ``secagg=True``: ``mods=[secaggplus_mod]``) rebuilds the fedlora
  content, trains with the shared code, and replies a ``FitRes`` whose parameters are
  ``strategy.payload`` (in key order) and whose ``num_examples`` is the client's weight;
- the mod quantises and masks the payload; the server unmasks only the weighted average
  Σ_k n_k·payload_k / Σ_k n_k (to the quantisation step ≈ 2·clipping_range / quantization_range per
  value), which becomes one aggregate ClientUpdate for ``strategy.aggregate``.

That is exact for strategies whose server needs only Σ p_k·upload_k (``secure_aggregation = True``).
Per-client checks (NaN, shapes) and per-client diagnostics are impossible by design: the server
never sees an individual upload.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Code, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import Strategy as LegacyStrategy

LAYOUT_KEY = "fedlora.layout"


def content_to_fitins(content: RecordDict) -> FitIns:
    """A fedlora TRAIN content as a legacy FitIns: every array in order, every config value, and the
    (record, key) layout to rebuild it."""
    arrays, layout = [], []
    for name, record in content.array_records.items():
        for key, t in record.to_torch_state_dict().items():
            arrays.append(t.numpy())
            layout.append([name, key])
    config: dict[str, Any] = {}
    for name, record in content.config_records.items():
        for key, value in record.items():
            config[f"{name}/{key}"] = value
    config[LAYOUT_KEY] = json.dumps(layout)
    return FitIns(ndarrays_to_parameters(arrays), config)


def fitins_to_content(content: RecordDict) -> RecordDict:
    """The inverse of :func:`content_to_fitins`, from the message content the mod passes on."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    layout = json.loads(str(fitins.config[LAYOUT_KEY]))
    out = RecordDict()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for (name, key), arr in zip(layout, arrays):
        grouped.setdefault(name, {})[key] = torch.from_numpy(np.array(arr))
    for name, tensors in grouped.items():
        out.array_records[name] = ArrayRecord(tensors)
    configs: dict[str, dict] = {}
    for full, value in fitins.config.items():
        if full == LAYOUT_KEY:
            continue
        name, _, key = full.rpartition("/")
        configs.setdefault(name, {})[key] = value
    for name, values in configs.items():
        out.config_records[name] = ConfigRecord(values)
    return out


def reply_to_fitres(payload: dict[str, torch.Tensor], weight: int, metrics: dict[str, Any]) -> RecordDict:
    """A client's payload and metrics as a legacy FitRes record (what ``secaggplus_mod`` masks)."""
    arrays = [t.detach().cpu().numpy() for t in payload.values()]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(weight), dict(metrics))
    return compat.fitres_to_recorddict(res, keep_input=True)


class SecAggBridge(LegacyStrategy):
    """The legacy strategy the SecAgg+ workflow drives: it sends prepared FitIns and keeps what
    ``aggregate_fit`` gets (the unmasked weighted average and each client's metrics)."""

    def __init__(self, fitins: dict[int, FitIns]):
        self.fitins = fitins
        self.aggregate: list[np.ndarray] | None = None
        self.metrics: list[tuple[int, int, dict]] = []  # (node id, num_examples, metrics)
        self.failures: list = []

    def initialize_parameters(self, client_manager):  # noqa: D102
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        proxies = client_manager.all()
        return [(proxies[str(n)], ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        self.failures = list(failures)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
            self.metrics = [(proxy.node_id, res.num_examples, dict(res.metrics)) for proxy, res in results]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


def secagg_round(grid, run_id: int, round_index: int, contents: dict[int, RecordDict], *, max_weight: float,
                 clipping_range: float = 8.0, timeout: float | None = None) -> SecAggBridge:
    """One SecAgg+ round over the nodes of ``contents`` (node id → fedlora TRAIN content)."""
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    bridge = SecAggBridge({n: content_to_fitins(c) for n, c in contents.items()})
    manager = SimpleClientManager()
    for n in contents:
        manager.register(GridClientProxy(n, grid, run_id))
    ctx = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        strategy=bridge, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_index + 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(1, dtype=np.float32)])
    n = len(contents)
    # every node holds a share of every other's secret, and any n-1 can rebuild (one may drop out)
    workflow = SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=max(2, n - 1), max_weight=max_weight,
                                  clipping_range=clipping_range, timeout=timeout)
    workflow(grid, ctx)
    return bridge
