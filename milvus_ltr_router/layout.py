"""IVF layouts on Milvus: the layout model and its metadata.

Milvus builds its IVF per segment and exposes no centroids, so the plugin owns
the clustering. A layout is a collection whose rows are stored by cluster -
one partition per cluster, or a cluster-id field (see :mod:`.storage`) - plus
a companion collection ``<collection>__ltr_layout`` holding one row per
cluster (centroid, cluster name, size) and the layout's metadata, so every
process that can reach Milvus (clients, the cron job) reads the same layout.
The clusters' moments (:mod:`.moments`) sit in a second companion,
``<collection>__ltr_moments`` (:mod:`.moment_store`: one vector field per
collection). Both are read and written here only.

The layout's life cycle lives above this module, each stage importing it:
:mod:`.build` (the build pipeline), :mod:`.readout` (every row with its cluster)
and :mod:`.repair` (stray rows, adopting a collection already partitioned).
"""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
from pymilvus import DataType, MilvusClient

from .clustering import as_vector_batch, assign_clusters
from .deprecation import moved_names
from .errors import OperationalError
from .milvus_io import (DEFAULT_PARTITION, CollectionError, count_rows, ensure_loaded,
                        is_milvus_lite, snapshot_timestamp)
from .moment_store import load_moments, store_moments
from .moments import ClusterMoments
from .scan import iter_columns
from .schema import vector_index_params
from .storage import Storage, StorageError
from .switch import set_stamp

log = logging.getLogger(__name__)

LAYOUT_SUFFIX = "__ltr_layout"
MOMENTS_SUFFIX = "__ltr_moments"
WRITES_SUFFIX = "__ltr_writes"
META_VERSION = 1


class LayoutError(OperationalError):
    """A layout that cannot be built, read or trusted."""


@dataclass
class Layout:
    """A clustered collection: what routing needs, read back from Milvus.

    Per-cluster facts are arrays with one row per cluster (row i is cluster i):
    ``centroids``, ``partition_names``, ``sizes``. They are stored as columns of the
    metadata collection, one row per cluster (:func:`write_layout_meta`,
    :func:`read_layout`); facts of the whole layout go into :meth:`meta`. A new
    per-cluster fact is a field here with a default, a column in ``_meta_schema`` and
    ``_cluster_rows``, and a read in ``_layout_from_rows``. ``moments`` (several vectors
    per cluster) are stored in a collection of their own (:func:`write_moments`).
    """

    collection: str
    centroids: np.ndarray            # [L, d] float32
    partition_names: list[str]       # cluster names, row order == cluster order (the Milvus
                                     # partition names too in "partition" storage)
    sizes: np.ndarray                # [L] rows per cluster when the layout was written
    metric: str                      # IP, COSINE or L2 (the collection's search metric)
    algorithm: str                   # spherical or kmeans (the assignment rule)
    dim: int
    layout_id: str
    vector_field: str = "vector"
    primary_field: str = "id"
    seed: int = 0
    created_at: str = ""
    source: str | None = None
    extra: dict = field(default_factory=dict)
    storage: Storage | None = None   # None: one partition per cluster (layouts before storage modes)
    clustering_id: str = ""          # the build whose clusters these are ("": this one); routers
                                     # are bound to it, so a layout rebuilt in another storage
                                     # mode from the same clusters keeps its routers
    moments: ClusterMoments | None = field(default=None, repr=False, compare=False)
                                     # the clusters' moments (None: layouts stored before them,
                                     # or none stored for this clustering)

    def __post_init__(self):
        if self.storage is None:
            self.storage = Storage("partition", tuple(self.partition_names))
        if not self.clustering_id:
            self.clustering_id = self.layout_id

    @property
    def write_log(self) -> str | None:
        """The key log routed writers record their keys in (``<collection>__ltr_writes``),
        read by :mod:`.maintain`; None where the layout keeps none (built before write logs,
        or ``partition`` storage, whose clusters never share a segment)."""
        return write_log_name(self.collection) if self.extra.get("write_log") else None

    @property
    def n_partitions(self) -> int:
        """Number of clusters (the router's outputs); kept under its historical name."""
        return len(self.partition_names)

    @property
    def n_clusters(self) -> int:
        """Number of clusters."""
        return len(self.partition_names)

    def meta(self) -> dict:
        """Layout-wide metadata, as stored (JSON) with cluster 0 of the metadata collection."""
        return {"version": META_VERSION, "collection": self.collection, "metric": self.metric,
                "algorithm": self.algorithm, "dim": self.dim, "layout_id": self.layout_id,
                "clustering_id": self.clustering_id,
                "vector_field": self.vector_field, "primary_field": self.primary_field,
                "seed": self.seed, "created_at": self.created_at, "source": self.source,
                "n_partitions": self.n_partitions, **self.storage.meta(), **self.extra}


