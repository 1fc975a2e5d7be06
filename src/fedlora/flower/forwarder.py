"""The thin fedlora ClientApp of a node with a resident worker (``fedlora flower node``).

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message. This app does no work in
it: it passes the Message and the node's Context to the node's long-lived fedlora worker over the
local channel (:mod:`fedlora.flower.channel`), which runs the full fedlora ClientApp
(:mod:`fedlora.flower.clientapp`) with the base model, the encoded partition and the personal state
already loaded, and it returns the worker's reply with the Context's new state. It imports flwr and
the standard library only (no torch), so its process starts in well under a second.

A worker that dies mid-message makes this node's reply an error, as a lost node's is: the round
completes with the other replies, and ``fedlora flower node`` restarts the worker for the next one.

Components: ``fedlora.flower.forwarder:app`` (``:secagg_app`` with SecAgg+, whose ``secaggplus_mod``
then runs in the worker); ``fedlora flower app DIR --resident`` writes them.
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()

from pathlib import Path  # noqa: E402

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedlora.errors import ConfigError  # noqa: E402
from fedlora.flower.channel import NODE_KEY, ProcessClock, forward  # noqa: E402

_clock = ProcessClock(time.time() - _T_IMPORT)


def make_forwarder(variant: str = "plain") -> ClientApp:
    """A ClientApp that forwards every message to the node's resident worker, which runs fedlora's
    ClientApp ``variant`` (``"plain"`` or ``"secagg"``)."""
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        clock = _clock()
        where = context.node_config.get(NODE_KEY)
        if not where:
            raise ConfigError(f"node {context.node_id}: this Flower App forwards to a resident fedlora worker, but "
                              f"the SuperNode's node_config has no {NODE_KEY!r}; start the node with `fedlora flower "
                              "node ...` (which starts flower-supernode with it), or write the app without "
                              "--resident")
        content, state = forward(Path(str(where)), {"app": variant, "clock": clock}, msg, context)
        context.state = state
        return Message(content, reply_to=msg)

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


#: ``clientapp = "fedlora.flower.forwarder:app"`` (written by ``fedlora flower app --resident``).
app = make_forwarder("plain")
#: ``clientapp = "fedlora.flower.forwarder:secagg_app"`` (``--resident --secagg``).
secagg_app = make_forwarder("secagg")
