"""The empty target collection of a build: the source's fields plus the cluster id, its
indexes and partitions (:mod:`.build`)."""
from __future__ import annotations

import logging
from typing import Sequence

from pymilvus import DataType, MilvusClient

from .layout import Layout, LayoutError, drop_layout, write_log_name
from .milvus_io import DEFAULT_PARTITION
from .schema import CollectionInfo, clone_schema, vector_index_params
from .switch import create_key_log

log = logging.getLogger(__name__)


def create_target(client: MilvusClient, info: CollectionInfo, layout: Layout, overwrite: bool,
                   index: dict | None, lite: bool) -> None:
    """The empty target: the source's fields (and the cluster id), indexes, partitions."""
    target, storage = layout.collection, layout.storage
    if client.has_collection(target) and overwrite:
        drop_layout(client, target)
    client.create_collection(target, schema=_target_schema(
        info, layout, _scalar_indexes(client, info, skip=layout.storage.cluster_field)))
    # indexes before the rows: segments are indexed as they seal, not all after the flush
    client.create_index(target, vector_index_params(client, info.vector_field, layout.metric, index))
    if storage.cluster_field is not None:
        client.create_index(target, _cluster_index_params(client, storage.cluster_field, lite))
    for name in storage.partitions:
        if name == DEFAULT_PARTITION:
            continue
        try:
            client.create_partition(target, name)
        except Exception as exc:
            if "partition" in str(exc).lower() and ("max" in str(exc).lower() or "limit" in str(exc).lower()):
                raise LayoutError(f"server refused partition {name}: {exc}; raise "
                                  f"rootCoord.maxPartitionNum (default 1024)") from exc
            raise
    if storage.cluster_field is not None:
        # routed writers record the keys they write here, for the layout's upkeep
        key_type = next(f["type"] for f in info.fields if f["name"] == info.primary_field)
        create_key_log(client, write_log_name(target), key_type, clusters=True)
        layout.extra["write_log"] = True


def _scalar_indexes(client: MilvusClient, info: CollectionInfo, skip: str | None = None) -> list[str]:
    """Names of the source's indexes on fields other than its vector field and ``skip`` (the
    cluster-id field: a rebuild reads a laid-out collection, and the new layout indexes its
    own cluster ids)."""
    names = []
    try:
        for name in client.list_indexes(info.name):
            field = (client.describe_index(info.name, name) or {}).get("field_name")
            if field not in (info.vector_field, skip):
                names.append(name)
    except Exception as exc:            # only for a warning: never fail a build on it
        log.debug("could not list the indexes of %r: %s", info.name, exc)
    return names


def _target_schema(info: CollectionInfo, layout: Layout, scalar_indexes: Sequence[str] = ()):
    schema = clone_schema(info, scalar_indexes)
    if layout.storage.cluster_field is not None:
        extra = {"is_clustering_key": True} if layout.storage.clustering_key else {}
        schema.add_field(layout.storage.cluster_field, DataType.INT64,
                         description="milvus-ltr-router cluster id", **extra)
    return schema


def _cluster_index_params(client, field: str, lite: bool):
    """STL_SORT on the cluster id (milvus-lite implements INVERTED only)."""
    params = client.prepare_index_params()
    params.add_index(field_name=field, index_type="INVERTED" if lite else "STL_SORT")
    return params
