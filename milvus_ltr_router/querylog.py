"""The query log: a sampled stream of real search vectors, kept in Milvus.

Retraining needs queries that look like production traffic. The client
samples a fraction of search vectors and a background thread writes them to
``<collection>__ltr_querylog`` (vector + timestamp, optional TTL). Logging can
never fail a search: the queue is bounded, and a full queue or a failed write
is counted, not raised. With a metrics recorder (:mod:`.metrics`) the logger also records,
per collection, the vectors sampled, written, dropped (full queue, NaN or inf) and failed.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
from pymilvus import DataType, MilvusClient

from .metrics import NULL_METRICS, NullMetrics
from .milvus_io import count_rows
from .progress import ProgressCounter
from .sampling import reservoir_sample
from .scan import iter_rows
from .schema import vector_index_params

log = logging.getLogger(__name__)

LOG_SUFFIX = "__ltr_querylog"


def log_collection_name(collection: str) -> str:
    return f"{collection}{LOG_SUFFIX}"


def now_ms() -> int:
    return int(time.time() * 1000)


def ensure_log_collection(client: MilvusClient, collection: str, dim: int,
                          ttl_seconds: int | None = None) -> str:
    """Create the log collection of ``collection`` if missing; returns its name."""
    name = log_collection_name(collection)
    if client.has_collection(name):
        return name
    schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("ts", DataType.INT64)
    props = {"collection.ttl.seconds": int(ttl_seconds)} if ttl_seconds else {}
    client.create_collection(name, schema=schema, index_params=vector_index_params(client, "vector", "IP"),
                             properties=props)
    client.load_collection(name)
    return name


def finite_rows(vectors) -> np.ndarray:
    """``vectors`` as float32 ``[n, d]`` without the rows that hold NaN or inf."""
    vectors = np.array(vectors, dtype=np.float32, ndmin=2)
    return vectors[np.isfinite(vectors).all(axis=1)]


def write_queries(client: MilvusClient, collection: str, vectors: np.ndarray,
                  ts_ms: int | None = None) -> int:
    """Append ``vectors`` to the log of ``collection`` (created on first use); rows with
    NaN or inf are never written. Returns the number of rows written."""
    vectors = finite_rows(vectors)
    if not len(vectors):
        return 0
    name = ensure_log_collection(client, collection, vectors.shape[1])
    ts = now_ms() if ts_ms is None else ts_ms
    client.insert(name, [{"vector": v.tolist(), "ts": ts} for v in vectors])
    return len(vectors)


def log_size(client: MilvusClient, collection: str) -> int:
    name = log_collection_name(collection)
    if not client.has_collection(name):
        return 0
    client.load_collection(name)
    return count_rows(client, name)


def sample_queries(client: MilvusClient, collection: str, size: int, since_seconds: float | None = None,
                   seed: int = 0, batch_size: int = 4096) -> np.ndarray:
    """A uniform sample of up to ``size`` logged vectors, optionally only the recent ones."""
    name = log_collection_name(collection)
    if not client.has_collection(name):
        return np.empty((0, 0), dtype=np.float32)
    client.load_collection(name)
    filt = f"ts >= {now_ms() - int(since_seconds * 1000)}" if since_seconds else "ts >= 0"
    total = count_rows(client, name)

    def blocks():
        with ProgressCounter(total, "read log", "rows") as bar:
            for batch in iter_rows(client, name, ["id", "vector"], batch_size, filter=filt):
                bar.update(len(batch))
                yield np.asarray([r["vector"] for r in batch], dtype=np.float32)

    return reservoir_sample(blocks(), size, seed)


@dataclass
class LogStats:
    submitted: int = 0     # vectors handed to the logger
    written: int = 0       # vectors stored in Milvus
    dropped: int = 0       # lost to a full queue
    failed: int = 0        # lost to a failed write
    non_finite: int = 0    # refused at submit: NaN or inf components
    last_error: str = ""


class QueryLogger:
    """Background writer with a bounded queue: a search never waits on logging.

    :meth:`sample` picks each search vector with probability ``rate`` (seeded by ``seed``)
    and :meth:`submit` queues vectors; ``metrics`` (:func:`.metrics.metrics_recorder`;
    default: none) records ``query_log`` counts per collection (sampled, written, dropped,
    failed)."""

    def __init__(self, client: MilvusClient, max_queue: int = 1000, ttl_seconds: int | None = None,
                 *, rate: float = 1.0, seed: int | None = None,
                 metrics: NullMetrics = NULL_METRICS):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"log_rate must be in [0, 1], got {rate}")
        self._client = client
        self._ttl = ttl_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.rate = float(rate)
        self._rng = np.random.default_rng(seed)
        self.metrics = metrics
        self.stats = LogStats()
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="ltr-query-log", daemon=True)
        self._thread.start()

    def sample(self, collection: str, queries: np.ndarray) -> int:
        """Queue each of a search's ``queries`` with probability ``rate`` (:meth:`submit`);
        returns how many were picked."""
        with self._lock:
            pick = self._rng.random(len(queries)) < self.rate
        n = int(pick.sum())
        if n:
            self.submit(collection, queries[pick])
        return n

    def _record(self, collection: str, **counts) -> None:
        if not self.metrics.enabled:
            return
        try:
            self.metrics.query_log(collection, **counts)
        except Exception as exc:    # metrics never fail a search or the log
            log.debug("recording query-log metrics failed: %s", exc)

    def submit(self, collection: str, vectors: np.ndarray) -> None:
        """Queue ``vectors`` for logging; drops (and counts) them when the queue is full.

        Rows with NaN or inf are dropped here (counted in ``stats.non_finite``):
        they are useless for training and would fail the whole batch's write.
        """
        vectors = np.array(vectors, dtype=np.float32, ndmin=2)
        clean = finite_rows(vectors)
        with self._lock:
            self.stats.submitted += len(vectors)
            self.stats.non_finite += len(vectors) - len(clean)
        if len(clean) < len(vectors):
            log.debug("query log of %r: dropped %d of %d vectors with NaN or inf", collection,
                      len(vectors) - len(clean), len(vectors))
        dropped = len(vectors) - len(clean)
        if len(clean):
            try:
                self._queue.put_nowait((collection, clean, now_ms()))
            except queue.Full:
                with self._lock:
                    self.stats.dropped += len(clean)
                dropped += len(clean)
        self._record(collection, sampled=len(vectors), dropped=dropped)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            collection, vectors, ts = item
            try:
                if collection not in self._known:
                    ensure_log_collection(self._client, collection, vectors.shape[1], self._ttl)
                    self._known.add(collection)
                write_queries(self._client, collection, vectors, ts)
                with self._lock:
                    self.stats.written += len(vectors)
                self._record(collection, written=len(vectors))
            except Exception as exc:  # logging must never take searches down
                with self._lock:
                    self.stats.failed += len(vectors)
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._record(collection, failed=len(vectors))
                log.warning("query log write failed (%d vectors): %s", len(vectors), exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written (or timeout); True if drained."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 30.0) -> None:
        if not self._thread.is_alive():
            return
        self.flush(timeout)
        try:
            self._queue.put(None, timeout=1)
        except queue.Full:
            pass
        self._thread.join(timeout=5)
