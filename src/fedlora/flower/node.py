"""``fedlora flower node``: one long-lived fedlora process per SuperNode, holding the base model, the
node's encoded partition and its personal state across rounds.

Flower 1.41's SuperNode starts a fresh ClientApp process for every message, which would load torch,
the model and the data every round. ``fedlora flower node`` instead

1. makes the node's private folder (mode 0700) and draws a secret into it (:mod:`fedlora.flower.channel`);
2. starts the **worker** (``python -m fedlora.flower.node --worker DIR``): it imports fedlora's
   ClientApp once, listens on ``DIR/worker.sock``, and for each connection that passes the handshake
   runs the message through the very ClientApp a plain node runs (the model is loaded on its first
   message of a run and kept; a new run's config replaces it);
3. starts ``flower-supernode`` with the arguments given (``--superlink``, ``--insecure`` or
   certificates, ``--port``, ...) and ``fedlora-node=DIR`` added to its ``--node-config``, so that the
   forwarding ClientApp (:mod:`fedlora.flower.forwarder`) finds the worker. Several ``--node-config``
   start several SuperNodes on this machine that share the one worker (and its one copy of the model,
   as a simulation's virtual nodes share a Ray actor's): their messages are served one at a time;
4. restarts the worker when it dies (its node's reply to the message in flight fails; the round goes
   on with the other nodes), and stops everything it started on SIGTERM/SIGINT or when the SuperNode
   exits, and removes the folder it made.

The trade against Flower's process isolation is in docs/flower.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.errors import FedLoRAError
from fedlora.flower import channel as ch

#: Flower's SuperExec polls for new ClientApp tasks every second by default; a resident node's
#: message costs well under a second, so its node polls every 0.1 s (a setting of Flower's own).
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
POLL_DEFAULT = "0.1"
QUICK_EXIT_S = 10.0  # a worker that exits this soon after its start, MAX_QUICK_EXITS times in a row, is not restarted
MAX_QUICK_EXITS = 3


# ---- the worker ---------------------------------------------------------------------------------
def serve(node_dir: Path, threads: int = 0) -> None:
    """The worker: import fedlora's ClientApps, then answer messages on ``node_dir/worker.sock`` one
    at a time until the parent (``fedlora flower node``) is gone or SIGTERM arrives."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from fedlora.flower import clientapp

    apps = {"plain": clientapp.app, "secagg": clientapp.secagg_app}
    secret = ch.read_secret(node_dir)
    path = node_dir / ch.SOCKET
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file: the node's user alone (the folder is 0700 as well)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(8)
    server.settimeout(1.0)
    parent = os.getppid()
    (node_dir / ch.PIDFILE).write_text(str(os.getpid()))
    ch.log(f"worker ready at {path}")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # after the message in hand, within 1 s
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor stops us
    while os.getppid() == parent and not stop:  # an orphaned worker (its supervisor killed) stops by itself
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            refused = ch.check_peer(conn, secret)
            if refused:
                ch.log(f"refused a connection: {refused}")
                continue
            try:
                _answer(conn, apps)
            except (ch.ChannelClosed, OSError) as e:
                ch.log(f"connection lost: {e}")


def _answer(conn: socket.socket, apps: dict) -> None:
    """One request: run the message through the ClientApp it names, send back the reply's content and
    the Context's new state, or the error."""
    import json
    import traceback

    from fedlora.flower import clientapp

    frames = [ch.recv_frame(conn) for _ in range(3)]
    try:
        header, message, context = ch.decode_request(frames)
        clientapp.set_clock(header.get("clock") or {})
        reply = apps[header.get("app", "plain")](message, context)
        if reply.has_error():
            raise FedLoRAError(reply.error.reason)
        answer = ch.encode_answer(reply.content, context.state)
    except Exception as e:  # the node's reply becomes an error, as a ClientApp's exception makes it
        ch.log(f"message failed: {type(e).__name__}: {e}")
        answer = [json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-4000:]}).encode()]
    for frame in answer:
        ch.send_frame(conn, frame)


# ---- the supervisor -----------------------------------------------------------------------------
def _take(args: list[str], flag: str) -> tuple[list[str], list[str]]:
    """``args`` without every ``flag VALUE`` / ``flag=VALUE``, and the values, in order."""
    rest, values, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == flag and i + 1 < len(args):
            values.append(args[i + 1])
            i += 2
            continue
        if a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest, values


def supernode_commands(args: list[str], node_dir: Path) -> list[list[str]]:
    """One ``flower-supernode`` argument list per ``--node-config`` in ``args`` (one SuperNode when
    there is none or one), each with ``fedlora-node=DIR`` added to its node config. Several
    SuperNodes share the worker; each gets its own Runtime API port (``--port P`` given: P, P+1, ...;
    else free ones)."""
    from fedlora.flower.deploy import free_port

    common, configs = _take(args, "--node-config")
    configs = configs or [""]
    common, ports = _take(common, "--port")
    if len(ports) > 1:
        raise FedLoRAError("fedlora flower node: --port given more than once")
    if len(configs) > 1 and any(a.startswith("--auth-supernode-private-key") for a in common):
        raise FedLoRAError("fedlora flower node: --auth-supernode-private-key names one SuperNode's identity; with "
                           "node authentication start one `fedlora flower node` per SuperNode (one --node-config each)")
    out = []
    for i, cfg in enumerate(configs):
        port = str(int(ports[0]) + i) if ports else (str(free_port()) if len(configs) > 1 else None)
        out.append(common + (["--port", port] if port else []) +
                   ["--node-config", f'{cfg} {ch.NODE_KEY}="{node_dir}"'.strip()])
    return out


