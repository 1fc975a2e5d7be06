"""A Flower :class:`~flwr.serverapp.Grid` whose nodes are ClientApp calls in this process.

It runs the real ServerApp loop against the real ClientApp handlers, with real Messages and a
``Context`` per node (its ``state`` kept across rounds as a SuperNode keeps it), but no Ray, no
SuperLink and no sockets: a fast way to test and debug a fedlora app. It is not a Flower runtime:
use ``fedlora flower sim`` or a deployment for real runs.
"""

from __future__ import annotations

import copy
import itertools
import traceback
from collections.abc import Iterable, Mapping
from logging import ERROR

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid

from fedlora.runtime.signals import raise_if_stopped


class InProcessGrid(Grid):
    """``num_nodes`` nodes with ``node_config`` partition-id = k, num-partitions = num_nodes; each pushed
    message is handled at once by ``client_app`` in the node's Context. ``drop`` lists node indices
    whose TRAIN messages get no reply (a node that vanished after joining)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1,
                 node_config: Mapping[int, dict] | None = None, drop: Iterable[int] = ()):
        self.client_app = client_app
        self.run_id = run_id
        self.node_ids = [1000 + k for k in range(num_nodes)]
        extra = dict(node_config or {})
        self.contexts = {n: Context(run_id=run_id, node_id=n,
                                    node_config={"partition-id": k, "num-partitions": num_nodes, **extra.get(k, {})},
                                    state=RecordDict(), run_config={})
                         for k, n in enumerate(self.node_ids)}
        self.drop = {self.node_ids[k] for k in drop}
        self.replies: dict[str, Message] = {}
        self._ids = itertools.count()
        self._run = None
        from flwr.supercore.task_identity import TaskIdentity

        # Message() stamps the sender's run and node from the process's task identity, which a
        # Flower runtime sets; here this process is the ServerApp's task
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1

    def set_run(self, run) -> None:  # noqa: D102  (no run object needed in process)
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Handle each message now; its reply waits for :meth:`pull_messages`. A ClientApp that
        raises replies with an error, as under a Flower runtime; a stop request (Ctrl-C, see
        :func:`~fedlora.runtime.signals.signals_set_stop`) ends the round before the next message."""
        ids = []
        for msg in messages:
            raise_if_stopped()
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # what the SuperLink would assign
            msg.metadata.__dict__["_run_id"] = self.run_id
            ids.append(mid)
            if msg.metadata.dst_node_id in self.drop and msg.metadata.message_type == MessageType.TRAIN:
                continue
            try:  # a transport delivers a copy: handlers (e.g. secaggplus_mod) may change what they receive
                reply = self.client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # what Flower's simulation runtime replies (vce_api), traceback logged
                flwr_log(ERROR, traceback.format_exc())
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e)}:<'{e}'>"),
                                reply_to=msg)
            self.replies[mid] = copy.deepcopy(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))  # noqa: D102


#: what an interrupted in-process run says to resume it with
RESUME_COMMAND = "fedlora flower sim --in-process --resume"


def run_inprocess(cfg, *, resume=None, loss_fn=None, progress=None, log=None, options=None,
                  faults: Mapping[int, str] | None = None) -> dict:
    """Run (or resume) ``cfg`` through the fedlora ServerApp's transport and ClientApp on an
    :class:`InProcessGrid`: the shared round loop over real Flower Messages and node Contexts, in
    this process. Arguments as ``fedlora.sim.run`` (no progress bar: a Flower run logs lines);
    ``options`` are FlowerOptions (a 1 s node wait by default), ``faults`` as ``make_client_app``'s."""
    from fedlora.flower.clientapp import make_client_app
    from fedlora.flower.serverapp import FlowerOptions, FlowerServer

    options = options or FlowerOptions(node_wait=1.0)
    grid = InProcessGrid(make_client_app(faults, secagg=options.secagg, loss_fn=loss_fn), cfg.partition.num_clients)
    return FlowerServer(cfg, options, log or print, resume_command=RESUME_COMMAND).run(grid, resume=resume)
