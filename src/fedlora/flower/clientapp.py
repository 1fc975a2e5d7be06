"""The fedlora ClientApp: one node's round with the same client code as the in-process transport.

Per TRAIN message the node

1. gets the run's :class:`~fedlora.runtime.federation.Federation` (task, shared PEFT model, encoded data,
   partitions) from a per-process cache keyed by the config text: the base model is loaded once per
   ClientApp process, never per round (Flower's simulation keeps one process per Ray actor; a
   deployed SuperNode in 1.41 starts one ``flwr-clientapp`` process per message, see docs/flower.md);
2. rebuilds the round's :class:`~fedlora.strategies.GlobalState` from the message (the parts the
   strategy broadcasts this round) and its cached copy of the global adapter in ``Context.state``;
3. brings the shared model's frozen base to its own merged base changes (FedEx, FLoRA) kept in
   ``Context.state``, merging the new ones the server sent;
4. trains with :func:`fedlora.runtime.training.client_round` (``client_start`` with its personal state
   from its own disk, :mod:`fedlora.flower.nodestore`; local training; ``before_upload``), keeps its
   new personal state there, and
5. replies with ``strategy.payload`` as an ArrayRecord, its sample count, scaling, loss and the
   strategy's ``info``.

Per EVALUATE message (``eval.personalised``) it does steps 1-3 with the full global adapter and
evaluates its personal model on its held-out slice
(:func:`fedlora.runtime.evaluation.evaluate_client`).

Its partition is ``node_config["partition-id"]`` of ``num-partitions``, as Flower assigns them.
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()  # the imports below (torch, transformers, peft, fedlora) are a per-process cost

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FedLoRAError
from fedlora.factors import Adapter
from fedlora.flower import records as rec
from fedlora.flower.channel import ProcessClock
from fedlora.flower.nodestore import load_personal, save_personal, store_path
from fedlora.runtime.evaluation import evaluate_client
from fedlora.runtime.federation import client_context, prepare
from fedlora.runtime.privacy import upload_weighting
from fedlora.runtime.training import ClientTrainingError, LocalResult, client_round
from fedlora.strategies import GlobalState

_OWN_CLOCK = ProcessClock(time.time() - _T_IMPORT)

# Context.state keys (per node, persist across rounds within a run)
STATE_GLOBAL = "fedlora.global"  # the last global adapter this node received, all parts
STATE_BASE = "fedlora.base"  # Σ of merged base changes, dense per layer (fp32)
STATE_META = "fedlora.meta"  # {"base-version": deltas merged so far}


@dataclass
class _Cached:
    """One run's Federation in this process, plus the pristine base weights of its LoRA layers so
    several virtual nodes (each with its own merged base changes) can share one model."""

    fed: object
    pristine: dict[str, torch.Tensor]
    applied: tuple | None = None  # (node key, base version) the model's base weights hold now
    loads: int = 1
    extra: dict = field(default_factory=dict)


_CACHE: dict[str, _Cached] = {}


_PRESET: dict[str, dict] = {}  # the clock the forwarding ClientApp measured for the message in hand (see take_clock)


def set_clock(clock: Mapping[str, float]) -> None:
    """The node-side clock of the next message, as measured by the process that received it from
    Flower (the forwarding ClientApp, when a resident worker does the work)."""
    _PRESET["clock"] = dict(clock)


def take_clock() -> dict[str, float]:
    """The clock of the message being handled: the one set by :func:`set_clock`, else this process's."""
    return _PRESET.pop("clock", None) or _OWN_CLOCK()


def config_key(cfg_text: str) -> str:
    return hashlib.sha256(cfg_text.encode()).hexdigest()


