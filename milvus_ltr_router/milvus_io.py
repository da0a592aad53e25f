"""Small helpers over pymilvus's ``MilvusClient``: schema facts and streamed read-out.

Everything that reads a collection goes through :func:`iter_rows`, built on
``query_iterator`` (paging by primary key loses rows on partitioned
milvus-lite collections), so memory is bounded by ``batch_size``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from pymilvus import DataType, MilvusClient, mkts_from_unixtime

from .errors import InputError, OperationalError

log = logging.getLogger(__name__)
# Milvus 2.3 servers and milvus-lite return no session timestamp to query_iterator;
# pymilvus then warns on every iterator and uses the client's clock, which is what we
# want (the iterator sees everything inserted before it started). Keep the noise out.
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)

DEFAULT_PARTITION = "_default"
SERVER_PARTITION_LIMIT = 1024   # rootCoord.maxPartitionNum's default on Milvus servers


class CollectionError(InputError):
    """A collection that is missing or does not have the shape an operation needs."""


@dataclass
class CollectionInfo:
    name: str                 # the real name (aliases resolved)
    primary_field: str
    vector_field: str
    dim: int
    fields: list[dict]        # describe_collection's field dicts
    enable_dynamic_field: bool
    metric: str | None        # of the vector index, when there is one

    @property
    def field_names(self) -> list[str]:
        return [f["name"] for f in self.fields]


def is_lite_uri(uri: str) -> bool:
    """A milvus-lite local file (``./x.db``) rather than a server URI."""
    return not uri.startswith(("http://", "https://", "tcp://", "unix:", "grpc://"))


def is_milvus_lite(client: MilvusClient) -> bool:
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


def describe(client: MilvusClient, collection: str, vector_field: str | None = None) -> CollectionInfo:
    """Schema facts of ``collection`` with a clear error for what is missing or ambiguous."""
    if not client.has_collection(collection):
        raise CollectionError(f"unknown collection {collection!r}")
    desc = client.describe_collection(collection)
    fields = desc["fields"]
    vectors = [f for f in fields if f["type"] == DataType.FLOAT_VECTOR]
    if vector_field is not None:
        vectors = [f for f in vectors if f["name"] == vector_field]
        if not vectors:
            raise CollectionError(f"collection {collection!r} has no float-vector field "
                                  f"named {vector_field!r}")
    if not vectors:
        raise CollectionError(f"collection {collection!r} has no float-vector field")
    if len(vectors) > 1:
        names = ", ".join(f["name"] for f in vectors)
        raise CollectionError(f"collection {collection!r} has several float-vector fields "
                              f"({names}); choose one with --field / vector_field=")
    primary = next(f for f in fields if f.get("is_primary"))
    vec = vectors[0]
    metric = vector_metric(client, desc["collection_name"], vec["name"])
    return CollectionInfo(name=desc["collection_name"], primary_field=primary["name"],
                          vector_field=vec["name"], dim=int(vec["params"]["dim"]), fields=fields,
                          enable_dynamic_field=bool(desc.get("enable_dynamic_field")), metric=metric)


def vector_metric(client: MilvusClient, collection: str, field: str) -> str | None:
    """Metric of the index on ``field`` (None: no index), found by index *name*: an index
    created with a custom name is not found by passing the field name to describe_index."""
    try:
        names = client.list_indexes(collection, field_name=field) or []
    except Exception:   # no index yet
        return None
    for name in names:
        try:
            idx = client.describe_index(collection, name) or {}
        except Exception:
            continue
        if idx.get("field_name", field) == field and idx.get("metric_type"):
            return idx["metric_type"]
    return None


def count_rows(client: MilvusClient, collection: str, partition_names: list[str] | None = None) -> int:
    """Exact row count; Strong consistency so that rows inserted just before are counted."""
    res = client.query(collection, filter="", output_fields=["count(*)"],
                       partition_names=partition_names, consistency_level="Strong")
    return int(res[0]["count(*)"])


def iter_rows(client: MilvusClient, collection: str, output_fields: list[str],
              batch_size: int = 4096, partition_names: list[str] | None = None,
              filter: str = "") -> Iterator[list[dict]]:
    """Batches of row dicts from ``query_iterator``; memory bounded by ``batch_size``."""
    it = client.query_iterator(collection, batch_size=batch_size, filter=filter,
                               output_fields=output_fields, partition_names=partition_names)
    try:
        while True:
            batch = it.next()
            if not batch:
                return
            yield batch
    finally:
        it.close()


# --------------------------------------------------------------------------- column-wise I/O
SCAN_ROWS = 16384           # rows per read request: the server's query window (offset + limit)
SCAN_BYTES = 16 << 20       # and at most this payload: a part may hold twice its share, and the
                            # proxy sends at most 64 MB (proxy.grpc.serverMaxSendSize)
WRITE_BYTES = 16 << 20      # payload per insert request (the proxy refuses requests over 64 MB)
_INT_TYPES = (DataType.INT8, DataType.INT16, DataType.INT32, DataType.INT64)

Columns = dict   # field name -> np.ndarray (numbers, [n, dim] float vectors) or list (other values)
DYNAMIC_COLUMN = "$dynamic"   # column of dicts: each row's dynamic-field keys (read with "*")


def n_rows_of(columns: Columns) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def take_rows(columns: Columns, index) -> Columns:
    """The rows ``index`` (integer array or slice) of every column."""
    out = {}
    for name, col in columns.items():
        if isinstance(col, np.ndarray):
            out[name] = col[index]
        elif isinstance(index, slice):
            out[name] = col[index]
        else:
            out[name] = [col[i] for i in index]
    return out


def concat_columns(parts: list[Columns]) -> Columns:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in parts[0]:
        cols = [p[name] for p in parts]
        out[name] = np.concatenate(cols) if isinstance(cols[0], np.ndarray) else \
            [v for c in cols for v in c]
    return out


def columns_to_rows(columns: Columns) -> list[dict]:
    """Row dicts for ``MilvusClient.insert`` (vectors stay numpy rows: no per-float Python lists)."""
    names = [n for n in columns if n != DYNAMIC_COLUMN]
    cols = []
    for name in names:
        col = columns[name]
        cols.append(col.tolist() if isinstance(col, np.ndarray) and col.ndim == 1 else col)
    rows = [dict(zip(names, values)) for values in zip(*cols)]
    for row, extra in zip(rows, columns.get(DYNAMIC_COLUMN) or ()):
        row.update(extra)
    return rows


def rows_to_columns(rows: list[dict], fields: list[str], vector_fields=(),
                    dynamic: bool = False) -> Columns:
    """Row dicts as columns: ``vector_fields`` as float32 [n, dim], int-only fields as int64;
    with ``dynamic``, every other key goes to :data:`DYNAMIC_COLUMN`."""
    out: Columns = {}
    if dynamic:
        known = set(fields)
        out[DYNAMIC_COLUMN] = [{k: v for k, v in r.items() if k not in known} for r in rows]
    for name in fields:
        values = [r.get(name) for r in rows]
        if name in vector_fields:
            out[name] = np.asarray(values, dtype=np.float32)
        elif values and all(type(v) is int for v in values):
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = values
    return out


def snapshot_timestamp() -> int:
    """A Milvus hybrid timestamp of now: reads that carry it see every write before it."""
    import time
    return mkts_from_unixtime(time.time())


def _result_columns(res, fields: list[str], types: dict[str, int], dims: dict[str, int],
                    dynamic: bool = False) -> Columns:
    """Columns of one ``client.query`` result.

    Float vectors are taken from the result's undecoded column when pymilvus keeps
    one (``HybridExtraList`` of pymilvus >= 2.5: one buffer copy instead of a Python
    list per row); other fields, and vectors on clients without it, row by row.
    """
    lazy = {fd.field_name: fd for fd in getattr(res, "_lazy_field_data", None) or []}
    n = len(res)
    out: Columns = {}
    rows = None
    # the stored row dicts, not decoded further: fixed-width scalars are already in them
    raw = [list.__getitem__(res, i) for i in range(n)]
    for name in fields:
        fd = lazy.get(name)
        if (types.get(name) == DataType.FLOAT_VECTOR and fd is not None
                and fd.type == DataType.FLOAT_VECTOR and not len(fd.valid_data)):
            flat = np.array(fd.vectors.float_vector.data, dtype=np.float32)
            if flat.size == n * dims[name]:
                out[name] = flat.reshape(n, dims[name])
                continue
        if fd is None and all(name in r for r in raw):
            values = [r[name] for r in raw]
        else:
            if rows is None:     # decodes every lazy field of every row
                rows = [res[i] for i in range(n)]
            values = [r.get(name) for r in rows]
        if types.get(name) == DataType.FLOAT_VECTOR:
            out[name] = np.asarray(values, dtype=np.float32).reshape(n, dims[name])
        elif types.get(name) in _INT_TYPES:
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = values
    if dynamic:
        if rows is None:
            rows = [res[i] for i in range(n)]
        out[DYNAMIC_COLUMN] = [{k: v for k, v in r.items() if k not in types} for r in rows]
    return out


def _and(*exprs: str) -> str:
    parts = [e for e in exprs if e]
    return " and ".join(f"({e})" for e in parts)


def _count(client, collection, expr, partition_names, ts) -> int:
    res = client.query(collection, filter=expr, output_fields=["count(*)"],
                       partition_names=partition_names, consistency_level="Customized",
                       guarantee_timestamp=ts)
    return int(res[0]["count(*)"])


def plan_scan(client: MilvusClient, collection: str, primary_field: str, rows_per_request: int,
              partition_names: list[str] | None = None, filter: str = "",
              ts: int | None = None) -> list[str]:
    """Filters that split the rows of ``collection`` (matching ``filter``) into disjoint
    parts of at most about ``rows_per_request`` rows, by residue of an integer primary key.

    Unlike ``query_iterator`` (one request per batch, each ordered by primary key across
    every segment), the parts are independent requests, so they can run in parallel and
    cost the same wherever the rows sit. Residues are counted first; a part that holds
    more than twice its share (keys in strides) is split again. Negative keys (whose
    residue Milvus may report negative) are covered by a second term.
    """
    ts = snapshot_timestamp() if ts is None else ts
    total = _count(client, collection, filter, partition_names, ts)
    if total == 0:
        return []
    k0 = max(1, math.ceil(total / rows_per_request))
    todo = [(k0, j) for j in reversed(range(k0))]
    plan, covered = [], 0
    while todo:
        k, j = todo.pop()
        expr = f"{primary_field} % {k} == {j}" + (f" or {primary_field} % {k} == {j - k}" if j else "")
        expr = _and(expr if k > 1 else "", filter) or f"{primary_field} % 1 == 0"
        n = _count(client, collection, expr, partition_names, ts) if k > 1 else total
        if n > 2 * rows_per_request and k < (1 << 40):
            todo += [(2 * k, j), (2 * k, j + k)]
            continue
        if n:
            plan.append(expr)
            covered += n
    if covered != total:
        raise CollectionError(f"scan plan of {collection!r} covers {covered} of {total} rows")
    return plan


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """``fn`` over ``items`` with up to ``workers`` calls in flight, results in order."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ltr-read") as pool:
        pending: deque[Future] = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                break
        try:
            while pending:
                result = pending.popleft().result()
                for item in it:
                    pending.append(pool.submit(fn, item))
                    break
                yield result
        finally:
            for f in pending:
                f.cancel()