def new_layout_id() -> str:
    """Sortable and unique: creation time plus a random suffix."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def utc_now() -> str:
    """Now, UTC, to the second (ISO 8601): a layout's ``created_at``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def layout_collection_name(collection: str) -> str:
    """Name of the metadata collection of the laid-out ``collection``."""
    return f"{collection}{LAYOUT_SUFFIX}"


def moments_collection_name(collection: str) -> str:
    """Name of the cluster-moments collection of the laid-out ``collection``."""
    return f"{collection}{MOMENTS_SUFFIX}"


def write_log_name(collection: str) -> str:
    """Name of the write log of the laid-out ``collection`` (:attr:`Layout.write_log`)."""
    return f"{collection}{WRITES_SUFFIX}"


def partition_names_for(n_clusters: int) -> list[str]:
    """``c0000, c0001, ...``: names that sort in cluster order."""
    width = max(4, len(str(n_clusters - 1)))
    return [f"c{i:0{width}d}" for i in range(n_clusters)]


def cluster_of(layout: Layout, vectors) -> np.ndarray:
    """Cluster index of each vector under the layout's own rule (for routed writes)."""
    vecs = as_vector_batch(vectors, layout.dim, f"layout {layout.layout_id}")
    return assign_clusters(vecs, layout.centroids, layout.algorithm)


def assign(layout: Layout, vectors) -> list[str]:
    """Cluster name of each vector under the layout's own rule."""
    return [layout.partition_names[i] for i in cluster_of(layout, vectors)]


def has_stray_partition(layout: Layout) -> bool:
    """Whether ``_default`` lies outside the layout (rows there were written around it)."""
    return layout.storage.mode != "single" and DEFAULT_PARTITION not in layout.storage.partitions


# --------------------------------------------------------------------------- the metadata collection
# One row per cluster: the per-cluster facts as columns, the layout-wide metadata (JSON) on
# cluster 0's row. A new per-cluster fact is a field in _meta_schema, a value in _cluster_rows
# and a read in _layout_from_rows.
_META_FIELDS = ["cluster", "centroid", "partition_name", "size", "meta"]
_META_KEYS = {"version", "collection", "metric", "algorithm", "dim", "layout_id", "vector_field",
              "primary_field", "seed", "created_at", "source", "n_partitions",
              "clustering_id"} | Storage.META_KEYS     # read into fields; other keys go to extra


