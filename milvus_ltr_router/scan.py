"""Streamed read-out of a collection, memory bounded by the batch size.

Row dicts come from :func:`iter_rows`, built on ``query_iterator`` (paging by primary key
loses rows on partitioned milvus-lite collections); column batches from
:func:`iter_columns`, which on servers splits the collection into independent requests
(:func:`plan_scan`) read in parallel at one snapshot timestamp.
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from pymilvus import DataType, MilvusClient

from .columns import DYNAMIC_COLUMN, Columns, rows_to_columns
from .milvus_io import CollectionError, is_milvus_lite, snapshot_timestamp

SCAN_ROWS = 16384           # rows per read request: the server's query window (offset + limit)
SCAN_BYTES = 16 << 20       # and at most this payload: a part may hold twice its share, and the
                            # proxy sends at most 64 MB (proxy.grpc.serverMaxSendSize)
_INT_TYPES = (DataType.INT8, DataType.INT16, DataType.INT32, DataType.INT64)


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
