"""The Flower transport: the shared round loop (:mod:`fedlora.runtime.loop`) over a Flower
:class:`~flwr.serverapp.Grid`, and the ServerApp that runs it.

Per round the loop asks :class:`FlowerTransport` to train the sampled clients: one TRAIN message per
sampled node (the config, round, scaling, the global adapter's broadcast parts, all parts to a node
that has none cached, and the base-weight changes it has not merged) → replies → per reply:
``strategy.receive`` + ``strategy.validate`` (a bad reply is dropped and logged, naming the client;
a missing one counts as failed after the round timeout) → the valid updates, or under SecAgg+ the one
aggregate. Personal models are evaluated on the nodes that hold them (EVALUATE messages). Everything
else (sampling, aggregation, diagnostics, the metrics row, the checkpoint, resume, Ctrl-C, the
summary) is the loop's, exactly as ``fedlora run``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig, from_dict, load_config, to_toml
from fedlora.errors import AggregationInputError, ConfigError, RoundFailedError
from fedlora.flower import records as rec
from fedlora.runtime.federation import Federation, client_context
from fedlora.runtime.privacy import upload_weighting
from fedlora.runtime.signals import raise_if_stopped
from fedlora.runtime.training import ClientTrainingError
from fedlora.runtime.transport import RoundReplies
from fedlora.strategies import ClientUpdate, GlobalState

__all__ = ["FlowerOptions", "FlowerServer", "FlowerTransport", "RoundFailedError", "make_server_app"]


@dataclasses.dataclass
class FlowerOptions:
    """Flower-side settings (not part of RunConfig).

    min_replies: valid replies a round needs, else it fails (default 1).
    round_timeout: seconds to wait for a round's replies; missing replies count as failed.
    node_wait: seconds to wait for all SuperNodes to connect.
    secagg: aggregate with SecAgg+ (strategies with ``secure_aggregation`` only).
    """

    min_replies: int = 1
    round_timeout: float = 600.0
    node_wait: float = 120.0
    secagg: bool = False


def check_secagg(cfg: RunConfig, options: FlowerOptions) -> None:
    """Refuse SecAgg+ for a strategy whose server needs more than the weighted sum of uploads."""
    if not options.secagg:
        return
    if cfg.privacy.mode == "client" and cfg.privacy.adaptive_clip:
        raise ConfigError("privacy.adaptive_clip with SecAgg+ is not implemented: the count of unclipped updates "
                          "would need a secure sum of its own; use a fixed privacy.clip with --secagg")
    from fedlora.runtime.federation import build_strategy

    strategy = build_strategy(cfg)
    if not strategy.secure_aggregation:
        raise ConfigError(f"strategy {strategy.name!r} cannot run under SecAgg+: SecAgg+ reveals only the sum of "
                          "the uploads, and this strategy's server needs each client's upload (e.g. to stack, "
                          "re-factor or correct them), so it would have nothing to aggregate")


#: What a TRAIN reply reports of its node's time (see ``channel.ProcessClock`` and ``clientapp._timed``): epoch
#: seconds on the node's clock (``t-start`` of the process, ``t-handler``, ``t-end``), seconds spent
#: (imports, loading data and model: 0 when the node had them, training), the model loads (0/1), and
#: the pid of the process that did the work. The transport adds its own ``t-push`` and ``t-reply``.
NODE_TIMES = ("t-start", "t-handler", "imports-s", "load-data-s", "load-model-s", "train-s", "t-end",
              "model-loads", "worker-pid")


class FlowerTransport:
    """Reach the clients through Flower messages. Nodes keep their personal state (FedSA's B) and
    their merged base changes; the server keeps, for an exact resume, the base changes it has sent
    and the run's token, which names the nodes' stored personal states."""

    engine = "flower"
    resume_command = "fedlora flower sim --resume"

    def __init__(self, grid: Grid, options: FlowerOptions, log: Callable[[str], None] = print,
                 resume_command: str | None = None):
        self.grid = grid
        self.options = options
        self.min_replies = options.min_replies
        self.log = log
        self.resume_command = resume_command or self.resume_command

    # ---- the Transport interface ------------------------------------------------------------------
    def open(self, fed: Federation, checkpoint: Mapping[str, Any] | None) -> None:
        self.fed, self.strategy = fed, fed.strategy
        self.cfg_text = to_toml(fed.cfg)  # what every node builds its Federation from
        saved = (checkpoint or {}).get("extra", {}).get("transport", {})
        self.token = saved.get("token") or uuid.uuid4().hex  # names the nodes' stored personal states
        self.deltas: list = list(saved.get("deltas", []))  # every aggregation's base change, in order
        self.seen_round = checkpoint["round"] if checkpoint is not None else 0
        self.has_global: set[int] = set()  # nodes holding a full copy of the global adapter
        self.known_base: dict[int, int] = {}  # node → base deltas it has merged (from its last reply)
        self.timing: dict[int, dict[str, float]] = {}  # client → node-side times of its last TRAIN reply
        self.row: dict[str, Any] = {}  # the round's extra metrics-row keys (Flower's bytes, node times, loads)
        self.arrived: dict[str, float] = {}  # message id → when its reply was pulled (epoch s)
        self.pid_to_node = self.discover(fed.num_clients)
        self.log(f"{len(self.pid_to_node)} nodes: " + ", ".join(f"{k}→{n}" for k, n in sorted(self.pid_to_node.items())))

    def train(self, state: GlobalState, sampled: list[int], status: Callable[[str], None]) -> RoundReplies:
        self.note_base_change(state)
        self.arrived, self.timing = {}, {}
        status(f"training on {len(sampled)} nodes")
        msgs, sent = [], {}
        for k in sampled:
            node = self.pid_to_node[k]
            msg, nbytes = self.message(MessageType.TRAIN, node, state, len(sampled), full=node not in self.has_global)
            msgs.append(msg)
            sent[k] = nbytes
        if self.options.secagg:
            good, failed, secure = self.secagg_collect(state, msgs, sampled)
        else:
            (good, failed), secure = self.plain_collect(state, msgs, sampled), None
        for k, _, _, _, _, version in good:
            self.has_global.add(self.pid_to_node[k])
            self.known_base[self.pid_to_node[k]] = version
        for f in failed:
            self.log(f"round {state.round + 1}: client {f['client']} failed: {f['error']}")
        timing = {str(g[0]): self.timing[g[0]] for g in good if g[0] in self.timing}
        self.row = {"bytes_up_sent": sum(g[4] for g in good), "bytes_down_sent": sum(sent[g[0]] for g in good),
                    "model_loads": sum(int(t.get("model-loads", 0)) for t in timing.values()), "node_timing": timing}
        return RoundReplies(updates=[g[1] for g in good], contexts=[g[2] for g in good],
                            losses={g[0]: (g[3], g[1].num_samples) for g in good}, failed=failed, secure=secure,
                            row=self.row)  # evaluate_personal adds its messages' model loads

    def evaluate_personal(self, state: GlobalState) -> dict[int, dict[str, Any]]:
        """One EVALUATE message per node (all parts of the global adapter, and the base changes it
        lacks); each evaluates its personal model on its held-out slice. A node that fails or does
        not answer is left out of the round's personal figures, and logged."""
        self.note_base_change(state)
        n = self.fed.num_clients
        msgs = [self.message(MessageType.EVALUATE, self.pid_to_node[k], state, n, full=True)[0] for k in range(n)]
        ids = list(self.grid.push_messages(msgs))
        sent_to = dict(zip(ids, range(n)))
        out: dict[int, dict[str, Any]] = {}
        for reply in self.pull(ids):
            k = sent_to.get(reply.metadata.reply_to_message_id)
            if k is None:
                continue
            if reply.has_error():
                self.log(f"after round {state.round}: client {k} could not evaluate: {reply.error.reason}")
                continue
            if rec.KEY_METRICS in reply.content.metric_records:
                self.row["model_loads"] = self.row.get("model_loads", 0) + int(
                    reply.content.metric_records[rec.KEY_METRICS].get("model-loads", 0))
            info = reply.content.config_records[rec.KEY_INFO]
            self.known_base[self.pid_to_node[k]] = int(info["base-version"])
            metrics = rec.from_json(str(info["metrics"]))
            if metrics:  # an empty held-out slice evaluates nothing
                out[k] = metrics
        return {k: out[k] for k in sorted(out)}

    def personal_states(self) -> Mapping[int, Any]:
        return {}  # the nodes hold them

    def state_dict(self) -> dict[str, Any]:
        return {"token": self.token, "deltas": list(self.deltas)}

    def close(self) -> None:
        pass

    # ---- nodes ------------------------------------------------------------------------------------
    def discover(self, num_clients: int) -> dict[int, int]:
        """partition id → node id, asking each connected node for its node_config."""
        grid = self.grid
        deadline = time.monotonic() + self.options.node_wait
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= num_clients or time.monotonic() > deadline:
                break
            raise_if_stopped()
            time.sleep(0.5)
        if len(nodes) < num_clients:
            raise ConfigError(f"{len(nodes)} SuperNodes connected within {self.options.node_wait:.0f} s; "
                              f"partition.num_clients = {num_clients} needs one per partition")
        msgs = [Message(RecordDict({}), n, MessageType.QUERY, group_id="discover") for n in nodes]
        found: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.options.node_wait):
            if reply.has_error():
                self.log(f"node {reply.metadata.src_node_id}: query failed: {reply.error.reason}")
                continue
            node_cfg = reply.content.config_records[rec.KEY_NODE]
            pid, parts = int(node_cfg["partition-id"]), int(node_cfg["num-partitions"])
            how = f"start it with --node-config 'partition-id=K num-partitions={num_clients}'"
            if pid < 0:
                raise ConfigError(f"node {reply.metadata.src_node_id}: its node_config has no partition-id; {how}")
            if parts != num_clients or pid >= num_clients:
                raise ConfigError(f"node {reply.metadata.src_node_id}: node_config partition-id={pid} num-partitions="
                                  f"{parts}, but partition.num_clients = {num_clients}; {how}")
            if pid in found:
                raise ConfigError(f"nodes {found[pid]} and {reply.metadata.src_node_id} both have partition-id {pid}")
            found[pid] = reply.metadata.src_node_id
        missing = sorted(set(range(num_clients)) - set(found))
        if missing:
            raise ConfigError(f"no node has partition-id {missing[:5]}; start SuperNodes with "
                              f"--node-config 'partition-id=K num-partitions={num_clients}'")
        return found

    # ---- messages ---------------------------------------------------------------------------------
    def note_base_change(self, state: GlobalState) -> None:
        """Keep the base change of the aggregation that made ``state`` (once), to send to the nodes."""
        if state.round > self.seen_round:
            if state.base_delta:
                self.deltas.append(state.base_delta)
            self.seen_round = state.round

    def message(self, kind: str, node: int, state: GlobalState, num_sampled: int, full: bool) -> tuple[Message, int]:
        """A TRAIN or EVALUATE message for one node; returns it and the bytes of adapter + base data in it."""
        parts = ("A", "B", "extras") if full else self.strategy.download_parts(state.round)
        known_base = self.known_base.get(node, 0)
        content = RecordDict()
        glob = rec.adapter_to_record(state.adapter, parts)
        content.array_records[rec.KEY_GLOBAL] = glob
        nbytes = rec.record_nbytes(glob)
        for i in range(known_base, len(self.deltas)):
            r = rec.base_delta_to_record(self.deltas[i])
            content.array_records[f"{rec.KEY_BASE_DELTA}{i}"] = r
            nbytes += rec.record_nbytes(r)
        content.config_records[rec.KEY_CONFIG] = ConfigRecord({
            "fedlora-config": self.cfg_text, "round": state.round, "scaling": float(state.scaling),
            "state-info": rec.to_json(state.info, "GlobalState.info"), "num-sampled": num_sampled,
            "full": bool(full), "base-from": known_base, "base-count": len(self.deltas) - known_base,
            "run-token": self.token})
        return Message(content, node, kind, group_id=f"{kind}-{state.round}",
                       ttl=self.options.round_timeout + 60), nbytes

    def collect(self, replies, state: GlobalState, sent_to: dict[str, int], num_sampled: int):
        """Valid replies as (client, ClientUpdate, context, loss, upload bytes, base version), sorted by
        client, and the failures."""
        strategy = self.strategy
        good, failed = [], []
        for reply in replies:
            # an error reply made by the SuperLink (node unavailable) comes from the SuperLink itself:
            # who it concerns is the message it answers
            k = sent_to.get(reply.metadata.reply_to_message_id)
            if k is None:
                self.log(f"round {state.round + 1}: ignoring a reply to an unknown message")
                continue
            if reply.has_error():
                failed.append({"client": k, "error": f"Flower error {reply.error.code}: {reply.error.reason}"})
                continue
            c = reply.content
            m = c.metric_records[rec.KEY_METRICS]
            if int(m["failed"]):
                error = str(c.config_records[rec.KEY_INFO]["error"])
                if self.fed.cfg.train.fail_fast:  # the node stopped at a NaN/Inf loss: so does the run, as in process
                    raise ClientTrainingError(error)
                failed.append({"client": k, "step": int(m["steps"]), "error": error})
                continue
            try:
                payload = rec.record_to_tensors(c.array_records[rec.KEY_PAYLOAD])
                info = rec.from_json(str(c.config_records[rec.KEY_INFO]["info"]))
                info["scaling"] = float(m["scaling"])
                upd = ClientUpdate(k, strategy.receive(payload, state, state.round), int(m["num-examples"]),
                                   float(m["scaling"]), info)
                strategy.validate([upd], state)  # shapes, NaN/Inf, ranks: this client alone
            except (AggregationInputError, KeyError, ValueError) as e:
                failed.append({"client": k, "error": f"invalid reply: {e}"})
                continue
            ctx = client_context(self.fed, k, state.round, num_sampled, num_samples=int(m["num-examples"]),
                                 rank=int(m["rank"]) or None)
            good.append((k, upd, ctx, float(m["loss"]), rec.record_nbytes(c.array_records[rec.KEY_PAYLOAD]),
                         int(m["base-version"])))
            self.timing[k] = dict({key: m[key] for key in NODE_TIMES if key in m}, **{
                "t-push": self.pushed_at, "t-reply": self.arrived.get(reply.metadata.reply_to_message_id, time.time())})
        good.sort(key=lambda g: g[0])  # the in-process order: sampled clients in increasing id
        return good, failed

    def plain_collect(self, state: GlobalState, msgs: list[Message], sampled: list[int]):
        """Send the round's messages, wait for the replies, check each (see :meth:`collect`)."""
        ids = list(self.grid.push_messages(msgs))
        self.pushed_at = time.time()
        sent_to = dict(zip(ids, sampled))
        replies = self.pull(ids)
        good, failed = self.collect(replies, state, sent_to, len(sampled))
        answered = {sent_to.get(r.metadata.reply_to_message_id) for r in replies}
        failed += [{"client": k, "error": f"no reply within the round timeout ({self.options.round_timeout:.0f} s)"}
                   for k in sampled if k not in answered]
        failed.sort(key=lambda f: str(f["client"]))
        return good, failed

    def secagg_collect(self, state: GlobalState, msgs: list[Message], sampled: list[int]):
        """The round under SecAgg+: per-client entries (metrics, and the aggregate adapter standing in
        for each client's, for byte counts) and the one aggregate ClientUpdate the strategy sees."""
        from fedlora.flower.secagg import secagg_round

        strategy, grid = self.strategy, self.grid
        node_to_pid = {n: k for k, n in self.pid_to_node.items()}
        run_id = grid.run.run_id if getattr(grid, "run", None) is not None else 0
        bridge = secagg_round(grid, run_id, state.round, {m.metadata.dst_node_id: m.content for m in msgs},
                              max_weight=float(sum(len(self.fed.client_train[k]) for k in sampled)
                                               if upload_weighting(self.fed.cfg, strategy) == "samples" else len(sampled)),
                              timeout=self.options.round_timeout)
        reported = {node_to_pid[n]: (w, m) for n, w, m in bridge.metrics}
        self.timing = {k: {key: m[key] for key in NODE_TIMES if key in m} for k, (_, m) in reported.items()}
        failed = [{"client": k, "error": "dropped out of SecAgg+ (error or no reply)"}
                  for k in sampled if k not in reported]
        if bridge.aggregate is None:
            raise RoundFailedError(f"round {state.round + 1}: SecAgg+ did not complete (fewer nodes than its "
                                   f"reconstruction threshold); failures: {failed}")
        keys = list(strategy.payload(state.adapter, state.round))
        if len(keys) != len(bridge.aggregate):
            raise AggregationInputError(f"SecAgg+ aggregate has {len(bridge.aggregate)} arrays, the payload {len(keys)}")
        mean = {k: torch.from_numpy(np.asarray(a)).to(state.adapter.tensors()[k].dtype)
                for k, a in zip(keys, bridge.aggregate)}
        scalings = {float(m["scaling"]) for _, m in reported.values()}
        if len(scalings) != 1:
            raise AggregationInputError(f"SecAgg+ needs one LoRA scaling across clients, got {sorted(scalings)}")
        scaling = scalings.pop()
        adapter = strategy.receive(mean, state, state.round)
        secure = ClientUpdate("secagg", adapter, sum(int(m["num-examples"]) for _, m in reported.values()), scaling, {})
        good = []
        for k in sorted(reported):
            _, m = reported[k]
            ctx = client_context(self.fed, k, state.round, len(sampled), num_samples=int(m["num-examples"]),
                                 rank=int(m["rank"]) or None)
            upd = ClientUpdate(k, adapter, int(m["num-examples"]), scaling, {})
            good.append((k, upd, ctx, float(m["loss"]), strategy.upload_bytes(adapter, state.round),
                         int(m["base-version"])))
        return good, failed, secure

    def pull(self, ids: list[str]) -> list[Message]:
        """Replies to ``ids`` until all are in or the round timeout passes (what is missing then
        counts as failed). A node that disconnects gets an error reply from the SuperLink once it
        misses its heartbeats, so a lost node ends the wait before the timeout. A stop request
        (Ctrl-C in a simulation) ends the wait with KeyboardInterrupt: the round is abandoned."""
        waiting, replies = set(ids), []
        deadline = time.monotonic() + self.options.round_timeout
        while waiting and time.monotonic() < deadline:
            raise_if_stopped()
            got = list(self.grid.pull_messages(list(waiting)))
            now = time.time()
            self.arrived.update({r.metadata.reply_to_message_id: now for r in got})
            replies += got
            waiting -= {r.metadata.reply_to_message_id for r in got}
            if waiting:
                time.sleep(0.1)
        return replies


