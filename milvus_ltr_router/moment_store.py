"""Cluster moments in Milvus: the collection ``<collection>__ltr_moments`` beside the layout's.

Milvus 2.3 allows one vector field per collection and at most 32,768 dimensions, so a
layout's moments (:class:`.moments.ClusterMoments`: ``L`` means and ``L x r`` basis
vectors of ``d`` dimensions) cannot be columns of the layout collection. They get a
collection of their own, one row per (cluster, slot):

========  ============================  =================================================
field     type                          value
========  ============================  =================================================
key       INT64, primary                ``cluster * (r + 1) + slot``
cluster   INT64                         the cluster (row order of the layout)
slot      INT64                         0: the mean; ``1..r``: basis vector ``slot - 1``
vector    FLOAT_VECTOR(d), FLAT index   the mean, or the basis vector
value     FLOAT                         slot 0: the residual variance; slot j: the
                                        variance along basis vector j
size      INT64                         slot 0: the rows the moments were computed from
meta      VARCHAR                       key 0 only: JSON (clustering_id, layout_id,
                                        n_clusters, dim, rank, computed_at, version)
========  ============================  =================================================

The moments are read back by key ranges in pages under the server's query window
(16,384 rows) and about 16 MB of payload. This module knows nothing of layouts: the
layout module (:mod:`.layout`) names the collection and decides which moments belong to
which layout (by ``clustering_id``, number of clusters and dimension).
"""
from __future__ import annotations

import json
import logging

import numpy as np
from pymilvus import DataType, MilvusClient

from .milvus_io import ensure_loaded
from .moments import ClusterMoments
from .scan import iter_columns
from .schema import vector_index_params

log = logging.getLogger(__name__)

MOMENTS_VERSION = 1
QUERY_WINDOW = 16384         # rows a query may return (offset + limit)
PAGE_BYTES = 16 << 20        # payload of one read page or insert request
_ROW_OVERHEAD = 64           # bytes of a row besides its vector (key, cluster, slot, value, ...)


def rows_per_page(dim: int, page_bytes: int = PAGE_BYTES) -> int:
    """Rows of ``dim``-dimensional vectors per read page or insert request: under the
    query window and about ``page_bytes`` of payload."""
    return max(1, min(QUERY_WINDOW, page_bytes // (4 * int(dim) + _ROW_OVERHEAD)))


def _schema(dim: int):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("cluster", DataType.INT64)
    schema.add_field("slot", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("value", DataType.FLOAT)
    schema.add_field("size", DataType.INT64)
    schema.add_field("meta", DataType.VARCHAR, max_length=65535)
    return schema


def _rows(moments: ClusterMoments, lo: int, hi: int, meta: str) -> list[dict]:
    """The rows of keys ``lo..hi-1`` (vectors stay numpy rows)."""
    slots = moments.rank + 1
    keys = np.arange(lo, hi)
    cluster, slot = keys // slots, keys % slots
    vectors = np.empty((len(keys), moments.dim), np.float32)
    values = np.empty(len(keys), np.float64)
    mean = slot == 0
    vectors[mean] = moments.means[cluster[mean]]
    values[mean] = moments.residual[cluster[mean]]
    vectors[~mean] = moments.bases[cluster[~mean], slot[~mean] - 1]
    values[~mean] = moments.variances[cluster[~mean], slot[~mean] - 1]
    counts = np.where(mean, moments.sizes[cluster], 0)
    return [{"key": int(k), "cluster": int(c), "slot": int(s), "vector": v, "value": float(x),
             "size": int(n), "meta": meta if k == 0 else ""}
            for k, c, s, v, x, n in zip(keys, cluster, slot, vectors, values, counts)]


def store_moments(client: MilvusClient, name: str, moments: ClusterMoments, meta: dict) -> None:
    """Store ``moments`` in the collection ``name`` (replacing any old one), ``meta`` (JSON)
    on key 0; flushed, indexed (FLAT) and loaded."""
    if client.has_collection(name):
        client.drop_collection(name)
    client.create_collection(name, schema=_schema(moments.dim),
                             index_params=vector_index_params(client, "vector", "IP"))
    text = json.dumps({**meta, "version": MOMENTS_VERSION, "n_clusters": moments.n_clusters,
                       "dim": moments.dim, "rank": moments.rank})
    total, step = moments.n_clusters * (moments.rank + 1), rows_per_page(moments.dim)
    for lo in range(0, total, step):
        client.insert(name, _rows(moments, lo, min(lo + step, total), text))
    client.flush(name)
    client.load_collection(name)


def read_moments_meta(client: MilvusClient, name: str) -> dict | None:
    """The metadata stored with the moments in ``name`` (None: no collection or no key 0)."""
    if not client.has_collection(name):
        return None
    ensure_loaded(client, name)
    rows = client.query(name, filter="key == 0", output_fields=["meta"],
                        consistency_level="Strong")
    return json.loads(rows[0]["meta"]) if rows and rows[0]["meta"] else None


def load_moments(client: MilvusClient, name: str, clustering_id: str, n_clusters: int,
                 dim: int) -> ClusterMoments | None:
    """The moments stored in ``name`` when they are those of ``clustering_id`` with
    ``n_clusters`` clusters of ``dim`` dimensions and every row is there; else None (with
    the reason logged at debug level)."""
    meta = read_moments_meta(client, name)
    if meta is None:
        log.debug("no cluster moments in %r", name)
        return None
    stored = (meta.get("clustering_id"), meta.get("n_clusters"), meta.get("dim"))
    if stored != (clustering_id, n_clusters, dim):
        log.debug("cluster moments in %r are of clustering %s (%s clusters, dim %s), not %s "
                  "(%d, %d): ignored", name, *stored, clustering_id, n_clusters, dim)
        return None
    rank = int(meta["rank"])
    slots = rank + 1
    total, step = n_clusters * slots, rows_per_page(dim)
    vectors = np.zeros((total, dim), np.float32)
    values = np.zeros(total, np.float32)
    counts = np.zeros(total, np.int64)
    seen = np.zeros(total, bool)
    parts = [f"key >= {lo} and key < {min(lo + step, total)}" for lo in range(0, total, step)]
    for cols in iter_columns(client, name, ["key", "vector", "value", "size"], step,
                             parts=parts):
        keys = np.asarray(cols["key"], np.int64)
        ok = (keys >= 0) & (keys < total)
        keys = keys[ok]
        vectors[keys], seen[keys] = cols["vector"][ok], True
        values[keys] = np.asarray(cols["value"], np.float32)[ok]
        counts[keys] = np.asarray(cols["size"], np.int64)[ok]
    if not seen.all():
        log.debug("cluster moments in %r hold %d of their %d rows (being written?): ignored",
                  name, int(seen.sum()), total)
        return None
    vectors, values = vectors.reshape(n_clusters, slots, dim), values.reshape(n_clusters, slots)
    try:
        return ClusterMoments(sizes=counts.reshape(n_clusters, slots)[:, 0], means=vectors[:, 0],
                              bases=vectors[:, 1:], variances=values[:, 1:],
                              residual=values[:, 0])
    except ValueError as exc:
        log.debug("cluster moments in %r do not agree: %s; ignored", name, exc)
        return None
