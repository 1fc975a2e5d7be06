"""The fedlora ServerApp: the embedded engine's round loop over a Flower :class:`~flwr.serverapp.Grid`.

Each round t (the same steps as ``fedlora.sim.engine.run``):

    sample clients (``engine.sample_clients``, by partition id) → one TRAIN message per sampled
    node: the config, round, scaling, the global adapter's broadcast parts (all parts to a node
    that has none cached) and the base-weight changes it has not merged → replies → per reply:
    ``strategy.receive`` + ``strategy.validate`` (a bad reply is dropped and logged, naming the
    client) → at least ``min_replies`` left, else the round fails → ``strategy.aggregate`` →
    ``round_diagnostics`` → ``communication_bytes`` (and the bytes actually sent) → evaluate the
    global model → one metrics row, checkpoint; at the end the adapter and summary, as ``fedlora run``.

The strategy is driven only through its generic hooks, so every registered strategy runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig, from_dict, load_config, to_toml
from fedlora.errors import AggregationInputError, ConfigError, FedLoRAError, RoundFailedError
from fedlora.flower import records as rec
from fedlora.strategies import ClientContext, ClientUpdate, GlobalState


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


def _nbytes_tensors(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FlowerServer:
    """The server half of a fedlora run on Flower. ``run(grid)`` returns the run summary."""

    def __init__(self, cfg: RunConfig, options: FlowerOptions | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.options = options or FlowerOptions()
        self.log = log
        self.cfg_text = to_toml(cfg)  # what every node builds its Federation from

    def check_secagg(self) -> None:
        """Refuse SecAgg+ for a strategy whose server needs more than the weighted sum of uploads."""
        if not self.options.secagg:
            return
        from fedlora.sim.engine import build_strategy

        strategy = build_strategy(self.cfg)
        if not strategy.secure_aggregation:
            raise ConfigError(f"strategy {strategy.name!r} cannot run under SecAgg+: SecAgg+ reveals only the sum of "
                              "the uploads, and this strategy's server needs each client's upload (e.g. to stack, "
                              "re-factor or correct them), so it would have nothing to aggregate")

    # ---- nodes ----------------------------------------------------------------------------------
    def discover(self, grid: Grid, num_clients: int) -> dict[int, int]:
        """partition id → node id, asking each connected node for its node_config."""
        deadline = time.monotonic() + self.options.node_wait
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= num_clients or time.monotonic() > deadline:
                break
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

    # ---- messages -------------------------------------------------------------------------------
    def train_message(self, node: int, state: GlobalState, num_sampled: int, full: bool,
                      deltas: list, known_base: int) -> tuple[Message, int]:
        """The TRAIN message for one node; returns it and the bytes of adapter + base data in it."""
        strategy = self.strategy
        parts = ("A", "B", "extras") if full else strategy.download_parts(state.round)
        content = RecordDict()
        glob = rec.adapter_to_record(state.adapter, parts)
        content.array_records[rec.KEY_GLOBAL] = glob
        nbytes = rec.record_nbytes(glob)
        for i in range(known_base, len(deltas)):
            r = rec.base_delta_to_record(deltas[i])
            content.array_records[f"{rec.KEY_BASE_DELTA}{i}"] = r
            nbytes += rec.record_nbytes(r)
        content.config_records[rec.KEY_CONFIG] = ConfigRecord({
            "fedlora-config": self.cfg_text, "round": state.round, "scaling": float(state.scaling),
            "state-info": rec.to_json(state.info, "GlobalState.info"), "num-sampled": num_sampled,
            "full": bool(full), "base-from": known_base, "base-count": len(deltas) - known_base})
        return Message(content, node, MessageType.TRAIN, group_id=str(state.round),
                       ttl=self.options.round_timeout + 60), nbytes

    def collect(self, replies, state: GlobalState, sent_to: dict[str, int]):
        """Valid ClientUpdates (sorted by client), their contexts and losses, and the failures."""
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
                failed.append({"client": k, "step": int(m["steps"]), "error": str(c.config_records[rec.KEY_INFO]["error"])})
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
            ctx = ClientContext(client_id=k, round=state.round, num_samples=int(m["num-examples"]),
                                rank=int(m["rank"]) or None, alpha=self.cfg.lora.alpha, total_clients=self.num_clients,
                                seed=self.cfg.run.seed)
            good.append((k, upd, ctx, float(m["loss"]), rec.record_nbytes(c.array_records[rec.KEY_PAYLOAD]),
                         int(m["base-version"])))
        good.sort(key=lambda g: g[0])  # the engine's order: sampled clients in increasing id
        return good, failed

    def plain_collect(self, grid: Grid, state: GlobalState, msgs: list[Message], sampled: list[int]):
        """Send the round's messages, wait for the replies, check each (see :meth:`collect`)."""
        ids = list(grid.push_messages(msgs))
        sent_to = dict(zip(ids, sampled))
        replies = self.pull(grid, ids)
        good, failed = self.collect(replies, state, sent_to)
        answered = {sent_to.get(r.metadata.reply_to_message_id) for r in replies}
        failed += [{"client": k, "error": f"no reply within the round timeout ({self.options.round_timeout:.0f} s)"}
                   for k in sampled if k not in answered]
        failed.sort(key=lambda f: str(f["client"]))
        return good, failed

    def secagg_collect(self, grid: Grid, state: GlobalState, msgs: list[Message], sampled: list[int],
                       pid_to_node: dict[int, int], fed):
        """The round under SecAgg+: per-client entries (metrics, and the aggregate adapter standing in
        for each client's, for byte counts) and the one aggregate ClientUpdate the strategy sees."""
        from fedlora.flower.secagg import secagg_round

        strategy = self.strategy
        node_to_pid = {n: k for k, n in pid_to_node.items()}
        run_id = grid.run.run_id if getattr(grid, "run", None) is not None else 0
        bridge = secagg_round(grid, run_id, state.round, {m.metadata.dst_node_id: m.content for m in msgs},
                              max_weight=float(sum(len(fed.client_train[k]) for k in sampled)),
                              timeout=self.options.round_timeout)
        reported = {node_to_pid[n]: (w, m) for n, w, m in bridge.metrics}
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
            ctx = ClientContext(client_id=k, round=state.round, num_samples=int(m["num-examples"]),
                                rank=int(m["rank"]) or None, alpha=self.cfg.lora.alpha,
                                total_clients=self.num_clients, seed=self.cfg.run.seed)
            upd = ClientUpdate(k, adapter, int(m["num-examples"]), scaling, {})
            good.append((k, upd, ctx, float(m["loss"]), strategy.upload_bytes(adapter, state.round),
                         int(m["base-version"])))
        return good, failed, secure

    def pull(self, grid: Grid, ids: list[str]) -> list[Message]:
        """Replies to ``ids`` until all are in or the round timeout passes (what is missing then
        counts as failed). A node that disconnects gets an error reply from the SuperLink once it
        misses its heartbeats, so a lost node ends the wait before the timeout."""
        waiting, replies = set(ids), []
        deadline = time.monotonic() + self.options.round_timeout
        while waiting and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(waiting)))
            replies += got
            waiting -= {r.metadata.reply_to_message_id for r in got}
            if waiting:
                time.sleep(0.5)
        return replies

    # ---- the run --------------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict[str, Any]:
        """Run ``cfg.train.rounds`` rounds on the nodes of ``grid``; returns the summary."""
        from fedlora.sim.engine import (aggregate_round, completed_line, evaluate_if_due, finish, metrics_row, prepare,
                                        round_line, sample_clients)
        from fedlora.sim.rundir import RunDir, signals_deferred

        t_start = time.perf_counter()
        cfg = self.cfg
        self.check_secagg()
        torch.manual_seed(cfg.run.seed)  # the initial adapter (PEFT's init) is a function of the seed
        server_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, personalised=False))
        RunDir.check_location(cfg)
        fed = prepare(server_cfg, self.log)  # the global model for evaluation; checks every input first
        self.strategy, self.num_clients = fed.strategy, fed.num_clients
        strategy, seed = fed.strategy, cfg.run.seed
        state = strategy.init_state(fed.shared.initial_adapter(), alpha=cfg.lora.alpha, seed=seed)
        pid_to_node = self.discover(grid, fed.num_clients)
        self.log(f"{len(pid_to_node)} nodes: " + ", ".join(f"{k}→{n}" for k, n in sorted(pid_to_node.items())))
        rundir = RunDir.create(cfg)
        rundir.write_json("partition.json", fed.partition_summary)
        has_global: set[int] = set()  # nodes holding a full copy of the global adapter
        known_base: dict[int, int] = {}  # node → base deltas it has merged (from its last reply)
        deltas: list = []  # every aggregation's base change, in order
        self.rows = []
        try:  # as `fedlora run`: a failed round ends the run "failed: …", keeping the complete rounds
            while state.round < cfg.train.rounds:
                t = state.round
                t0 = time.perf_counter()
                sampled = sample_clients(seed, t, fed.num_clients, cfg.train)
                msgs, sent = [], {}
                for k in sampled:
                    node = pid_to_node[k]
                    msg, nbytes = self.train_message(node, state, len(sampled), node not in has_global, deltas,
                                                     known_base.get(node, 0))
                    msgs.append(msg)
                    sent[k] = nbytes
                if self.options.secagg:
                    good, failed, secure = self.secagg_collect(grid, state, msgs, sampled, pid_to_node, fed)
                else:
                    good, failed = self.plain_collect(grid, state, msgs, sampled)
                for k, _, _, _, _, version in good:
                    has_global.add(pid_to_node[k])
                    known_base[pid_to_node[k]] = version
                if len(good) < self.options.min_replies:
                    raise RoundFailedError(
                        f"round {t + 1}: {len(good)} valid replies of {len(sampled)} sampled, fewer than the minimum "
                        f"{self.options.min_replies}; failures: " + "; ".join(f"client {f['client']}: {f['error']}" for f in failed))
                for f in failed:
                    self.log(f"round {t + 1}: client {f['client']} failed: {f['error']}")
                t_train = time.perf_counter() - t0
                updates = [g[1] for g in good]
                contexts = [dataclasses.replace(g[2], num_clients=len(sampled)) for g in good]
                # under SecAgg+ the server holds only the weighted average: one aggregate update, no diagnostics
                state, diag, comm = aggregate_round(fed, state, updates, contexts,
                                                    secure=secure if self.options.secagg else None)
                if state.base_delta:
                    deltas.append(state.base_delta)
                evaluation, t_eval = evaluate_if_due(fed, state, {}, t)
                row = metrics_row(t, sampled, failed, {g[0]: (g[3], g[1].num_samples) for g in good}, evaluation, diag,
                                  comm, t0=t0, train_s=t_train, eval_s=t_eval,
                                  bytes_up_sent=sum(g[4] for g in good), bytes_down_sent=sum(sent[g[0]] for g in good))
                with signals_deferred():
                    rundir.commit_round(row, state, {}, fed.shared.base_merged, {"seed": seed})
                self.rows.append(row)
                self.log(round_line(row, cfg.train.rounds).replace("[red]", "").replace("[/]", ""))
        except FedLoRAError as e:
            finish(fed, rundir, state, dict(fed.shared.base_merged), f"failed: {e}", time.perf_counter() - t_start)
            raise
        self.state = state
        summary = finish(fed, rundir, state, dict(fed.shared.base_merged), "completed", time.perf_counter() - t_start)
        summary["engine"] = "flower"
        rundir.write_json("summary.json", summary)
        self.log(completed_line(summary))
        return summary


def config_from_run_config(run_config: dict) -> tuple[RunConfig, FlowerOptions]:
    """RunConfig and options from a Flower run config (``[tool.flwr.app.config]`` / ``--run-config``):
    ``config`` (a TOML file on the server) or ``config-toml`` (its text), ``overrides`` (``;``-separated
    ``key=value``), ``min-replies``, ``round-timeout``, ``node-wait``, ``secagg``."""
    import tomllib

    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    if run_config.get("config-toml"):
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
                    results: dict | None = None) -> ServerApp:
    """The fedlora ServerApp. With ``cfg`` it runs that config (``fedlora flower sim``); without, it
    reads the config from the Flower run config (a deployment). ``results`` (optional) receives the
    summary and final GlobalState."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:
            run_cfg, opts = config_from_run_config(dict(context.run_config))
        else:
            run_cfg, opts = cfg, options or FlowerOptions()
        server = FlowerServer(run_cfg, opts)
        try:
            summary = server.run(grid)
        except BaseException as e:  # run_simulation only logs a ServerApp's exception: hand it back
            if results is not None:
                results["error"] = e
            raise
        if results is not None:
            results.update(summary=summary, state=server.state, rows=server.rows)

    return app


#: The app ``flwr run`` loads (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