class FlowerServer:
    """The server half of a fedlora run on Flower: ``run(grid, resume=None)`` runs the shared round
    loop over a :class:`FlowerTransport` and returns the summary; afterwards ``rows`` holds the
    run's metrics rows and ``state`` its final GlobalState."""

    def __init__(self, cfg: RunConfig, options: FlowerOptions | None = None, log: Callable[[str], None] = print,
                 resume_command: str | None = None):
        self.cfg = cfg
        self.options = options or FlowerOptions()
        self.log = log
        self.resume_command = resume_command  # what an interrupted run says to resume with (the transport's default)

    def run(self, grid: Grid, resume: str | Path | None = None) -> dict[str, Any]:
        from fedlora.runtime.loop import run
        from fedlora.runtime.rundir import RunDir

        check_secagg(self.cfg, self.options)
        torch.manual_seed(self.cfg.run.seed)  # the initial adapter (PEFT's init) is a function of the seed
        summary = run(self.cfg, FlowerTransport(grid, self.options, self.log, self.resume_command), resume=resume,
                      progress=False, log=self.log)
        rundir = RunDir.open(summary["run_dir"])
        self.rows = rundir.read_metrics()
        self.state = rundir.load_checkpoint()["state"]
        return summary


def config_from_run_config(run_config: dict) -> tuple[RunConfig, FlowerOptions]:
    """RunConfig and options from a Flower run config (``[tool.flwr.app.config]`` / ``--run-config``):
    ``config`` (a TOML file on the server) or ``config-toml`` (its text), ``overrides`` (``;``-separated
    ``key=value``), ``min-replies``, ``round-timeout``, ``node-wait``, ``secagg``; ``resume`` (a run
    directory on the server) resumes that run with its own config.toml and the overrides."""
    import tomllib

    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    if run_config.get("resume"):
        from fedlora.runtime.rundir import RunDir

        cfg = load_config(RunDir.open(str(run_config["resume"])).path / "config.toml", overrides)
    elif run_config.get("config-toml"):
        from fedlora.config import apply_overrides

        cfg = from_dict(apply_overrides(tomllib.loads(str(run_config["config-toml"])), overrides)).validate()
    else:
        path = str(run_config.get("config", "")) or None
        cfg = load_config(path, overrides)
    opts = FlowerOptions(min_replies=int(run_config.get("min-replies", 1)),
                         round_timeout=float(run_config.get("round-timeout", 600.0)),
                         node_wait=float(run_config.get("node-wait", 120.0)),
                         secagg=bool(run_config.get("secagg", False)))
    return cfg, opts


def make_server_app(cfg: RunConfig | None = None, options: FlowerOptions | None = None,
                    results: dict | None = None, resume: str | Path | None = None) -> ServerApp:
    """The fedlora ServerApp. With ``cfg`` it runs that config (``fedlora flower sim``; ``resume``: the
    run directory it continues); without, it reads the config from the Flower run config (a
    deployment; see :func:`config_from_run_config`). ``results`` (optional) receives the summary,
    the final GlobalState and the metrics rows."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:
            run_cfg, opts = config_from_run_config(dict(context.run_config))
            run_resume = str(context.run_config.get("resume", "")) or None
        else:
            run_cfg, opts, run_resume = cfg, options or FlowerOptions(), resume
        server = FlowerServer(run_cfg, opts)
        try:
            summary = server.run(grid, resume=run_resume)
        except BaseException as e:  # run_simulation only logs a ServerApp's exception: hand it back
            if results is None:
                raise
            results["error"] = e
            if isinstance(e, KeyboardInterrupt):  # a clean stop: the run said so; no thread traceback
                return
            raise
        if results is not None:
            results.update(summary=summary, state=server.state, rows=server.rows)

    return app


#: The app ``flwr run`` loads (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
