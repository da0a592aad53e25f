"""A real Milvus standalone server without Docker, from the PyPI package ``milvus`` (2.3.5).

For integration tests and benchmarks on machines without a Docker engine (the
``[server]`` extra). It is a real server over gRPC, not milvus-lite. Several can
run on one machine: each gets its own embedded etcd on free ports (written to
``<base_dir>/embedEtcd.yaml`` and handed to Milvus via ``ETCD_CONFIG_PATH``;
without it every embedded etcd binds port 2380). :meth:`EmbeddedServer.restart`
starts a stopped server again on the same data, ports and configuration.

A start that fails - the process exits, or nothing serves within ``timeout`` -
stops every process it launched (the server and anything below it) before it
raises, and the error names the executable, its pid, what failed and the tail
of the server's logs.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from milvus_ltr_router.errors import OperationalError

log = logging.getLogger(__name__)

MISSING_SERVER_HINT = ("the embedded Milvus server needs the [server] extra: "
                       "pip install 'milvus-ltr-router[server]' (or set MILVUS_URI to a running server)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log_dir: str | Path, n_lines: int = 15, width: int = 400) -> str:
    """Last ``n_lines`` of each ``*.log`` file in ``log_dir`` (each line cut to ``width``)."""
    chunks = []
    for path in sorted(Path(log_dir).glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()[-n_lines:]
        chunks.append(f"--- {path}\n" + "\n".join(line[:width] for line in lines))
    return "\n".join(chunks)


# --------------------------------------------------------------------------- process trees
def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live, non-zombie Linux process; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rpartition(")")[2].split()     # after "pid (comm)": state ppid ... starttime
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[19]


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and every live process below it, as {pid: start time} (Linux ``/proc``).

    The start time tells a process from a later one that reuses its pid. Elsewhere
    only ``pid`` itself is known (with an empty start time).
    """
    if not sys.platform.startswith("linux"):
        return {pid: ""}
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    root = _proc_stat(pid)
    if root is None:
        return {}
    tree, todo = {pid: root[1]}, [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in tree:
                tree[child] = started
                todo.append(child)
    return tree


def _still_running(pid: int, started: str) -> bool:
    if not sys.platform.startswith("linux"):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == started


def _signal(pid: int, started: str, sig: int) -> bool:
    if not _still_running(pid, started):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(proc: subprocess.Popen, tree: dict[int, str], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()                    # reap the server so it does not linger as a zombie
        if not any(_still_running(p, s) for p, s in tree.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_process_tree(proc: subprocess.Popen, grace: float = 5.0) -> list[int]:
    """SIGTERM ``proc`` and every process below it, SIGKILL whatever outlives ``grace`` seconds.

    Descendants are collected before anything is signalled (an orphan is no
    longer below ``proc``), so children of a server that already exited by
    itself cannot be found. Returns the pids that got SIGTERM; ``proc`` is reaped.
    """
    tree = process_tree(proc.pid) if proc.poll() is None else {}
    signalled = [pid for pid, started in tree.items() if _signal(pid, started, signal.SIGTERM)]
    if not _wait_gone(proc, tree, grace):
        for pid, started in tree.items():
            _signal(pid, started, signal.SIGKILL)
        _wait_gone(proc, tree, 5.0)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL failed
        log.warning("embedded Milvus process %d did not exit after SIGKILL", proc.pid)
    return signalled


# --------------------------------------------------------------------------- etcd
ETCD_CONFIG = "embedEtcd.yaml"
_ENV_GUARD = threading.Lock()          # os.environ is process-wide: one start at a time


def etcd_config(base_dir: Path) -> tuple[Path, int]:
    """``<base_dir>/embedEtcd.yaml`` for this server's own embedded etcd, and its client port.

    Written once with free peer and client ports and read back afterwards, so a restart on
    the same ``base_dir`` finds its etcd member where it left it.
    """
    path = base_dir / ETCD_CONFIG
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("listen-client-urls:"):
                return path, int(line.rsplit(":", 1)[1])
    peer, client = free_port(), free_port()
    path.write_text(
        "name: default\n"
        f"data-dir: {base_dir / 'etcd-data'}\n"
        f"listen-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-cluster: default=http://127.0.0.1:{peer}\n"
        f"listen-client-urls: http://127.0.0.1:{client}\n"
        f"advertise-client-urls: http://127.0.0.1:{client}\n")
    return path, client


# --------------------------------------------------------------------------- the server
@dataclass
class EmbeddedServer:
    uri: str
    base_dir: Path
    _server: object
    _start_args: dict = field(default_factory=dict, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "logs"

    @property
    def pid(self) -> int | None:
        """The server process's pid (None once stopped)."""
        proc = self._server.server_proc
        return None if proc is None else proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be starting)."""
        proc = self._server.server_proc
        return proc is not None and proc.poll() is None

    def log_tail(self, n_lines: int = 15, width: int = 400) -> str:
        """Last lines of the server's own logs (each cut to ``width``), for failure reports."""
        return log_tail(self.log_dir, n_lines, width)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server and every process below it (SIGKILL after ``grace`` seconds)."""
        _stop(self._server, grace)

    def restart(self, timeout: float = 120.0) -> None:
        """Start the server again (stopping it first if it runs) on the same data, port and
        configuration; returns once it serves, or raises like :func:`start_embedded_server`."""
        if self.running:
            self.stop()
        port = int(self.uri.rsplit(":", 1)[1])
        again = start_embedded_server(self.base_dir, port=port, timeout=timeout,
                                      **self._start_args)
        self._server = again._server


def _stop(server, grace: float) -> None:
    if server.server_proc is not None:
        stop_process_tree(server.server_proc, grace)
    server.stop()                      # closes the log files; the process is already reaped


# Starts that fail because a port the package picked was taken before the server bound it
# (its coordinators' ports are probed from fixed defaults such as 53100, inside the kernel's
# ephemeral range, so an outgoing connection can take one in between): tried again.
PORT_RACE = "address already in use"
START_ATTEMPTS = 3


class PortRaceError(OperationalError):
    """The server exited at start because a port it was given was taken meanwhile."""


def start_embedded_server(base_dir: str | Path, port: int | None = None,
                          extra_config: dict | None = None, timeout: float = 120.0,
                          executable: str | Path | None = None) -> EmbeddedServer:
    """Start Milvus 2.3.5 standalone with data and logs under ``base_dir``; wait until it serves.

    ``timeout`` bounds the whole wait. ``executable`` runs another binary in
    place of the package's ``milvus`` (tests of the failure path). On failure
    every process the start launched is stopped and :class:`OperationalError`
    says what failed (see the module docstring). A start that fails only because one of the
    server's ports was taken meanwhile (:data:`PORT_RACE`) is tried again, up to
    :data:`START_ATTEMPTS` times.
    """
    deadline = time.monotonic() + timeout          # all attempts together
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_once(base_dir, port, extra_config, max(1.0, deadline - time.monotonic()),
                               executable)
        except PortRaceError:
            if attempt == START_ATTEMPTS or time.monotonic() >= deadline:
                raise
            log.warning("embedded Milvus could not bind a port (attempt %d of %d); starting it "
                        "again", attempt, START_ATTEMPTS)
            time.sleep(0.5)
    raise AssertionError("unreachable")  # pragma: no cover


def _start_once(base_dir, port, extra_config, timeout, executable) -> EmbeddedServer:
    try:
        from milvus import MilvusServer
    except ImportError as exc:
        raise OperationalError(MISSING_SERVER_HINT) from exc
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    server = MilvusServer(wait_for_started=False)   # we wait ourselves, bounded by ``timeout``
    if executable is not None:
        server.get_milvus_executable_path = lambda: str(executable)
    server.set_base_dir(str(base_dir))
    server.listen_port = port or free_port()
    etcd_yaml, etcd_port = etcd_config(base_dir)
    config = {"log.level": "warn", "rootCoord.maxPartitionNum": 4096, "etcd_port": etcd_port,
              **(extra_config or {})}
    for key, value in config.items():
        server.config.set(key, value)
    t0 = time.perf_counter()
    uri = f"http://127.0.0.1:{server.listen_port}"
    cwd = os.getcwd()
    try:
        with _ENV_GUARD:               # the server copies os.environ when it starts
            saved = os.environ.get("ETCD_CONFIG_PATH")
            os.environ["ETCD_CONFIG_PATH"] = str(etcd_yaml)
            try:
                server.start()
            except OSError as exc:
                raise OperationalError(f"could not run the embedded Milvus executable "
                                       f"{server.get_milvus_executable_path()}: {exc}") from exc
            finally:
                os.chdir(cwd)          # MilvusServer.start leaves base_dir as cwd if it fails
                if saved is None:
                    os.environ.pop("ETCD_CONFIG_PATH", None)
                else:
                    os.environ["ETCD_CONFIG_PATH"] = saved
        _wait_ready(server, uri, timeout, base_dir / "logs")
    except BaseException:              # a half-started server must not outlive the failed start
        try:
            _stop(server, grace=5.0)
        except Exception as stop_exc:  # pragma: no cover - best effort
            log.warning("stopping the failed embedded Milvus at %s: %s", uri, stop_exc)
        raise
    log.info("embedded Milvus 2.3.5 serving at %s after %.1f s (data in %s)", uri,
             time.perf_counter() - t0, base_dir)
    return EmbeddedServer(uri=uri, base_dir=base_dir, _server=server,
                          _start_args={"extra_config": extra_config, "executable": executable})


# the package rewrites these two at every start (the process's own output, where a Go panic
# goes); the other logs are appended to across starts
START_LOGS = ("milvus-stderr.log", "milvus-stdout.log")


def _port_race(log_dir: Path) -> str:
    """``" (<the panic line>)"`` when this start's output says a port could not be bound."""
    for name in START_LOGS:
        path = Path(log_dir) / name
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if PORT_RACE in line:
                return f" ({line.strip()[:200]})"
    return ""


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(server, uri: str, timeout: float, log_dir: Path) -> None:
    from pymilvus import MilvusClient
    proc = server.server_proc
    what = f"embedded Milvus ({server.get_milvus_executable_path()}, pid {proc.pid})"
    port = int(uri.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    last = f"nothing listened on port {port}"
    while True:
        code = proc.poll()
        if code is not None:
            race = _port_race(log_dir)
            raise (PortRaceError if race else OperationalError)(
                f"{what} exited with code {code} before serving at {uri}{race}; logs in "
                f"{log_dir}:\n{log_tail(log_dir, n_lines=8)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationalError(f"{what} did not serve at {uri} within {timeout:g} s "
                                   f"(last: {last}); stopped it; logs in {log_dir}:\n"
                                   f"{log_tail(log_dir, n_lines=8)}")
        if _port_open(port):
            try:
                client = MilvusClient(uri=uri, timeout=max(1.0, min(5.0, remaining)))
                client.list_collections()
                client.close()
                return
            except Exception as exc:  # listening, not serving yet
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(min(0.5, max(remaining, 0.01)))