def cached_federation(cfg_text: str) -> _Cached:
    """The Federation for this config, prepared once per process (model, data, partitions)."""
    key = config_key(cfg_text)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    from fedlora.config import from_dict
    import tomllib


    cfg = from_dict(tomllib.loads(cfg_text)).validate()
    fed = prepare(cfg, log=lambda *_: None)
    pristine = {name: m.get_base_layer().weight.detach().clone() for name, m in fed.shared.lora_layers.items()}
    _CACHE.clear()  # one run per process at a time: drop any previous run's model
    _CACHE[key] = _Cached(fed, pristine)
    return _CACHE[key]


def partition_of(context: Context, num_clients: int) -> int:
    """This node's client index from ``node_config`` (``partition-id``, ``num-partitions``)."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ConfigError("node_config has no 'partition-id': start the SuperNode with "
                          "--node-config 'partition-id=K num-partitions=N'")
    k = int(nc["partition-id"])
    n = int(nc.get("num-partitions", num_clients))
    if n != num_clients:
        raise ConfigError(f"node_config num-partitions = {n}, but the run's partition.num_clients = {num_clients}")
    if not 0 <= k < num_clients:
        raise ConfigError(f"node_config partition-id = {k}: must be in [0, {num_clients})")
    return k


def _apply_base(cached: _Cached, context: Context, content: RecordDict) -> int:
    """Bring the shared model's base weights to this node's merged base changes plus the new
    deltas in the message; returns the node's base version (deltas merged).

    The weights are always rebuilt as pristine + the sum of the merged changes (summed in order),
    never updated in place: a node that lost its state (a resumed run) rebuilds them bit for bit."""
    shared = cached.fed.shared
    meta = context.state.config_records.get(STATE_META, ConfigRecord({"base-version": 0}))
    version = int(meta["base-version"])
    merged = rec.record_to_tensors(context.state.array_records[STATE_BASE]) \
        if STATE_BASE in context.state.array_records else {}
    cfg = content.config_records[rec.KEY_CONFIG]
    first, count = int(cfg.get("base-from", 0)), int(cfg.get("base-count", 0))
    for i in range(first, first + count):
        if i < version:  # already merged (the server did not see our last reply): never twice
            continue
        if i > version:
            raise ConfigError(f"node {context.node_id}: base delta {i} arrived but {version} is the next one needed")
        for layer, pair in rec.record_to_base_delta(content.array_records[f"{rec.KEY_BASE_DELTA}{i}"]).items():
            if layer not in shared.lora_layers:
                raise ConfigError(f"base_delta names layer {layer!r}, which is not a LoRA layer of the model")
            d = pair.B.float() @ pair.A.float()  # the engine's own W₀ += B·A
            merged[layer] = d if layer not in merged else merged[layer] + d
        version += 1
    node = (context.run_id, context.node_id)
    if cached.applied != (node, version):  # another node, an older version of ours, or nothing is on the model
        with torch.no_grad():
            for name, module in shared.lora_layers.items():
                module.get_base_layer().weight.copy_(cached.pristine[name])
        for layer, dense in merged.items():
            shared.add_to_base(layer, dense, accumulate=False)
    if merged:
        context.state.array_records[STATE_BASE] = rec.tensors_to_record(merged)
    context.state.config_records[STATE_META] = ConfigRecord({"base-version": version})
    cached.applied = (node, version)
    return version


def _global_state(context: Context, content: RecordDict) -> GlobalState:
    """The round's GlobalState: the broadcast parts over this node's cached copy of the rest."""
    cfg = content.config_records[rec.KEY_CONFIG]
    tensors = {}
    if STATE_GLOBAL in context.state.array_records:
        tensors.update(rec.record_to_tensors(context.state.array_records[STATE_GLOBAL]))
    elif not bool(cfg.get("full", True)):
        raise ConfigError(f"node {context.node_id}: the server sent a partial adapter but this node has no "
                          "cached global adapter")
    tensors.update(rec.record_to_tensors(content.array_records[rec.KEY_GLOBAL]))
    context.state.array_records[STATE_GLOBAL] = rec.tensors_to_record(tensors)
    return GlobalState(adapter=Adapter.from_state_dict(tensors), round=int(cfg["round"]), scaling=float(cfg["scaling"]),
                       info=rec.from_json(str(cfg.get("state-info", ""))))


def _inject_fault(kind: str, payload: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test hook: corrupt a reply as a faulty node would (``nan`` values or a ``shape`` mismatch)."""
    out = {k: v.clone() for k, v in payload.items()}
    key = next(iter(out))
    if kind == "nan":
        out[key].view(-1)[0] = float("nan")
    elif kind == "shape":
        out[key] = torch.zeros(out[key].shape[0] + 1, *out[key].shape[1:], dtype=out[key].dtype)
    elif kind == "exit":
        os._exit(3)  # a node dying mid-round
    else:
        raise ConfigError(f"unknown fault {kind!r}; expected nan, shape or exit")
    return out


