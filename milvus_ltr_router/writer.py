"""Write paths: insert requests built column-wise, several in flight, and the small
collections demos, tests and benchmarks create."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
from pymilvus import DataType, MilvusClient

from .columns import Columns, columns_to_rows, n_rows_of, take_rows
from .errors import InputError, OperationalError
from .milvus_io import is_milvus_lite
from .pymilvus_compat import has_hook, warn_missing_hook
from .schema import vector_index_params

WRITE_BYTES = 16 << 20      # payload per insert request (the proxy refuses requests over 64 MB)


def request_rows(columns: Columns, request_bytes: int = WRITE_BYTES) -> int:
    """Rows per insert request so that one request carries about ``request_bytes``."""
    n = n_rows_of(columns)
    if n == 0:
        return 1
    row_bytes = 0
    for col in columns.values():
        if isinstance(col, np.ndarray):
            row_bytes += col.itemsize * (col.shape[1] if col.ndim == 2 else 1)
        else:
            row_bytes += 64       # strings, JSON: a guess; requests stay far under the limit
    return max(1, request_bytes // max(1, row_bytes))


_RAW_SCALARS = {DataType.INT64: "long_data", DataType.INT32: "int_data", DataType.INT16: "int_data",
                DataType.INT8: "int_data", DataType.BOOL: "bool_data", DataType.FLOAT: "float_data",
                DataType.DOUBLE: "double_data", DataType.VARCHAR: "string_data"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class ColumnInserter:
    """Insert requests built column-wise: a float-vector column goes into the request as one
    buffer instead of through pymilvus's per-row packing (~15 us a row of client CPU).

    Uses pymilvus's gRPC handler with a prebuilt ``InsertRequest`` (its ``insert_param``);
    :attr:`available` is False where that does not apply (milvus-lite, dynamic fields,
    auto ids, nullable or default-valued fields, types other than numbers, strings and
    float vectors) or where pymilvus lacks these hooks (which logs a WARNING once per
    process, :mod:`.pymilvus_compat`), and callers send row dicts instead.
    """

    def __init__(self, client: MilvusClient, collection: str):
        self.client, self.collection = client, collection
        self.fields = self._plan()
        self.available = self.fields is not None

    def _plan(self) -> list[tuple[str, int, int]] | None:
        if is_milvus_lite(self.client):
            return None
        desc = self.client.describe_collection(self.collection)
        if desc.get("enable_dynamic_field"):
            return None
        fields = []
        for f in desc["fields"]:
            if f.get("auto_id") or f.get("nullable") or f.get("default_value") not in (None, "") \
                    or f.get("is_function_output"):
                return None
            if f["type"] == DataType.FLOAT_VECTOR:
                fields.append((f["name"], f["type"], int(f["params"]["dim"])))
            elif f["type"] in _RAW_SCALARS:
                fields.append((f["name"], f["type"], 0))
            else:
                return None
        return fields if self._hooks() else None

    def _hooks(self) -> bool:
        """Whether pymilvus has the internals this path uses (:mod:`.pymilvus_compat` logs
        a WARNING once per process where one is missing)."""
        fallback, cost = "bulk inserts fall back to row dicts", "~15 us a row of client CPU"
        try:
            from pymilvus.grpc_gen import milvus_pb2
        except ImportError:     # every pymilvus 2.5-3.x ships it
            warn_missing_hook("pymilvus.grpc_gen.milvus_pb2", fallback, cost)
            return False
        # the call context carries the database name (without it: the default database)
        for hook in ("_get_connection", "_generate_call_context"):
            if not has_hook(self.client, hook, fallback, cost, owner="MilvusClient"):
                return False
        self._pb = milvus_pb2
        return True

    def accepts(self, columns: Columns) -> bool:
        """Whether ``columns`` can go as one prebuilt request (exactly the collection's fields)."""
        return self.available and set(columns) == {name for name, _, _ in self.fields}

    def insert(self, columns: Columns, partition: str | None = None) -> int:
        """Insert ``columns`` into ``partition`` in one request; returns the rows stored."""
        n = n_rows_of(columns)
        req = self._pb.InsertRequest(collection_name=self.collection, partition_name=partition or "",
                                     num_rows=n)
        for name, dtype, dim in self.fields:
            col = columns[name]
            fd = req.fields_data.add()
            fd.field_name, fd.type = name, dtype
            if dtype == DataType.FLOAT_VECTOR:
                arr = np.ascontiguousarray(col, dtype="<f4")
                if arr.shape != (n, dim):
                    raise InputError(f"column {name!r} has shape {arr.shape}, expected ({n}, {dim})")
                buf = arr.tobytes()
                fd.vectors.dim = dim
                fd.vectors.float_vector.MergeFromString(b"\x0a" + _varint(len(buf)) + buf)
            else:
                values = col.tolist() if isinstance(col, np.ndarray) else list(col)
                if len(values) != n:
                    raise InputError(f"column {name!r} has {len(values)} values, expected {n}")
                getattr(fd.scalars, _RAW_SCALARS[dtype]).data.extend(values)
        res = self.client._get_connection().batch_insert(
            self.collection, [], partition or "", context=self.client._generate_call_context(),
            insert_param=req, schema={"fields": []})
        if int(res.insert_count) != n:
            raise OperationalError(f"insert into {self.collection!r} stored {res.insert_count} of {n} rows")
        return n


class ParallelWriter:
    """Inserts column batches with up to ``writers`` requests in flight.

    Each request carries about ``request_bytes``, built by :class:`ColumnInserter` when the
    collection allows it, else as row dicts; :meth:`submit` blocks while ``2 * writers``
    requests are pending (memory stays bounded), and the first failed insert is raised by
    the next :meth:`submit` or by :meth:`close`. Rows are sent once each; requests may
    reach the server in a different order than submitted.
    """

    def __init__(self, client: MilvusClient, collection: str, writers: int = 2,
                 request_bytes: int = WRITE_BYTES, on_written: Callable[[int], None] | None = None,
                 column_requests: bool = True):
        self.client, self.collection = client, collection
        self.request_bytes = request_bytes
        self.rows_written = 0
        self.inserter = ColumnInserter(client, collection) if column_requests else None
        self._on_written = on_written
        self._pool = ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="ltr-write")
        self._slots = threading.Semaphore(2 * max(1, writers))
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def _insert(self, columns: Columns, partition: str | None) -> int:
        try:
            if self.inserter is not None and self.inserter.accepts(columns):
                n = self.inserter.insert(columns, partition)
            else:
                rows = columns_to_rows(columns)
                self.client.insert(self.collection, rows, partition_name=partition or "")
                n = len(rows)
            with self._lock:
                self.rows_written += n
            if self._on_written is not None:
                self._on_written(n)
            return n
        finally:
            self._slots.release()

    def _check(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()

    def submit(self, columns: Columns, partition: str | None = None) -> None:
        """Queue ``columns`` for ``partition`` as requests of about ``request_bytes`` each."""
        n = n_rows_of(columns)
        step = request_rows(columns, self.request_bytes)
        for start in range(0, n, step):
            self._check()
            part = columns if step >= n else take_rows(columns, slice(start, start + step))
            self._slots.acquire()
            self._futures.append(self._pool.submit(self._insert, part, partition))

    def close(self) -> None:
        """Wait for every pending request; raise the first failure."""
        try:
            for f in self._futures:
                f.result()
        finally:
            self._futures = []
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ParallelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for f in self._futures:
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)


