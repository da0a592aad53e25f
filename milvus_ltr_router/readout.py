"""Read-out of a laid-out collection by cluster: every row with the cluster it sits in.

With a cluster-id field the collection is read in runs of consecutive clusters
(:func:`.layout.cluster_range_filters`: an index lookup each); in ``partition`` storage
partition by partition, the partition asked being the membership.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from pymilvus import MilvusClient

from .labels import Block
from .layout import Layout, cluster_range_filters, live_sizes
from .milvus_io import is_milvus_lite
from .progress import ProgressCounter
from .scan import SCAN_BYTES, SCAN_ROWS, iter_columns


def iter_layout_blocks(client: MilvusClient, layout: Layout, batch_size: int = SCAN_ROWS,
                       progress: ProgressCounter | None = None, readers: int = 2) -> Iterator[Block]:
    """``(ids, vectors, cluster index)`` blocks over the whole laid-out collection.

    With a cluster-id field, one pass over the collection reads it beside each
    vector. In ``partition`` storage Milvus does not report which partition a
    row sits in, so it reads partition by partition: the partition asked is the
    membership. Reads are column-wise, ``readers`` requests in flight (see
    :func:`.scan.iter_columns`); blocks do not come in key order.
    """
    storage = layout.storage
    pk, vf = layout.primary_field, layout.vector_field
    if storage.cluster_field is not None:
        fields = [pk, vf, storage.cluster_field]
        # parts sized in bytes as well as rows (a reply may not pass 64 MB), by sizes scaled to
        # the rows stored now (routed inserts grow clusters after the build)
        rows_per_part = max(1, min(batch_size, SCAN_BYTES // (4 * layout.dim + 16)))
        parts = None if is_milvus_lite(client) else \
            cluster_range_filters(storage.cluster_field, live_sizes(client, layout),
                                  rows_per_part, pk)
        for cols in iter_columns(client, layout.collection, fields, batch_size, readers=readers,
                                 parts=parts):
            if progress is not None:
                progress.update(len(cols[pk]))
            yield (np.asarray(cols[pk]), cols[vf],
                   np.asarray(cols[storage.cluster_field], dtype=np.int64))
        return
    for index, name in enumerate(layout.partition_names):
        for cols in iter_columns(client, layout.collection, [pk, vf], batch_size,
                                 partition_names=[name], readers=readers):
            if progress is not None:
                progress.update(len(cols[pk]))
            yield np.asarray(cols[pk]), cols[vf], index


def read_moments(client: MilvusClient, layout: Layout, batch_size: int = SCAN_ROWS):
    """The cluster moments (:class:`~.moments.ClusterMoments`) of ``layout``, from one
    read-out of its rows, anchored at its centroids."""
    from .moments import MomentAccumulator
    acc = MomentAccumulator.for_centroids(layout.centroids)
    with ProgressCounter(int(layout.sizes.sum()), "moments", "rows") as bar:
        for _ in acc.feed(iter_layout_blocks(client, layout, batch_size, bar)):
            pass
    return acc.result()