def _node_round(content: RecordDict, context: Context):
    """What a TRAIN or EVALUATE message sets up on this node: its Federation, client index, the
    round's GlobalState, its base version, its personal state and where that is stored."""
    cfg_rec = content.config_records[rec.KEY_CONFIG]
    text = str(cfg_rec["fedlora-config"])
    loads = int(config_key(text) not in _CACHE)
    cached = cached_federation(text)
    fed = cached.fed
    k = partition_of(context, fed.num_clients)
    state = _global_state(context, content)
    base_version = _apply_base(cached, context, content)
    store = store_path(context.node_config, str(cfg_rec["run-token"]), k)
    timing = {"model-loads": loads, "load-data-s": fed.load_s.get("data", 0.0) * loads,
              "load-model-s": fed.load_s.get("model", 0.0) * loads, "worker-pid": os.getpid()}
    return fed, k, state, base_version, load_personal(store, state.round), store, timing


def _timed(clock: Mapping[str, float], timing: dict, **seconds: float) -> dict[str, float]:
    """A reply's timing metrics: the node-side clock, what this message loaded, the phases given, and
    ``t-end`` (epoch s) when its work ended."""
    return {**clock, **timing, **seconds, "t-end": time.time()}


def train_round(content: RecordDict, context: Context, faults: Mapping[int, str], loss_fn=None) -> dict:
    """One TRAIN message's work: returns {"payload" (None if training failed), "metrics", "info",
    "weighting"}."""
    clock = take_clock()
    fed, k, state, base_version, personal, store, timing = _node_round(content, context)
    ctx = client_context(fed, k, state.round, int(content.config_records[rec.KEY_CONFIG]["num-sampled"]))
    loss = (lambda m, b: loss_fn(m, b, k)) if loss_fn else None
    t_train = time.perf_counter()
    try:
        result, adapter, mine, info = client_round(fed, state, personal, ctx, loss)
    except ClientTrainingError as e:  # train.fail_fast: reply the failure, the server stops the run (raised
        # here, the runtime would only turn it into an error reply, which the server counts as a lost client)
        result, adapter, mine, info = LocalResult(None, float("nan"), 0, str(e)), None, personal, {}
    metrics = {"num-examples": ctx.num_samples, "partition-id": k, "rank": ctx.rank or 0,
               "steps": result.steps, "base-version": base_version, "failed": int(adapter is None),
               **_timed(clock, timing, **{"train-s": time.perf_counter() - t_train})}
    out = {"payload": None, "metrics": metrics, "info": {"error": result.error or "failed"},
           "weighting": upload_weighting(fed.cfg, fed.strategy)}
    if adapter is None:
        return out
    if mine is not None:
        save_personal(store, state.round, mine)
    payload = fed.strategy.payload(adapter, state.round)
    fault = str(faults.get(k) or context.node_config.get("fedlora-fault") or "")
    kind, _, only_round = fault.partition("@")  # "exit@2": only in round 2
    if kind and (not only_round or int(only_round) == state.round + 1):
        payload = _inject_fault(kind, payload)
    metrics.update(scaling=float(info.pop("scaling")), loss=float(result.loss))
    out.update(payload=payload, info=info)
    return out