def create_vector_collection(client: MilvusClient, collection: str, vectors: np.ndarray,
                             ids: np.ndarray | None = None, scalars: dict[str, list] | None = None,
                             metric: str = "IP", batch_size: int = 65536, vector_field: str = "vector",
                             show_progress: bool | None = None, writers: int = 2) -> None:
    """Create ``collection`` (int64 ``id``, float ``vector``, optional scalar fields) and fill it.

    Scalar types follow the values: int -> INT64, float -> DOUBLE, str -> VARCHAR.
    Rows are written column-wise by :class:`ParallelWriter`, then flushed once.
    For demos, tests and benchmarks; production collections come from their owners.
    """
    from .progress import progress
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    scalars = scalars or {}
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(vector_field, DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    columns: Columns = {"id": ids, vector_field: vectors}
    for name, values in scalars.items():
        sample = values[0]
        if isinstance(sample, str):
            schema.add_field(name, DataType.VARCHAR, max_length=max(len(v) for v in values) + 1)
            columns[name] = list(values)
        elif isinstance(sample, (int, np.integer)):
            schema.add_field(name, DataType.INT64)
            columns[name] = np.asarray(values, dtype=np.int64)
        else:
            schema.add_field(name, DataType.DOUBLE)
            columns[name] = np.asarray(values, dtype=np.float64)
    client.create_collection(collection, schema=schema,
                             index_params=vector_index_params(client, vector_field, metric))
    starts = range(0, len(vectors), batch_size)
    with ParallelWriter(client, collection, writers=writers) as writer:
        for s in progress(starts, total=len(starts), desc=f"insert {collection}", unit="batch",
                          enabled=show_progress):
            writer.submit(take_rows(columns, slice(s, s + batch_size)))
    client.flush(collection)