class Node:
    """The supervisor: a worker and a flower-supernode, both children of this process."""

    def __init__(self, supernode_args: list[str], node_dir: str | None = None, threads: int = 0):
        from fedlora.flower.deploy import _bin

        self.own_dir = node_dir is None
        self.dir = ch.make_node_dir(node_dir)
        self.threads = threads
        self.supernode_cmds = [[_bin("flower-supernode"), *a] for a in supernode_commands(supernode_args, self.dir)]
        self.env = dict(os.environ)
        self.env.setdefault(POLL_ENV, POLL_DEFAULT)
        self.worker: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.restarts = 0
        self.quick_exits = 0  # consecutive worker exits soon after their start

    def start_worker(self) -> None:
        ch.new_secret(self.dir)  # a fresh secret for each worker
        (self.dir / ch.PIDFILE).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fedlora.flower.node", "--worker", str(self.dir)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        self.worker = subprocess.Popen(cmd, env=self.env)
        self.worker_started = time.monotonic()

    def run(self) -> int:
        """Run until the SuperNode exits or a signal arrives; returns the SuperNode's exit code."""
        stop = {"signal": None}

        def on_signal(signum, _frame):
            stop["signal"] = signum

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_signal)
        try:
            self.start_worker()
            self.supernodes = [subprocess.Popen(cmd, env=self.env) for cmd in self.supernode_cmds]
            ch.log(f"node folder {self.dir}; worker pid {self.worker.pid}; flower-supernode pid "
                   + ", ".join(str(p.pid) for p in self.supernodes))
            while stop["signal"] is None:
                for p in self.supernodes:  # one SuperNode gone: stop them all (the node is broken)
                    if p.poll() is not None:
                        ch.log(f"flower-supernode (pid {p.pid}) exited with {p.returncode}")
                        return p.returncode
                if self.worker.poll() is not None:
                    quick = time.monotonic() - self.worker_started < QUICK_EXIT_S
                    self.quick_exits = self.quick_exits + 1 if quick else 0
                    if self.quick_exits >= MAX_QUICK_EXITS:  # it cannot start (e.g. a broken install): say so
                        ch.log(f"the worker exited with {self.worker.returncode} within {QUICK_EXIT_S:.0f} s of its "
                               f"start {self.quick_exits} times in a row; giving up (its output is above)")
                        return 1
                    self.restarts += 1
                    ch.log(f"worker exited with {self.worker.returncode}; restarting it (restart {self.restarts})")
                    self.start_worker()
                time.sleep(0.2)
            return 128 + stop["signal"]
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the SuperNode (and the processes it started) and the worker; remove a folder made here."""
        from fedlora.flower.deploy import descendants, stop_pids

        pids, procs = [], [*self.supernodes, self.worker]
        for p in procs:
            if p is not None and p.poll() is None:
                pids += [p.pid, *descendants(p.pid)]
        stop_pids(pids)
        for p in procs:
            if p is not None:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for name in (ch.SOCKET, ch.SECRET, ch.PIDFILE):
                (self.dir / name).unlink(missing_ok=True)


def register(fsub) -> None:
    """``fedlora flower node``: its arguments (the rest go to flower-supernode)."""
    n = fsub.add_parser(
        "node", allow_abbrev=False,
        usage="fedlora flower node [-h] [--node-dir NODE_DIR] [--threads THREADS] FLOWER_SUPERNODE_ARGUMENTS ...",
        help="a SuperNode with a resident fedlora worker (model loaded once per run, not per round)",
        description="Start flower-supernode with the given arguments (e.g. --insecure --superlink HOST:PORT "
                    "--node-config 'partition-id=0 num-partitions=3'), plus a long-lived fedlora worker that "
                    "keeps the base model, the encoded partition and the personal state across rounds. Use it "
                    "with an app written by `fedlora flower app DIR --resident`. See docs/flower.md.")
    n.add_argument("--node-dir", default=None,
                   help="the node's private folder (mode 700) for the worker's socket and secret "
                        "(default: a new one under the temporary folder, removed at exit)")
    n.add_argument("--threads", type=int, default=0, help="torch threads for the worker (default: torch's)")
    n.set_defaults(func=cmd_node, passthrough=True)


def cmd_node(args, rest: list[str]) -> int:
    from fedlora.flower.cli import require_flower

    require_flower(ray=False)
    if not any(a == "--superlink" or a.startswith("--superlink=") for a in rest):
        raise FedLoRAError("fedlora flower node: give flower-supernode's --superlink HOST:PORT (and --insecure or "
                           "--root-certificates), and --node-config 'partition-id=K num-partitions=N'")
    return Node(rest, args.node_dir, args.threads).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlora.flower.node", description="the resident worker")
    ap.add_argument("--worker", required=True, metavar="NODE_DIR")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    serve(Path(a.worker), a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