def evaluate_round(msg: Message, context: Context) -> Message:
    """One EVALUATE message: this client's personal model on its held-out slice (empty metrics when
    the slice is empty)."""
    clock = take_clock()
    fed, k, state, base_version, personal, _, timing = _node_round(msg.content, context)
    t_eval = time.perf_counter()
    metrics = evaluate_client(fed, state, personal, k) or {}
    return Message(RecordDict({rec.KEY_INFO: ConfigRecord({
        "metrics": rec.to_json(metrics, f"client {k} evaluation"), "base-version": base_version}),
        rec.KEY_METRICS: MetricRecord(_timed(clock, timing, **{"evaluate-s": time.perf_counter() - t_eval}))}),
        reply_to=msg)


def make_client_app(faults: Mapping[int, str] | None = None, secagg: bool = False, loss_fn=None) -> ClientApp:
    """The fedlora ClientApp. ``secagg``: the SecAgg+ variant (``secaggplus_mod``; see
    :mod:`fedlora.flower.secagg`). ``faults`` (tests only) maps a partition id to a fault its replies
    carry (``"nan"``, ``"shape"``, ``"exit"``; ``"exit@2"``: in round 2 only); a node's ``node_config["fedlora-fault"]`` does the same
    in a deployment. ``loss_fn(model, batch, client_id)`` (tests only, in process) replaces the task's
    loss, as in ``fedlora.sim.run``."""
    mods = []
    if secagg:
        from flwr.client.mod import secaggplus_mod

        mods.append(secaggplus_mod)
    app = ClientApp(mods=mods)
    faults = dict(faults or {})

    def query(msg: Message, context: Context) -> Message:
        nc = context.node_config
        return Message(RecordDict({rec.KEY_NODE: ConfigRecord({
            "partition-id": int(nc.get("partition-id", -1)), "num-partitions": int(nc.get("num-partitions", -1))})}),
            reply_to=msg)

    app.query()(query)
    app.evaluate()(evaluate_round)

    if secagg:
        from fedlora.flower import secagg as sa

        @app.train()
        def train_secagg(msg: Message, context: Context) -> Message:
            out = train_round(sa.fitins_to_content(msg.content), context, faults, loss_fn)
            if out["payload"] is None:  # no upload: the workflow counts this node as dropped
                raise FedLoRAError(out["info"]["error"])
            weight = out["metrics"]["num-examples"] if out["weighting"] == "samples" else 1
            return Message(sa.reply_to_fitres(out["payload"], weight, dict(out["metrics"],
                                              info=rec.to_json(out["info"], "client info"))), reply_to=msg)

        return app

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        out = train_round(msg.content, context, faults, loss_fn)
        if out["payload"] is None:  # local training failed (NaN loss): report it, upload nothing
            return Message(RecordDict({rec.KEY_METRICS: MetricRecord(out["metrics"]),
                                       rec.KEY_INFO: ConfigRecord({"error": out["info"]["error"]})}), reply_to=msg)
        return Message(RecordDict({
            rec.KEY_PAYLOAD: rec.tensors_to_record(out["payload"]),
            rec.KEY_METRICS: MetricRecord(out["metrics"]),
            rec.KEY_INFO: ConfigRecord({"info": rec.to_json(out["info"], f"client {out['metrics']['partition-id']} info")}),
        }), reply_to=msg)

    return app


def cached_runs() -> dict[str, RunConfig]:
    """The configs of the Federations cached in this process (tests check the model is loaded once)."""
    return {k: c.fed.cfg for k, c in _CACHE.items()}


#: The app ``flwr run`` loads (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
#: The SecAgg+ variant (``clientapp = "fedlora.flower.clientapp:secagg_app"``, with ``secagg = true``).
secagg_app = make_client_app(secagg=True)
