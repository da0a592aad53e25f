"""A real Milvus standalone server without Docker, from the PyPI package ``milvus`` (2.3.5).

For integration tests and benchmarks on machines without a Docker engine. It
is a real server over gRPC, not milvus-lite. Only one can run per machine
(its embedded etcd binds a fixed port).
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MISSING_SERVER_HINT = ("the embedded Milvus server needs the [server] extra: "
                       "pip install 'milvus-ltr-router[server]' (or set MILVUS_URI to a running server)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedServer:
    uri: str
    base_dir: Path
    _server: object

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "logs"

    def log_tail(self, n_lines: int = 15, width: int = 400) -> str:
        """Last lines of the server's own logs (each cut to ``width``), for failure reports."""
        chunks = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-n_lines:]
            chunks.append(f"--- {path}\n" + "\n".join(line[:width] for line in lines))
        return "\n".join(chunks)

    def stop(self) -> None:
        self._server.stop()


def start_embedded_server(base_dir: str | Path, port: int | None = None,
                          extra_config: dict | None = None,
                          timeout: float = 120.0) -> EmbeddedServer:
    """Start Milvus 2.3.5 standalone with data and logs under ``base_dir``; wait until it serves."""
    try:
        from milvus import MilvusServer
    except ImportError as exc:
        raise RuntimeError(MISSING_SERVER_HINT) from exc
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    server = MilvusServer()
    server.set_base_dir(str(base_dir))
    server.listen_port = port or free_port()
    config = {"log.level": "warn", "rootCoord.maxPartitionNum": 4096, **(extra_config or {})}
    for key, value in config.items():
        server.config.set(key, value)
    t0 = time.perf_counter()
    uri = f"http://127.0.0.1:{server.listen_port}"
    try:
        server.start()
        _wait_ready(uri, timeout)
    except BaseException:       # a half-started server must not outlive the failed start
        try:
            server.stop()
        except Exception as stop_exc:   # pragma: no cover - best effort
            log.warning("stopping the failed embedded Milvus at %s: %s", uri, stop_exc)
        raise
    log.info("embedded Milvus 2.3.5 serving at %s after %.1f s (data in %s)", uri,
             time.perf_counter() - t0, base_dir)
    return EmbeddedServer(uri=uri, base_dir=base_dir, _server=server)


def _wait_ready(uri: str, timeout: float) -> None:
    from pymilvus import MilvusClient
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client = MilvusClient(uri=uri, timeout=5)
            client.list_collections()
            client.close()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"embedded Milvus at {uri} did not become ready in {timeout:.0f} s: {last}")