def _meta_schema(dim: int):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("cluster", DataType.INT64, is_primary=True)
    schema.add_field("centroid", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("partition_name", DataType.VARCHAR, max_length=255)
    schema.add_field("size", DataType.INT64)
    schema.add_field("meta", DataType.VARCHAR, max_length=65535)
    return schema


def _cluster_rows(layout: Layout) -> list[dict]:
    meta = json.dumps(layout.meta())
    return [{"cluster": i, "centroid": layout.centroids[i].tolist(), "partition_name": p,
             "size": int(layout.sizes[i]), "meta": meta if i == 0 else ""}
            for i, p in enumerate(layout.partition_names)]


def _layout_from_rows(name: str, rows: list[dict], meta: dict) -> Layout:
    """The layout stored in ``rows`` (cluster order) and ``meta`` for the collection ``name``."""
    names = [r["partition_name"] for r in rows]
    try:
        storage = Storage.from_meta(meta, names)
    except StorageError as exc:
        raise LayoutError(f"layout collection {layout_collection_name(name)!r}: {exc}") from exc
    layout = Layout(
        collection=name,
        centroids=np.asarray([r["centroid"] for r in rows], dtype=np.float32),
        partition_names=names,
        sizes=np.asarray([r["size"] for r in rows], dtype=np.int64),
        metric=meta["metric"], algorithm=meta["algorithm"], dim=int(meta["dim"]),
        layout_id=meta["layout_id"], vector_field=meta["vector_field"],
        primary_field=meta["primary_field"], seed=int(meta.get("seed", 0)),
        created_at=meta.get("created_at", ""), source=meta.get("source"),
        extra={k: v for k, v in meta.items() if k not in _META_KEYS}, storage=storage,
        clustering_id=meta.get("clustering_id", ""))
    if layout.centroids.shape != (len(rows), layout.dim):
        raise LayoutError(f"stored centroids have shape {layout.centroids.shape}, "
                          f"expected ({len(rows)}, {layout.dim})")
    return layout


def write_layout_meta(client: MilvusClient, layout: Layout) -> None:
    """Store centroids and metadata in ``<collection>__ltr_layout`` (replacing any old one),
    and stamp the collection with the layout's id (:mod:`.switch`)."""
    name = layout_collection_name(layout.collection)
    if client.has_collection(name):
        client.drop_collection(name)
    index = vector_index_params(client, "centroid", "IP" if layout.metric == "L2" else layout.metric)
    client.create_collection(name, schema=_meta_schema(layout.dim), index_params=index)
    rows = _cluster_rows(layout)
    for start in range(0, len(rows), 1000):
        client.insert(name, rows[start:start + 1000])
    client.flush(name)
    client.load_collection(name)
    # the cheap layout-id check of routed clients (:mod:`.switch`): the layout stored here
    set_stamp(client, layout.collection, layout_id=layout.layout_id)


def read_layout(client: MilvusClient, collection: str, check_sizes: bool = False,
                moments: bool = True) -> Layout:
    """The layout of ``collection`` (or of the collection an alias points at).

    Checks that every partition exists and loads the collection if it is not
    loaded; with ``check_sizes`` also that live row counts equal the stored
    sizes (they drift once routed inserts arrive). With ``moments`` the clusters'
    stored moments are read into ``layout.moments`` when they are this layout's
    (same ``clustering_id``, clusters and dimension), else it stays None.
    """
    name = resolve_collection(client, collection)
    layout = _layout_from_rows(name, *_read_meta_rows(client, name))
    _check_collection(client, layout)
    ensure_loaded(client, name)
    if check_sizes:
        _check_sizes(client, layout)
    if moments:
        layout.moments = read_layout_moments(client, layout)
    return layout


def write_moments(client: MilvusClient, layout: Layout, moments: ClusterMoments,
                  strict: bool = True) -> Layout:
    """Store ``moments`` as the clusters' moments of ``layout`` (``<collection>__ltr_moments``,
    replacing any old ones) and set ``layout.moments``; returns ``layout``. Not ``strict``:
    a failure to store them is logged as a warning (and ``layout`` left as it was)."""
    if (moments.n_clusters, moments.dim) != (layout.n_clusters, layout.dim):
        raise LayoutError(f"moments of {moments.n_clusters} clusters of dim {moments.dim} do not "
                          f"fit layout {layout.layout_id} ({layout.n_clusters}, {layout.dim})")
    try:
        store_moments(client, moments_collection_name(layout.collection), moments,
                      {"clustering_id": layout.clustering_id, "layout_id": layout.layout_id,
                       "computed_at": utc_now()})
    except Exception as exc:
        if strict:
            raise
        log.warning("could not store the cluster moments of %r: %s: %s", layout.collection,
                    type(exc).__name__, exc)
        return layout
    layout.moments = moments
    return layout


def read_layout_moments(client: MilvusClient, layout: Layout) -> ClusterMoments | None:
    """The stored moments of ``layout``'s clusters, or None when there are none of its
    clustering (old layouts, another build's, half written) or they cannot be read."""
    try:
        return load_moments(client, moments_collection_name(layout.collection),
                            layout.clustering_id, layout.n_clusters, layout.dim)
    except Exception as exc:      # never fail a layout read on them: routing falls back
        log.warning("could not read the cluster moments of %r: %s: %s", layout.collection,
                    type(exc).__name__, exc)
        return None


def _read_meta_rows(client: MilvusClient, name: str) -> tuple[list[dict], dict]:
    """The rows of ``name``'s metadata collection in cluster order, and the layout's metadata."""
    meta_name = layout_collection_name(name)
    if not client.has_collection(meta_name):
        raise LayoutError(f"collection {name!r} has no layout (no {meta_name!r}); build one with "
                          f"'milvus-ltr-router build-layout' or adopt its partitions with "
                          f"'milvus-ltr-router adopt-layout'")
    ensure_loaded(client, meta_name)
    rows = client.query(meta_name, filter="cluster >= 0", output_fields=_META_FIELDS)
    if not rows:
        raise LayoutError(f"layout collection {meta_name!r} is empty")
    rows.sort(key=lambda r: r["cluster"])
    if [r["cluster"] for r in rows] != list(range(len(rows))):
        raise LayoutError(f"layout collection {meta_name!r} has gaps in its cluster numbers")
    meta_text = next((r["meta"] for r in rows if r["meta"]), None)
    if meta_text is None:
        raise LayoutError(f"layout collection {meta_name!r} has no metadata row")
    meta = json.loads(meta_text)
    if int(meta.get("n_partitions", len(rows))) != len(rows):
        raise LayoutError(f"layout collection {meta_name!r} holds {len(rows)} of the "
                          f"{meta['n_partitions']} clusters its metadata names: it is being "
                          f"written (build-layout --overwrite?) or was left half-written")
    return rows, meta


def _check_collection(client: MilvusClient, layout: Layout) -> None:
    """The laid-out collection has the partitions and the cluster-id field the layout names."""
    name, storage = layout.collection, layout.storage
    live = set(client.list_partitions(name))
    missing = [p for p in storage.partitions if p not in live]
    if missing:
        raise LayoutError(f"layout {layout.layout_id} of {name!r} names partitions that do not "
                          f"exist: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if storage.cluster_field is not None:
        fields = {f["name"] for f in client.describe_collection(name)["fields"]}
        if storage.cluster_field not in fields:
            raise LayoutError(f"layout {layout.layout_id} of {name!r} stores clusters in field "
                              f"{storage.cluster_field!r}, which the collection does not have")


def _check_sizes(client: MilvusClient, layout: Layout) -> None:
    """Live row counts equal the sizes the layout recorded."""
    live = cluster_sizes(client, layout)
    diff = np.flatnonzero(live != layout.sizes)
    if len(diff):
        raise LayoutError(f"{len(diff)} clusters of {layout.collection!r} hold a different number "
                          f"of rows than the layout recorded (first: "
                          f"{layout.partition_names[diff[0]]} {live[diff[0]]} vs {layout.sizes[diff[0]]})")


def current_layout_id(client: MilvusClient, collection: str) -> str | None:
    """The stored layout id of a (real) collection name: one small query, for change checks."""
    try:
        rows = client.query(layout_collection_name(collection), filter="cluster == 0",
                            output_fields=["meta"])
        return json.loads(rows[0]["meta"])["layout_id"]
    except Exception:   # missing, unloaded or unreadable: the caller re-reads the whole layout
        return None


# --------------------------------------------------------------------------- names and aliases
def resolve_collection(client: MilvusClient, collection: str) -> str:
    """The real collection name behind ``collection`` (which may be an alias)."""
    if not client.has_collection(collection):
        raise CollectionError(f"unknown collection {collection!r}")
    return client.describe_collection(collection)["collection_name"]


def laid_out_name(client: MilvusClient, collection: str) -> str | None:
    """The real name behind ``collection`` when it has a layout, else None."""
    try:
        name = resolve_collection(client, collection)
    except CollectionError:
        return None
    return name if client.has_collection(layout_collection_name(name)) else None


def has_layout(client: MilvusClient, collection: str) -> bool:
    """Whether ``collection`` (or the collection an alias points at) has a layout."""
    return laid_out_name(client, collection) is not None


def point_alias(client: MilvusClient, alias: str, collection: str) -> None:
    """Create ``alias`` or move it to ``collection`` (one atomic switch for applications).

    An alias that exists is moved, also where it was created between the look and the
    create (or ``describe_alias`` could not say)."""
    try:
        existing = client.describe_alias(alias)
    except Exception:
        existing = None
    if existing:
        client.alter_alias(collection, alias)
    else:
        try:
            client.create_alias(collection, alias)
        except Exception as exc:
            if "exist" not in str(exc).lower():
                raise
            client.alter_alias(collection, alias)
    log.info("alias %r now points at %r", alias, collection)


def drop_layout(client: MilvusClient, collection: str) -> None:
    """Drop a laid-out collection, its layout metadata, its moments and its key logs (never
    called on a source)."""
    for name in (collection, layout_collection_name(collection),
                 moments_collection_name(collection), f"{collection}__ltr_journal",
                 write_log_name(collection)):
        if client.has_collection(name):
            client.drop_collection(name)


# --------------------------------------------------------------------------- live cluster sizes
def partition_sizes(client: MilvusClient, collection: str, names: Sequence[str]) -> np.ndarray:
    """Live row count of each partition, rows not flushed yet included.

    On a server one ``count(*)`` per partition, all at one snapshot timestamp (so the counts
    add up to one moment's total); partition statistics would leave out unflushed rows. On
    milvus-lite, which ignores ``partition_names`` in ``count(*)``, its partition statistics
    (exact there).
    """
    if is_milvus_lite(client):
        return np.asarray([int(client.get_partition_stats(collection, p)["row_count"])
                           for p in names], dtype=np.int64)
    ts = snapshot_timestamp()
    return np.asarray([int(client.query(collection, filter="", output_fields=["count(*)"],
                                        partition_names=[p], consistency_level="Customized",
                                        guarantee_timestamp=ts)[0]["count(*)"]) for p in names],
                      dtype=np.int64)


def cluster_sizes(client: MilvusClient, layout: Layout, batch_size: int = 65536) -> np.ndarray:
    """Live row count of each cluster: partition statistics in ``partition`` storage, else
    the cluster-id field streamed (ids only, no vectors)."""
    storage = layout.storage
    if storage.cluster_field is None:
        return partition_sizes(client, layout.collection, layout.partition_names)
    counts = np.zeros(layout.n_clusters, dtype=np.int64)
    parts = None if is_milvus_lite(client) else \
        cluster_range_filters(storage.cluster_field, live_sizes(client, layout), batch_size,
                              layout.primary_field)
    for cols in iter_columns(client, layout.collection, [storage.cluster_field], batch_size,
                             parts=parts):
        cid = np.asarray(cols[storage.cluster_field], dtype=np.int64)
        counts += np.bincount(cid[(cid >= 0) & (cid < layout.n_clusters)], minlength=layout.n_clusters)
    return counts


def live_sizes(client: MilvusClient, layout: Layout) -> np.ndarray:
    """The recorded cluster sizes scaled up to the rows the collection holds now (one
    ``count(*)``): read parts planned from them stay within their byte budget when routed
    inserts have grown the collection since the build (a single cluster that grew far
    more than the rest can still make its part up to that much larger)."""
    sizes = np.asarray(layout.sizes, dtype=np.float64)
    recorded, live = float(sizes.sum()), float(count_rows(client, layout.collection))
    if recorded > 0 and live > recorded:
        sizes = sizes * (live / recorded)
    return np.ceil(sizes).astype(np.int64)


def cluster_range_filters(field: str, sizes: Sequence[int], rows_per_part: int,
                          primary_field: str | None = None) -> list[str]:
    """Filters on the cluster-id ``field`` that split a layout into runs of consecutive
    clusters of about ``rows_per_part`` rows (by the recorded ``sizes``): disjoint, and the
    first and last open-ended, so together they cover every row whatever its cluster id.
    A cluster of more than twice ``rows_per_part`` rows is split further by residue of the
    integer ``primary_field`` (when given), so no request outgrows the server's reply limit."""
    edges, acc = [], 0
    for c, n in enumerate(sizes):
        if acc and acc + int(n) > rows_per_part:
            edges.append(c)
            acc = 0
        acc += int(n)
    edges = [None] + edges + [None]
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        expr = " and ".join(x for x in (f"{field} >= {lo}" if lo is not None else "",
                                        f"{field} < {hi}" if hi is not None else "") if x)
        expr = expr or f"{field} % 1 == 0"
        lo_c, hi_c = lo or 0, len(sizes) if hi is None else hi
        big = int(sum(int(n) for n in sizes[lo_c:hi_c]))
        k = -(-big // rows_per_part)
        if primary_field is None or big <= 2 * rows_per_part:
            parts.append(expr)
            continue
        for j in range(k):
            res = f"{primary_field} % {k} == {j}" + (f" or {primary_field} % {k} == {j - k}" if j else "")
            parts.append(f"({expr}) and ({res})")
    return parts


# Names that lived here before the layout's life cycle got modules of its own: importable from
# here with a DeprecationWarning (imported when asked for, so no import cycle at load time).
__getattr__ = moved_names(__name__, {
    "iter_layout_blocks": "milvus_ltr_router.readout",
    "build_layout": "milvus_ltr_router.build",
    "BuildReport": "milvus_ltr_router.build",
    **dict.fromkeys(["stray_rows", "move_stray_rows", "adopt_layout"], "milvus_ltr_router.repair"),
})
