"""Repairing and adopting layouts: rows written around a layout, and collections already
partitioned by cluster that get a layout without being rebuilt. Both keep the layout's
cluster moments true: adoption computes them in its pass over the partitions, a repair
that moved rows recomputes them from one read-out of the layout."""
from __future__ import annotations

import logging

import numpy as np
from pymilvus import MilvusClient

from .clustering import check_algorithm, normalize_rows
from .columns import rows_to_arrays
from .labels import check_metric
from .layout import (Layout, LayoutError, cluster_of, has_stray_partition, layout_collection_name,
                     new_layout_id, utc_now, write_layout_meta, write_moments)
from .milvus_io import DEFAULT_PARTITION, is_milvus_lite, key_list_literal
from .moments import DEFAULT_RANK, ClusterMoments, MomentAccumulator
from .readout import read_moments
from .scan import iter_rows
from .schema import describe

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stray rows
def stray_rows(client: MilvusClient, layout: Layout) -> int:
    """Rows in ``_default`` when it is not one of the layout's partitions (written by a client
    that did not route them); 0 in ``single`` storage, where ``_default`` holds the layout."""
    if not has_stray_partition(layout):
        return 0
    if is_milvus_lite(client):   # count(*) ignores partition_names there
        return int(client.get_partition_stats(layout.collection, DEFAULT_PARTITION)["row_count"])
    # not partition statistics: on servers they lag behind unflushed rows and ignore deletes
    res = client.query(layout.collection, filter="", output_fields=["count(*)"],
                       partition_names=[DEFAULT_PARTITION])
    return int(res[0]["count(*)"])


def move_stray_rows(client: MilvusClient, layout: Layout, batch_size: int = 4096,
                    moments: bool = True) -> int:
    """Move every row of ``_default`` into its cluster when ``_default`` lies outside the layout.

    Each batch is written to its clusters first and only then deleted from ``_default``, so
    an interruption leaves a row twice (repaired by the next run), never nowhere. A key that
    also has an older copy in a cluster partition keeps the ``_default`` row (the newer
    write). On milvus-lite an upsert replaces the key in every partition, so no deletes are
    needed (and its deletes ignore the partition). Once rows were moved, and ``moments``,
    the clusters' moments are recomputed from one read-out of the layout and stored
    (:func:`refresh_moments`). Returns the number of rows moved.
    """
    if not has_stray_partition(layout):
        return 0
    moved = _move_stray_rows(client, layout, batch_size)
    if moved and moments:
        refresh_moments(client, layout)
    return moved


def refresh_moments(client: MilvusClient, layout: Layout) -> Layout:
    """The clusters' moments of ``layout`` recomputed from one read-out of its rows, stored
    and set on ``layout`` (returned)."""
    return write_moments(client, layout, read_moments(client, layout))


def _move_stray_rows(client: MilvusClient, layout: Layout, batch_size: int) -> int:
    storage, lite = layout.storage, is_milvus_lite(client)
    info = describe(client, layout.collection, layout.vector_field)
    fields = info.field_names + (["*"] if info.enable_dynamic_field else [])
    pk, moved = layout.primary_field, 0
    while True:
        batch = client.query(layout.collection, filter="", output_fields=fields, limit=batch_size,
                             partition_names=[DEFAULT_PARTITION], consistency_level="Strong")
        if not batch:
            return moved
        _, vecs = rows_to_arrays(batch, pk, layout.vector_field)
        clusters = cluster_of(layout, vecs)
        keys = key_list_literal(r[pk] for r in batch)
        if not lite:
            older = client.query(layout.collection, filter=f"{pk} in {keys}", output_fields=[pk],
                                 partition_names=storage.partitions, consistency_level="Strong")
            if older:
                expr = f"{pk} in {key_list_literal(r[pk] for r in older)}"
                for name in storage.partitions:
                    client.delete(layout.collection, filter=expr, partition_name=name)
        if storage.cluster_field is not None:
            for r, c in zip(batch, clusters):
                r[storage.cluster_field] = int(c)
        parts = np.asarray([storage.write_partition(c) for c in clusters])
        for part in np.unique(parts):
            client.upsert(layout.collection, [batch[i] for i in np.flatnonzero(parts == part)],
                          partition_name=str(part))
        if not lite:
            client.delete(layout.collection, filter=f"{pk} in {keys}", partition_name=DEFAULT_PARTITION)
        moved += len(batch)
        log.info("moved %d rows out of _default (%d so far)", len(batch), moved)


# --------------------------------------------------------------------------- adoption
def adopt_layout(client: MilvusClient, collection: str, algorithm: str = "kmeans",
                 metric: str | None = None, vector_field: str | None = None,
                 batch_size: int = 4096, overwrite: bool = False) -> Layout:
    """Store a layout for a collection already partitioned by cluster (no centroids yet).

    Centroids are the per-partition means, streamed; for ``spherical`` they are
    normalised to unit length. Each partition's moments are computed in the same pass and
    stored with the layout. Empty partitions (and an empty ``_default``) are left out.
    """
    algorithm = check_algorithm(algorithm)
    info = describe(client, collection, vector_field)
    metric = check_metric(metric or info.metric or "IP")
    if client.has_collection(layout_collection_name(info.name)) and not overwrite:
        raise LayoutError(f"{info.name!r} already has a layout; pass overwrite=True to replace it")
    client.load_collection(info.name)
    names, sums, sizes, moments = [], [], [], []
    for name in sorted(client.list_partitions(info.name)):
        total = np.zeros(info.dim, dtype=np.float64)
        n, acc = 0, None
        for batch in iter_rows(client, info.name, [info.primary_field, info.vector_field],
                               batch_size, partition_names=[name]):
            _, vecs = rows_to_arrays(batch, info.primary_field, info.vector_field)
            total += vecs.sum(axis=0, dtype=np.float64)
            n += len(vecs)
            if acc is None:     # one cluster, anchored near its mean (the first batch's)
                acc = MomentAccumulator(1, info.dim, min(DEFAULT_RANK, info.dim),
                                        anchors=vecs.mean(axis=0, keepdims=True))
            acc.update(vecs, 0)
        if n == 0:
            if name != DEFAULT_PARTITION:
                log.warning("partition %r is empty; left out of the adopted layout", name)
            continue
        names.append(name)
        sums.append(total / n)
        sizes.append(n)
        moments.append(acc.result())
    if not names:
        raise LayoutError(f"collection {info.name!r} has no non-empty partitions to adopt")
    centroids = np.asarray(sums, dtype=np.float32)
    if algorithm == "spherical":
        centroids = normalize_rows(centroids)
    layout = Layout(collection=info.name, centroids=centroids, partition_names=names,
                    sizes=np.asarray(sizes, dtype=np.int64), metric=metric, algorithm=algorithm,
                    dim=info.dim, layout_id=new_layout_id(),
                    vector_field=info.vector_field, primary_field=info.primary_field,
                    created_at=utc_now(),
                    extra={"adopted": True})
    write_layout_meta(client, layout)
    return write_moments(client, layout, _stack(moments))


def _stack(moments: list[ClusterMoments]) -> ClusterMoments:
    """The moments of one-cluster ``moments`` as those of as many clusters."""
    return ClusterMoments.from_arrays({k: np.concatenate([m.to_arrays()[k] for m in moments])
                                       for k in moments[0].to_arrays()})
