"""The local channel between a Flower ClientApp process and its node's resident fedlora worker
(``fedlora flower node``, :mod:`fedlora.flower.node`).

- A Unix-domain socket ``worker.sock`` in the node's folder, which is created with mode 0700 (the
  node's user alone may enter it, so no other user can reach the socket).
- A secret drawn afresh each time a worker starts, in ``secret`` (mode 0600) in the same folder: the
  first frame of every connection must be it, or the worker closes the connection.
- On Linux the worker also checks the connecting process's uid (``SO_PEERCRED``) equals its own.
- Frames are a 8-byte big-endian length and the bytes. A request is a JSON header, then Flower's own
  protobuf serialisation of the Message and the Context (``flwr.common.serde``); the answer is a JSON
  header, then the reply's content and the Context's new state (or the error, in the header).

Imports only the standard library and flwr (no torch): the forwarding ClientApp loads in a fraction
of a second.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import stat
import struct
import sys
import time
from pathlib import Path

from fedlora.errors import FedLoRAError

SOCKET = "worker.sock"
SECRET = "secret"
PIDFILE = "worker.pid"
NODE_KEY = "fedlora-node"  # node_config key: the node's folder (set by ``fedlora flower node``)
_LEN = struct.Struct(">Q")
MAX_FRAME = 1 << 36  # 64 GiB: a length beyond this is a broken or hostile peer


class ChannelClosed(FedLoRAError):
    """The other end closed the connection (a worker that died, or a refused handshake)."""


def make_node_dir(path: str | os.PathLike | None) -> Path:
    """The node's private folder (mode 0700), created if missing; an existing one must be this
    user's and closed to others. The socket path must fit a Unix socket address (107 bytes)."""
    if path is None:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="fedlora-node-"))  # mode 0700
    else:
        d = Path(path).resolve()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if st.st_uid != os.getuid():
            raise FedLoRAError(f"node folder {d} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise FedLoRAError(f"node folder {d} has mode {stat.S_IMODE(st.st_mode):o}: other users could reach "
                               "its socket; use a folder with mode 700 (or leave --node-dir out for a private one)")
    if len(str(d / SOCKET).encode()) > 107:
        raise FedLoRAError(f"node folder {d}: the socket path would exceed the 107 bytes a Unix socket address "
                           "allows; choose a shorter --node-dir")
    return d


def new_secret(node_dir: Path) -> str:
    """Draw a fresh secret and write it to ``node_dir/secret`` with mode 0600, all or nothing."""
    value = secrets.token_hex(32)
    tmp = node_dir / f".{SECRET}.{os.getpid()}"
    tmp.unlink(missing_ok=True)  # a stale file would keep its own mode: create afresh, 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, node_dir / SECRET)
    return value


def read_secret(node_dir: Path) -> str:
    return (node_dir / SECRET).read_text().strip()


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ChannelClosed("the connection closed mid-message")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ChannelClosed(f"frame of {n} bytes announced: not a fedlora peer")
    return _recv_exact(sock, n)


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux ``SO_PEERCRED``); None where unavailable."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    return uid


def check_peer(conn: socket.socket, secret: str) -> str | None:
    """The worker's side of the handshake: None if the peer is this user and sent the secret, else
    why it is refused (the caller closes the connection)."""
    uid = peer_uid(conn)
    if uid is not None and uid != os.getuid():
        return f"peer uid {uid} is not this node's user ({os.getuid()})"
    conn.settimeout(10.0)
    try:
        given = recv_frame(conn)
    except (ChannelClosed, OSError) as e:
        return f"no handshake ({e})"
    if not hmac.compare_digest(given, secret.encode()):
        return "wrong secret"
    conn.settimeout(None)
    send_frame(conn, b"ok")
    return None


def connect(node_dir: Path, wait: float = 180.0) -> socket.socket:
    """Connect to the node's worker and pass the handshake, waiting up to ``wait`` s for a worker that
    is starting (or restarting after a crash)."""
    deadline = time.monotonic() + wait
    last: Exception | None = None
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(node_dir / SOCKET))
            send_frame(sock, read_secret(node_dir).encode())
            if recv_frame(sock) == b"ok":
                return sock
        except (OSError, ChannelClosed) as e:  # not listening yet, or a secret from a worker just replaced
            last = e
        sock.close()
        time.sleep(0.1)
    raise FedLoRAError(f"no resident fedlora worker answered at {node_dir / SOCKET} within {wait:.0f} s ({last}); "
                       "is `fedlora flower node` running for this SuperNode?")


def process_start_time() -> float | None:
    """This process's start, in seconds since the epoch, to 10 ms (Linux: its start in clock ticks
    since boot and the uptime now; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class ProcessClock:
    """The node-side clock of each message a process handles: ``t-start`` (when the process started,
    for its first message; else the handler's start, as a long-lived process pays no start),
    ``t-handler`` (the handler's start, epoch s) and ``imports-s`` (its app module's imports, in the
    first message only). One per process: fedlora's ClientApp and the forwarding one each have theirs."""

    def __init__(self, imports_s: float):
        self.imports_s = imports_s
        self.first = True

    def __call__(self) -> dict[str, float]:
        now = time.time()
        if not self.first:
            return {"t-start": now, "t-handler": now, "imports-s": 0.0}
        self.first = False
        start = process_start_time()
        return {"t-start": start if start is not None else now, "t-handler": now, "imports-s": self.imports_s}


# ---- request / answer ----------------------------------------------------------------------------
def encode_request(header: dict, message, context) -> list[bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    return [json.dumps(header).encode(), message_to_proto(message).SerializeToString(),
            context_to_proto(context).SerializeToString()]


def decode_request(frames: list[bytes]):
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    header = json.loads(frames[0])
    return header, message_from_proto(ProtoMessage.FromString(frames[1])), \
        context_from_proto(ProtoContext.FromString(frames[2]))


def encode_answer(content, state) -> list[bytes]:
    from flwr.common.serde import recorddict_to_proto

    return [json.dumps({"ok": True}).encode(), recorddict_to_proto(content).SerializeToString(),
            recorddict_to_proto(state).SerializeToString()]


def decode_answer(frames: list[bytes]):
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return (recorddict_from_proto(ProtoRecordDict.FromString(frames[1])),
            recorddict_from_proto(ProtoRecordDict.FromString(frames[2])))


def forward(node_dir: Path, header: dict, message, context):
    """Send one message to the node's worker; returns (reply content, the Context's new state).
    A worker that dies mid-request raises :class:`ChannelClosed`; an error it reports raises
    FedLoRAError with its text."""
    sock = connect(node_dir)
    try:
        for frame in encode_request(header, message, context):
            send_frame(sock, frame)
        head = json.loads(recv_frame(sock))
        if not head.get("ok"):
            raise FedLoRAError(f"the node's worker failed: {head.get('error', 'no reason given')}")
        return decode_answer([b"", recv_frame(sock), recv_frame(sock)])
    except ChannelClosed as e:
        raise ChannelClosed(f"the node's resident worker closed the connection mid-request ({e}): it died "
                            "or was stopped; `fedlora flower node` restarts it for the next round") from e
    finally:
        sock.close()


def log(text: str) -> None:
    print(f"[fedlora node {os.getpid()}] {text}", file=sys.stderr, flush=True)
