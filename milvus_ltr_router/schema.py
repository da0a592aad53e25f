"""Schema facts of a collection: its primary and vector fields, their metric, and the copies
and index parameters a layout makes from them."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from pymilvus import DataType, MilvusClient

from .milvus_io import CollectionError

log = logging.getLogger(__name__)


@dataclass
class CollectionInfo:
    """Schema facts of one collection, as :func:`describe` reads them."""
    name: str                 # the real name (aliases resolved)
    primary_field: str
    vector_field: str
    dim: int
    fields: list[dict]        # describe_collection's field dicts
    enable_dynamic_field: bool
    metric: str | None        # of the vector index, when there is one

    @property
    def field_names(self) -> list[str]:
        """Names of every field, in schema order."""
        return [f["name"] for f in self.fields]


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
