"""How a layout's clusters sit in Milvus, and what a routed request names.

Three storage modes, chosen when a layout is built and recorded in its metadata:

* ``"partition"`` - one Milvus partition per cluster. A routed search names the
  probed clusters' partitions. Every partition is at least one segment, and on
  Milvus servers every segment searched costs a fixed amount (~0.07 ms each on
  2.3.5 with FLAT partitions, several times a native IVF list), and loading
  hundreds of partitions is slow. On milvus-lite partitions are the fast path.
* ``"single"`` - one unpartitioned collection with a cluster-id scalar field
  (``_ltr_cluster``, INT64, scalar-indexed) and rows written in cluster order.
  A routed search adds ``_ltr_cluster in [...]`` to the caller's filter; with
  FLAT, Milvus computes distances only for the rows that pass the filter, and
  because each cluster's rows are contiguous in the segment, scanning a cluster
  costs about what scanning a native IVF list costs.
* ``"grouped"`` - the cluster-id field plus G partitions, each holding many
  clusters that tend to be probed together (clusters of the centroids). A
  routed search names the groups of its probed clusters and adds the filter.

``auto`` picks by backend: milvus-lite evaluates filters by scanning every row
in Python (~50 ms per 100k rows) while its partitions are cheap, so it gets
``partition``; servers get ``single`` (measured fastest at every size tried; see
README "Storage modes").

This module is the one place that turns "these clusters" into
``partition_names`` and a filter, and that says where a written row goes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError

CLUSTER_FIELD = "_ltr_cluster"
MODES = ("partition", "grouped", "single")
STORAGE_CHOICES = ("auto",) + MODES
DEFAULT_PARTITION = "_default"


class StorageError(InputError):
    """A storage mode or its parameters that cannot be used."""


@dataclass(frozen=True)
class Storage:
    """Where each cluster's rows live: a partition per cluster, or a cluster-id field.

    ``cluster_partitions[i]`` is the Milvus partition that holds cluster ``i``;
    ``cluster_field`` is the scalar field holding each row's cluster id (None in
    ``partition`` mode).
    """

    mode: str
    cluster_partitions: tuple[str, ...]
    cluster_field: str | None = None
    clustering_key: bool = False     # Milvus 2.4.7+: the field is the collection's clustering key

    def __post_init__(self):
        if self.mode not in MODES:
            raise StorageError(f"unknown storage mode {self.mode!r}; choose one of {MODES}")
        if (self.cluster_field is None) != (self.mode == "partition"):
            raise StorageError(f"storage {self.mode!r} {'needs' if self.mode != 'partition' else 'has no'}"
                               f" cluster field")

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_partitions)

    @property
    def partitions(self) -> list[str]:
        """The distinct partitions the layout's rows live in, in first-use order."""
        return list(dict.fromkeys(self.cluster_partitions))

    @property
    def n_groups(self) -> int:
        return len(self.partitions)

    def search_target(self, clusters: Sequence[int], caller_filter: str = "") -> tuple[list[str] | None, str]:
        """``(partition_names, filter)`` of a search restricted to ``clusters``.

        In ``single`` mode no partition is named (None: the whole collection);
        the caller's filter is kept, parenthesised and combined with ``and``.
        """
        clusters = sorted({int(c) for c in clusters})
        if self.mode == "partition":
            return [self.cluster_partitions[c] for c in clusters], caller_filter or ""
        expr = cluster_filter(self.cluster_field, clusters)
        filt = f"({caller_filter}) and {expr}" if caller_filter and caller_filter.strip() else expr
        if self.mode == "single":
            return None, filt
        return list(dict.fromkeys(self.cluster_partitions[c] for c in clusters)), filt

    def write_partition(self, cluster: int) -> str:
        """The partition a row of ``cluster`` is written to (``""``: the collection's default)."""
        name = self.cluster_partitions[int(cluster)]
        return "" if name == DEFAULT_PARTITION else name

    # every key meta() may write: readers keep the rest of the layout metadata apart from these
    META_KEYS = frozenset({"storage", "cluster_field", "clustering_key", "group_names",
                           "group_of_cluster"})

    def meta(self) -> dict:
        meta = {"storage": self.mode}
        if self.mode != "partition":
            meta["cluster_field"] = self.cluster_field
            meta["clustering_key"] = self.clustering_key
            if self.mode == "grouped":
                groups = self.partitions
                meta["group_names"] = groups
                index = {g: i for i, g in enumerate(groups)}
                meta["group_of_cluster"] = [index[p] for p in self.cluster_partitions]
        return meta

    @classmethod
    def from_meta(cls, meta: dict, cluster_names: Sequence[str]) -> "Storage":
        """Read back from layout metadata; layouts written before storage modes are ``partition``."""
        mode = meta.get("storage", "partition")
        if mode == "partition":
            return cls("partition", tuple(cluster_names))
        field = meta.get("cluster_field") or CLUSTER_FIELD
        key = bool(meta.get("clustering_key", False))
        if mode == "single":
            return cls("single", (DEFAULT_PARTITION,) * len(cluster_names), field, key)
        if mode != "grouped":
            raise StorageError(f"layout metadata names unknown storage mode {mode!r}")
        names, of = meta.get("group_names"), meta.get("group_of_cluster")
        if not names or of is None or len(of) != len(cluster_names) or \
                any(not 0 <= g < len(names) for g in of):
            raise StorageError("grouped layout metadata lacks a valid group_names / group_of_cluster")
        return cls("grouped", tuple(names[g] for g in of), field, key)


