"""A real Flower deployment on one machine: a SuperLink, SuperNodes, and ``flwr run``, all as
subprocesses on loopback, every one of them stopped by pid when done.

Used by the loopback deployment tests and the benchmark. The same commands,
run by hand on separate machines (with TLS), are the deployment recipe in docs/flower.md.

Flower 1.41 processes started here:

- ``flower-superlink --insecure --host 127.0.0.1 --port P --disable-runtime-dependency-installation``
  (it launches a detached ``flower-superexec``, which launches ``flwr-serverapp`` per run);
- per node, ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q --node-config
  'partition-id=K num-partitions=N'`` (it launches ``flwr-clientapp`` per message); with
  ``resident=True`` the same arguments go to ``fedlora flower node`` (a resident worker per node, or
  one for all of them with ``shared_worker=True``), for an app written with ``resident=True``;
- ``flwr run APP_DIR local-deployment --stream`` with ``FLWR_HOME`` in a private folder whose
  ``config.toml`` names the SuperLink.

Runtime dependency installation (``uv sync``) is off everywhere (the SuperLink flag above, and the
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` environment variable for every process), so
nothing reaches the network: fedlora[flower] must already be installed where each process runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.errors import FedLoRAError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """ppid → child pids, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first found, then theirs)."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each pid, wait up to ``grace`` s, then SIGKILL the ones still alive."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _bin(name: str) -> str:
    """A Flower executable next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FedLoRAError(f"{name} not found: install fedlora[flower] (flwr[simulation]==1.41.0)")
    return found


def _config_value(value: str) -> str:
    """A ``--node-config`` value: numbers as they are, anything else quoted (Flower's parser)."""
    try:
        float(value)
        return value
    except ValueError:
        return f'"{value}"'


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (insecure), as a context manager.

    Every process is started in its own session and tracked by pid; :meth:`stop` (also on leaving
    the ``with`` block, even after an error) stops them and every descendant they spawned
    (flower-superexec, flwr-serverapp, flwr-clientapp). ``workdir`` holds ``FLWR_HOME`` and the logs.
    """

    def __init__(self, workdir: str | Path, num_nodes: int, node_config: dict[int, dict[str, str]] | None = None,
                 resident: bool = False, threads: int = 0, shared_worker: bool = False):
        self.workdir = Path(workdir)
        self.num_nodes = num_nodes
        self.node_config = node_config or {}
        self.resident = resident  # nodes are `fedlora flower node` (a resident worker each), not flower-supernode
        self.threads = threads  # torch threads per resident worker (0: torch's default)
        self.shared_worker = shared_worker  # resident: one `fedlora flower node` (one worker) for all the nodes
        self.node_dirs: dict[int, Path] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.known: set[int] = set()
        self.port = free_port()
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: this venv first on PATH
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        from fedlora.flower.node import POLL_DEFAULT, POLL_ENV

        self.env = dict(os.environ, PATH=path, FLWR_HOME=str(self.workdir / "flwr-home"),
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
        self.env.setdefault(POLL_ENV, POLL_DEFAULT)  # the SuperExecs look for new ClientApp tasks every 0.1 s

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.procs[name] = p
        self.known.add(p.pid)
        return p

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for its port, then the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "flwr-home").mkdir(exist_ok=True)
        self._start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                  str(self.port), "--disable-runtime-dependency-installation"])
        self._wait_port(self.port, "superlink")
        configs = []
        for k in range(self.num_nodes):
            cfg = {"partition-id": str(k), "num-partitions": str(self.num_nodes), **self.node_config.get(k, {})}
            configs.append(["--node-config", " ".join(f"{key}={_config_value(val)}" for key, val in cfg.items())])
        link = ["--insecure", "--superlink", self.address]
        if not self.resident:
            for k in range(self.num_nodes):
                self._start(f"supernode-{k}", [_bin("flower-supernode"), *link, "--port", str(free_port()), *configs[k]])
        elif self.shared_worker:  # one `fedlora flower node`: a worker and every SuperNode (free ports each)
            self._start("supernode-all", self._node_command(range(self.num_nodes)) + link +
                        [a for c in configs for a in c])
        else:
            for k in range(self.num_nodes):
                self._start(f"supernode-{k}", self._node_command([k]) + link + ["--port", str(free_port()), *configs[k]])
        self._write_connection()
        return self

    def _node_command(self, nodes) -> list[str]:
        """``fedlora flower node`` for ``nodes`` (one private folder, short enough for a socket path)."""
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="fedlora-node-"))
        for k in nodes:
            self.node_dirs[k] = d
        return [sys.executable, "-m", "fedlora.cli", "flower", "node", "--node-dir", str(d)] + (
            ["--threads", str(self.threads)] if self.threads else [])

    def _wait_port(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise FedLoRAError(f"{name} exited with {self.procs[name].returncode}; see {self.workdir / name}.log")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FedLoRAError(f"{name} did not open port {port} within {timeout:.0f} s; see {self.workdir / name}.log")

    def _write_connection(self) -> None:
        from fedlora.files import atomic_write

        atomic_write(self.workdir / "flwr-home" / "config.toml",
                     '[superlink]\ndefault = "local-deployment"\n\n'
                     f'[superlink.local-deployment]\naddress = "{self.address}"\ninsecure = true\n')

    def run_app(self, app_dir: str | Path, timeout: float = 600.0, run_config: str | None = None
                ) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR local-deployment --stream``: submit the run and follow it to the end."""
        cmd = [_bin("flwr"), "run", str(app_dir), "local-deployment", "--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True, text=True)
        self.known.add(p.pid)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_pids([p.pid, *descendants(p.pid)])
            out, _ = p.communicate()
            raise FedLoRAError(f"flwr run did not finish within {timeout:.0f} s:\n{out[-4000:]}")
        return subprocess.CompletedProcess(cmd, p.returncode, out, "")

    def kill_node(self, k: int) -> None:
        """Kill SuperNode ``k`` and its ClientApp processes at once (SIGKILL): a node lost mid-round
        (with ``shared_worker``: every node)."""
        p = self.procs["supernode-all" if self.shared_worker else f"supernode-{k}"]
        pids = [p.pid, *descendants(p.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    def worker_pid(self, k: int, wait: float = 120.0) -> int:
        """The pid of node ``k``'s resident worker (once it is listening)."""
        from fedlora.flower.channel import PIDFILE

        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            f = self.node_dirs[k] / PIDFILE
            if f.is_file() and f.read_text().strip():
                return int(f.read_text())
            time.sleep(0.1)
        raise FedLoRAError(f"node {k}'s worker wrote no pid within {wait:.0f} s; see {self.workdir}/supernode-{k}.log")

    def all_pids(self) -> list[int]:
        """Every process this deployment started, and their live descendants."""
        pids = set()
        for pid in self.known:
            pids.add(pid)
            pids.update(descendants(pid))
        return sorted(p for p in pids if _alive(p))

    def stop(self) -> None:
        """Stop every process started here (and their descendants), by pid; nothing is left running."""
        pids = self.all_pids()
        stop_pids(pids)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for d in set(self.node_dirs.values()):
            shutil.rmtree(d, ignore_errors=True)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