def iter_columns(client: MilvusClient, collection: str, output_fields: list[str],
                 batch_size: int = SCAN_ROWS, partition_names: list[str] | None = None,
                 filter: str = "", readers: int = 2, parts: list[str] | None = None
                 ) -> Iterator[Columns]:
    """Batches of columns (see :func:`_result_columns`) over every row of ``collection``.

    Collections with an integer primary key on a server are read by :func:`plan_scan`'s
    independent requests, ``readers`` of them in flight, all at one snapshot timestamp
    (rows written after the scan starts are not read). ``parts``, when given, are the
    filters of those requests instead (disjoint, together covering every row: e.g. ranges
    of an indexed field, which cost an index lookup each, where the residue filters cost
    a pass over every key each - O(N^2 / batch_size) in all). Otherwise (string keys,
    milvus-lite) the rows come from ``query_iterator``. Batches hold about
    ``batch_size`` rows (at most twice that); their order is not the key order.
    """
    desc = client.describe_collection(collection)
    types = {f["name"]: f["type"] for f in desc["fields"]}
    dims = {f["name"]: int(f["params"]["dim"]) for f in desc["fields"]
            if f["type"] == DataType.FLOAT_VECTOR}
    primary = next(f for f in desc["fields"] if f.get("is_primary"))
    dynamic = "*" in output_fields
    fields = [f for f in output_fields if f != "*"]
    if types[primary["name"]] not in _INT_TYPES or is_milvus_lite(client):
        vectors = [f for f in fields if types.get(f) == DataType.FLOAT_VECTOR]
        for batch in iter_rows(client, collection, output_fields, min(batch_size, 16384),
                               partition_names, filter):
            if dynamic:
                known = set(types)
                yield rows_to_columns(batch, fields, vectors) | {
                    DYNAMIC_COLUMN: [{k: v for k, v in r.items() if k not in known} for r in batch]}
            else:
                yield rows_to_columns(batch, fields, vectors)
        return
    row_bytes = sum(4 * dims[f] if f in dims else 8 if types.get(f) in _INT_TYPES else 64
                    for f in fields) + (64 if dynamic else 0)
    batch_size = max(1, min(batch_size, SCAN_BYTES // row_bytes))
    ts = snapshot_timestamp()
    plan = parts if parts is not None else \
        plan_scan(client, collection, primary["name"], batch_size, partition_names, filter, ts)

    def fetch(expr: str) -> Columns:
        res = client.query(collection, filter=expr, output_fields=output_fields,
                           partition_names=partition_names, consistency_level="Customized",
                           guarantee_timestamp=ts, strict_float32=True)
        return _result_columns(res, fields, types, dims, dynamic)

    yield from _ordered_map(fetch, plan, readers)


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
    float vectors, a pymilvus without these hooks), and callers send row dicts instead.
    """

    def __init__(self, client: MilvusClient, collection: str):
        self.client, self.collection = client, collection
        self.fields = self._plan()
        self.available = self.fields is not None

    def _plan(self) -> list[tuple[str, int, int]] | None:
        if is_milvus_lite(self.client) or not hasattr(self.client, "_get_connection") \
                or not hasattr(self.client, "_generate_call_context"):
            return None
        try:
            from pymilvus.grpc_gen import milvus_pb2
        except ImportError:     # pragma: no cover - every pymilvus 2.x/3.x ships it
            return None
        self._pb = milvus_pb2
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
        return fields

    def accepts(self, columns: Columns) -> bool:
        return self.available and set(columns) == {name for name, _, _ in self.fields}

    def insert(self, columns: Columns, partition: str | None = None) -> int:
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


def key_list_literal(values) -> str:
    """A Milvus list literal of primary keys for ``pk in [...]`` filters: ints or strings with
    any characters (JSON escapes for quotes and backslashes, non-ASCII kept as is)."""
    return "[" + ", ".join(json.dumps(v.item() if isinstance(v, np.generic) else v, ensure_ascii=False)
                           for v in values) + "]"


def rows_to_arrays(batch: list[dict], primary: str, vector: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[primary] for r in batch])
    vecs = np.asarray([r[vector] for r in batch], dtype=np.float32)
    return ids, vecs


def clone_schema(info: CollectionInfo, scalar_indexes: Sequence[str] = ()):
    """A new schema with the same fields, keeping primary keys as given (auto_id off).

    What the copy does not carry over is logged as a warning, field by field:
    auto_id (rows keep the source's keys; new rows need a key), default values,
    the partition key (the layout decides partitions), and the source's
    ``scalar_indexes`` (names of its indexes on other fields than the vector; create
    them on the target after the build).
    """
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=info.enable_dynamic_field)
    dropped = [f"auto_id on {f['name']!r}" for f in info.fields if f.get("auto_id")]
    dropped += [f"default value of {f['name']!r}" for f in info.fields
                if f.get("default_value") not in (None, "")]
    dropped += [f"partition key {f['name']!r}" for f in info.fields if f.get("is_partition_key")]
    dropped += [f"scalar index {name!r}" for name in scalar_indexes]
    if dropped:
        log.warning("the laid-out copy of %r does not keep: %s", info.name, "; ".join(dropped))
    for f in info.fields:
        params = dict(f.get("params") or {})
        extra = {}
        for key in ("max_length", "dim", "max_capacity"):
            if key in params:
                extra[key] = int(params[key])
        if f.get("element_type") is not None and f["type"] == DataType.ARRAY:
            extra["element_type"] = f["element_type"]
        if f.get("nullable"):
            extra["nullable"] = True
        schema.add_field(f["name"], f["type"], is_primary=bool(f.get("is_primary")),
                         description=f.get("description", ""), **extra)
    return schema


def vector_index_params(client: MilvusClient, field: str, metric: str, index: dict | None = None):
    """Index params for ``field``: ``index`` like ``{"index_type": "IVF_FLAT", "params": {...}}``.

    The default, FLAT, suits partitions of about sqrt(N) rows: each probed
    partition is small enough that brute force is the fastest exact scan.
    """
    index = dict(index or {})
    params = client.prepare_index_params()
    params.add_index(field_name=field, index_type=index.pop("index_type", "FLAT"),
                     metric_type=index.pop("metric_type", metric), params=index.pop("params", {}),
                     **index)
    return params


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
