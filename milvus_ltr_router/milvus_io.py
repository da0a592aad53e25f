"""Small helpers over pymilvus's ``MilvusClient``: connections, milvus-lite, row counts.

What a collection looks like is in :mod:`.schema`, streamed read-out in :mod:`.scan`,
column batches in :mod:`.columns` and the write paths in :mod:`.writer`.
"""
from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
from pymilvus import MilvusClient, mkts_from_unixtime

from .deprecation import moved_names
from .errors import InputError

log = logging.getLogger(__name__)
# Milvus 2.3 servers and milvus-lite return no session timestamp to query_iterator;
# pymilvus then warns on every iterator and uses the client's clock, which is what we
# want (the iterator sees everything inserted before it started). Keep the noise out.
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)

DEFAULT_PARTITION = "_default"
SERVER_PARTITION_LIMIT = 1024   # rootCoord.maxPartitionNum's default on Milvus servers


class CollectionError(InputError):
    """A collection that is missing or does not have the shape an operation needs."""


def is_lite_uri(uri: str) -> bool:
    """A milvus-lite local file (``./x.db``) rather than a server URI."""
    return not uri.startswith(("http://", "https://", "tcp://", "unix:", "grpc://"))


def is_milvus_lite(client: MilvusClient) -> bool:
    """Whether ``client`` talks to milvus-lite (by its server version) rather than a server."""
    try:
        return str(client.get_server_version()).startswith("milvus_lite")
    except Exception:  # pragma: no cover - very old servers
        return False


def open_client(uri: str, token: str = "", **kwargs) -> MilvusClient:
    """A ``MilvusClient``; for a milvus-lite path, make sure its directory exists."""
    if is_lite_uri(uri):
        parent = os.path.dirname(os.path.abspath(uri))
        os.makedirs(parent, exist_ok=True)
    return MilvusClient(uri=uri, token=token, **kwargs)


def release_lite(uri: str) -> None:
    """Free a milvus-lite file for another process.

    ``client.close()`` alone keeps milvus-lite 3.x's in-process server (and the
    file lock) alive; this stops it. A no-op for server URIs.
    """
    if not is_lite_uri(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # older milvus-lite: closing the client was enough
        return
    server_manager_instance.release_server(uri)


def ensure_loaded(client: MilvusClient, collection: str) -> None:
    """Load ``collection`` unless it is loaded (a reopened milvus-lite file forgets load state)."""
    state = client.get_load_state(collection).get("state")
    if getattr(state, "name", str(state)) != "Loaded":
        client.load_collection(collection)


def count_rows(client: MilvusClient, collection: str, partition_names: list[str] | None = None) -> int:
    """Exact row count; Strong consistency so that rows inserted just before are counted."""
    res = client.query(collection, filter="", output_fields=["count(*)"],
                       partition_names=partition_names, consistency_level="Strong")
    return int(res[0]["count(*)"])


def vector_indexes(client: MilvusClient, collection: str, field: str) -> list[dict]:
    """``describe_index`` of every index on ``field`` of ``collection`` (empty: none)."""
    names = client.list_indexes(collection, field_name=field) or []
    return [client.describe_index(collection, n) or {} for n in names]


def snapshot_timestamp() -> int:
    """A Milvus hybrid timestamp of now: reads that carry it see every write before it."""
    import time
    return mkts_from_unixtime(time.time())


def key_list_literal(values) -> str:
    """A Milvus list literal of primary keys for ``pk in [...]`` filters: ints or strings with
    any characters (JSON escapes for quotes and backslashes, non-ASCII kept as is)."""
    return "[" + ", ".join(json.dumps(v.item() if isinstance(v, np.generic) else v, ensure_ascii=False)
                           for v in values) + "]"


# Names that lived here before the split, importable from here with a DeprecationWarning.
__getattr__ = moved_names(__name__, {
    **dict.fromkeys(["CollectionInfo", "describe", "vector_metric", "clone_schema",
                     "vector_index_params"], "milvus_ltr_router.schema"),
    **dict.fromkeys(["Columns", "DYNAMIC_COLUMN", "n_rows_of", "take_rows", "concat_columns",
                     "columns_to_rows", "rows_to_columns", "rows_to_arrays"],
                    "milvus_ltr_router.columns"),
    **dict.fromkeys(["SCAN_ROWS", "SCAN_BYTES", "iter_rows", "plan_scan", "iter_columns"],
                    "milvus_ltr_router.scan"),
    **dict.fromkeys(["WRITE_BYTES", "request_rows", "ColumnInserter", "ParallelWriter",
                     "create_vector_collection"], "milvus_ltr_router.writer"),
})


class AuditConnection:
    """A connection of the live recall's own for its exact re-runs (``recall_uri=``): a
    synchronous ``MilvusClient`` to ``uri`` (``conn``: user, password, token, db_name),
    opened on first use on the auditor's thread, dropped after a search that failed and
    opened afresh by the next one - a dead channel is not waited on, and served searches
    never share its queue. Called as ``MilvusClient.search``."""

    def __init__(self, uri: str, **conn):
        self.uri, self.conn = uri, conn
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()

    def __call__(self, collection_name, **kwargs):
        with self._lock:
            if self._client is None:
                self._client = MilvusClient(uri=self.uri, dedicated=True, **self.conn)
            client = self._client
        try:
            return client.search(collection_name, **kwargs)
        except Exception:
            self.close(client)
            raise

    def close(self, client: MilvusClient | None = None) -> None:
        """Drop the connection (``client``: only if it is still the one held)."""
        with self._lock:
            if self._client is None or (client is not None and client is not self._client):
                return
            client, self._client = self._client, None
        try:
            client.close()
        except Exception as exc:        # a dead connection: nothing left to free
            log.debug("closing the live recall's connection failed: %s", exc)