def storage_status(storage: Storage) -> dict:
    """What ``status`` and ``router_status()`` report about a layout's storage."""
    return {"mode": storage.mode, "partitions": storage.n_groups, "cluster_field": storage.cluster_field,
            "clustering_key": storage.clustering_key}


def cluster_filter(field: str, clusters: Sequence[int]) -> str:
    """``field in [..]`` over sorted cluster ids (a term filter: measured faster than ranges)."""
    ids = sorted({int(c) for c in clusters})
    return f"{field} in [{', '.join(map(str, ids))}]"


def group_names_for(n_groups: int) -> list[str]:
    """``g000, g001, ...``: group partition names (never a cluster name ``cNNNN``)."""
    width = max(3, len(str(n_groups - 1)))
    return [f"g{i:0{width}d}" for i in range(n_groups)]


def group_clusters(centroids: np.ndarray, n_groups: int, algorithm: str, seed: int = 0) -> np.ndarray:
    """Group index of each cluster: k-means over the centroids, so clusters whose centroids
    are close - the ones a query tends to probe together - share a partition."""
    from .clustering import assign_clusters, fit_centroids
    n = len(centroids)
    if not 1 <= n_groups <= n:
        raise StorageError(f"groups must be in [1, {n}] (the number of clusters), got {n_groups}")
    if n_groups == 1:
        return np.zeros(n, dtype=np.int64)
    groups = fit_centroids(np.asarray(centroids, np.float32), n_groups, algorithm, seed=seed)
    of = assign_clusters(np.asarray(centroids, np.float32), groups, algorithm).astype(np.int64)
    return renumber_by_first_use(of)


def renumber_by_first_use(of: np.ndarray) -> np.ndarray:
    """Group labels (any ints >= 0) renumbered 0, 1, ... in order of each group's first cluster;
    labels no cluster uses disappear."""
    of = np.asarray(of, dtype=np.int64)
    _, first = np.unique(of, return_index=True)
    rank = np.empty(of.max() + 1, dtype=np.int64)
    rank[of[np.sort(first)]] = np.arange(len(first))
    return rank[of]


def default_groups(n_clusters: int) -> int:
    """G for ``grouped`` when none is given: about the cube root of L (8 at L = 512)."""
    return min(n_clusters, max(2, int(round(n_clusters ** (1 / 3)))))


def choose_mode(requested: str, lite: bool) -> str:
    """The storage mode ``auto`` stands for on this backend (see the module docstring)."""
    if requested not in STORAGE_CHOICES:
        raise StorageError(f"unknown storage mode {requested!r}; choose one of {STORAGE_CHOICES}")
    if requested != "auto":
        return requested
    return "partition" if lite else "single"


def make_storage(mode: str, cluster_names: Sequence[str], groups: np.ndarray | None = None,
                 clustering_key: bool = False) -> Storage:
    """A :class:`Storage` for freshly built clusters (``groups``: group index per cluster)."""
    if mode == "partition":
        if clustering_key:
            raise StorageError("clustering_key needs a cluster-id field: use storage 'single' or 'grouped'")
        return Storage("partition", tuple(cluster_names))
    if mode == "single":
        return Storage("single", (DEFAULT_PARTITION,) * len(cluster_names), CLUSTER_FIELD, clustering_key)
    if mode == "grouped":
        if groups is None or len(groups) != len(cluster_names):
            raise StorageError("grouped storage needs a group index for every cluster")
        names = group_names_for(int(np.max(groups)) + 1)
        return Storage("grouped", tuple(names[int(g)] for g in groups), CLUSTER_FIELD, clustering_key)
    raise StorageError(f"unknown storage mode {mode!r}; choose one of {MODES}")


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def server_version(text: str) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` from ``get_server_version()`` text (``v2.3.5``, ``2.5.14-gpu``);
    None for milvus-lite or anything unparseable."""
    if not text or str(text).startswith("milvus_lite"):
        return None
    m = _VERSION.search(str(text))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


CLUSTERING_KEY_MIN_VERSION = (2, 4, 7)


def check_clustering_key_support(version_text: str) -> None:
    """Refuse ``clustering_key`` on servers older than 2.4.7 (no clustering compaction there)."""
    version = server_version(version_text)
    if version is None or version < CLUSTERING_KEY_MIN_VERSION:
        need = ".".join(map(str, CLUSTERING_KEY_MIN_VERSION))
        raise StorageError(f"clustering_key needs Milvus >= {need} (clustering compaction and "
                           f"segment pruning); this server reports {version_text!r}. Build "
                           f"without --clustering-key: rows are written in cluster order anyway")
