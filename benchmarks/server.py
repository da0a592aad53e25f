"""A Milvus to benchmark against: ``MILVUS_URI`` if set, else the embedded 2.3.5 server."""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def milvus_uri():
    uri = os.environ.get("MILVUS_URI")
    if uri:
        yield uri, f"MILVUS_URI={uri}"
        return
    from benchmarks.embedded_server import start_embedded_server
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as base:
        server = start_embedded_server(base)
        try:
            yield server.uri, f"embedded Milvus 2.3.5 at {server.uri}"
        finally:
            server.stop()
