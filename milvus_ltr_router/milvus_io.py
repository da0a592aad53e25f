"""Small helpers over pymilvus's ``MilvusClient``: schema facts and streamed read-out.

Everything that reads a collection goes through :func:`iter_rows`, built on
``query_iterator`` (paging by primary key loses rows on partitioned
milvus-lite collections), so memory is bounded by ``batch_size``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from pymilvus import DataType, MilvusClient

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


def key_list_literal(values) -> str:
    """A Milvus list literal of primary keys for ``pk in [...]`` filters: ints or strings with
    any characters (JSON escapes for quotes and backslashes, non-ASCII kept as is)."""
    return "[" + ", ".join(json.dumps(v.item() if isinstance(v, np.generic) else v, ensure_ascii=False)
                           for v in values) + "]"


def rows_to_arrays(batch: list[dict], primary: str, vector: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[primary] for r in batch])
    vecs = np.asarray([r[vector] for r in batch], dtype=np.float32)
    return ids, vecs


def clone_schema(info: CollectionInfo):
    """A new schema with the same fields, keeping primary keys as given (auto_id off).

    What the copy does not carry over is logged as a warning, field by field:
    auto_id (rows keep the source's keys; new rows need a key), default values,
    the partition key (the layout decides partitions). Scalar indexes are not
    copied either: create them on the target after the build.
    """
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=info.enable_dynamic_field)
    dropped = [f"auto_id on {f['name']!r}" for f in info.fields if f.get("auto_id")]
    dropped += [f"default value of {f['name']!r}" for f in info.fields
                if f.get("default_value") not in (None, "")]
    dropped += [f"partition key {f['name']!r}" for f in info.fields if f.get("is_partition_key")]
    if dropped:
        log.warning("the laid-out copy of %r does not keep: %s (and no scalar indexes)", info.name,
                    "; ".join(dropped))
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
                             metric: str = "IP", batch_size: int = 2000, vector_field: str = "vector",
                             show_progress: bool | None = None) -> None:
    """Create ``collection`` (int64 ``id``, float ``vector``, optional scalar fields) and fill it.

    Scalar types follow the values: int -> INT64, float -> DOUBLE, str -> VARCHAR.
    For demos, tests and benchmarks; production collections come from their owners.
    """
    from .progress import progress
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    scalars = scalars or {}
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(vector_field, DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    for name, values in scalars.items():
        sample = values[0]
        if isinstance(sample, str):
            schema.add_field(name, DataType.VARCHAR, max_length=max(len(v) for v in values) + 1)
        elif isinstance(sample, (int, np.integer)):
            schema.add_field(name, DataType.INT64)
        else:
            schema.add_field(name, DataType.DOUBLE)
    client.create_collection(collection, schema=schema,
                             index_params=vector_index_params(client, vector_field, metric))
    starts = range(0, len(vectors), batch_size)
    for s in progress(starts, total=len(starts), desc=f"insert {collection}", unit="batch",
                      enabled=show_progress):
        rows = []
        for i in range(s, min(s + batch_size, len(vectors))):
            row = {"id": int(ids[i]), vector_field: vectors[i].tolist()}
            for name, values in scalars.items():
                v = values[i]
                row[name] = v.item() if isinstance(v, np.generic) else v
            rows.append(row)
        client.insert(collection, rows)
    client.flush(collection)
