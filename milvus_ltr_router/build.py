"""Building a layout: a source collection clustered into a copy stored by cluster.

:func:`build_layout` is the pipeline; each stage is a function of its own:

1. :func:`_plan` - the request checked against the source and the server: rows,
   number of clusters, storage mode, sample size;
2. :func:`_read_source` - every row read from Milvus once, into a local spill
   (:class:`.spill.RowSpill`), drawing the sample for k-means on the way;
3. :func:`_fit_clusters` and :func:`_refine` - k-means on the sample, then Lloyd
   passes over the spill (or the clusters of another layout, reused);
4. :func:`_new_layout` - the :class:`.layout.Layout` (names, storage, ids);
5. :func:`_write_target` - the target collection and its indexes, every row assigned
   to its cluster (each cluster's moments accumulated on the way) and written in cluster
   order, the layout's metadata and moments stored;
6. :func:`_verify` - row counts; then the alias, if asked for, is pointed at the target.
"""
from __future__ import annotations

import logging
import numbers
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from pymilvus import MilvusClient

from .clustering import (assign_balanced, assign_clusters, balanced_capacity, check_algorithm,
                         default_n_clusters, fit_centroids, refine_centroids, resolve_sample_size)
from .costs import resolve_cost_model
from .errors import InputError
from .grouping import StorageChoice, centroid_probes, choose_storage, coprobe_groups
from .columns import Columns, concat_columns, n_rows_of, take_rows
from .labels import check_metric
from .keyed_sampling import keyed_sample
from .layout import (Layout, LayoutError, layout_collection_name, new_layout_id,
                     partition_names_for, point_alias, utc_now, write_layout_meta, write_moments)
from .milvus_io import SERVER_PARTITION_LIMIT, count_rows, is_milvus_lite
from .moments import MomentAccumulator
from .plan import FALLBACK_NPROBE
from .progress import ProgressCounter
from .scan import SCAN_ROWS, iter_columns
from .schema import CollectionInfo, describe
from .spill import ClusterSpill, RowSpill
from .storage import (CLUSTER_FIELD, StorageError, check_clustering_key_support, choose_mode,
                      default_groups, group_clusters, make_storage)
from .switch import set_stamp
from .target import create_target
from .writer import WRITE_BYTES, ParallelWriter, request_rows

log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """What :func:`build_layout` built: the layout (with its clusters' moments), its rows,
    empty clusters and the seconds of each stage."""
    layout: Layout
    rows: int
    empty_partitions: list[str]
    seconds: dict[str, float]        # read / cluster / refine / assign / write / index_load /
                                     # moments / verify
    switch: dict | None = None       # a layout in use replaced (:mod:`.rebuild`): what was done
    storage_choice: StorageChoice | None = None   # ``auto`` / ``grouped`` decided from logged queries

    @property
    def moment_seconds(self) -> float:
        """Seconds of work on the clusters' moments: accumulated as rows are assigned, computed
        as they are written, stored as the target loads (so mostly off the wall clock)."""
        return self.seconds.get("moments", 0.0)

    def rows_per_second(self) -> dict[str, float]:
        """Rows per second of each timed stage."""
        return {k: self.rows / v for k, v in self.seconds.items() if v > 0}


@dataclass
class _Plan:
    """A build request checked against the source and the server."""
    source: str                      # as asked (maybe an alias)
    target: str
    info: CollectionInfo             # schema facts of what is read (aliases resolved; a live
                                     # layout's without its cluster field)
    metric: str
    algorithm: str
    mode: str                        # storage mode
    lite: bool
    n_rows: int
    n_clusters: int
    sample_size: int | None          # rows sampled for k-means (None: clusters reused)
    refine_passes: int               # Lloyd passes over the whole source (0 when reused)
    clusters_from: Layout | None
    live: str | None = None          # the laid-out collection read instead of the source
    storage_asked: str = ""          # the storage mode asked for (``auto`` before resolving)


def build_layout(client: MilvusClient, source: str, target: str, n_clusters: int | None = None,
                 algorithm: str = "spherical", sample_size: int | None = None, seed: int = 0,
                 metric: str | None = None, vector_field: str | None = None,
                 index: dict | None = None, alias: str | None = None, overwrite: bool = False,
                 batch_size: int = SCAN_ROWS, max_partitions: int | None = None,
                 max_iter: int = 10, storage: str = "auto", groups: int | None = None,
                 clustering_key: bool = False, clusters_from: Layout | None = None,
                 spill_dir: str | None = None, refine_passes: int = 0,
                 max_cluster_ratio: float | None = None, readers: int = 2,
                 writers: int = 2, request_bytes: int = WRITE_BYTES, from_source: bool = False,
                 switch_grace: float = 0.5, queries: np.ndarray | None = None,
                 probe_nprobe: int = FALLBACK_NPROBE, cost_model=None) -> BuildReport:
    """Cluster ``source`` into a new collection ``target`` stored by cluster, and store its layout.

    The source is read once, column-wise with ``readers`` requests of about
    ``batch_size`` rows in flight, into a local spill (``spill_dir``, about the
    collection's size on disk) while a reservoir sample for k-means is drawn;
    it is never modified. Rows are written back with ``writers`` insert
    requests of about ``request_bytes`` in flight. ``n_clusters`` defaults to
    round(sqrt(N)) (clipped to the server's partition limit in ``partition``
    storage). ``sample_size`` is a row count, ``"NNNx"`` (rows per cluster) or
    ``"all"`` (default: :func:`.clustering.resolve_sample_size`);
    ``refine_passes`` Lloyd passes over the whole source follow (streamed, sums
    per cluster, never all rows in memory); ``max_cluster_ratio`` bounds every
    cluster at that multiple of the mean size when rows are assigned. ``storage``
    is ``auto``, ``partition``, ``grouped`` (``groups`` partitions) or
    ``single`` (see :mod:`.storage`); rows are written in cluster order, so
    each cluster's rows sit together in its segments. ``clusters_from`` reuses
    another layout's clusters (same centroids, same routers: e.g. to move a
    layout to another storage mode without retraining). ``alias``, when given,
    is pointed at the new collection once it is verified, so applications
    switch atomically.

    ``queries`` (sampled logged query vectors, e.g. :func:`.querylog.sample_queries`) let
    the build decide from real traffic: each is routed over the new clusters (its top
    ``probe_nprobe`` centroids), ``grouped`` storage then groups clusters probed together
    (:func:`.grouping.coprobe_groups`) rather than by centroid geometry, and ``auto`` on a
    server picks ``single`` or ``grouped`` by the ``cost_model`` (:func:`.grouping.choose_storage`;
    a :class:`.costs.CostModel`, its JSON path, or None for the default). ``report.storage_choice``
    says what was decided and the predicted costs. Without queries ``auto`` is ``single`` on a
    server.

    Replacing a layout in use (``overwrite`` of a laid-out ``target``, or an ``alias`` that
    names a laid-out collection now) reads that collection rather than the source (it holds
    what applications wrote through the routed client; ``from_source=True`` reads the
    source), builds under another name and switches only once the new collection is
    verified and caught up: see :mod:`.rebuild`. ``report.switch`` says what it did.
    """
    from .rebuild import live_collection, replace_layout, staging_name
    live = None if from_source else live_collection(client, target, alias, overwrite)
    plan = _plan(client, source, target, n_clusters=n_clusters, algorithm=algorithm,
                 sample_size=sample_size, metric=metric, vector_field=vector_field,
                 overwrite=overwrite, max_partitions=max_partitions, storage=storage,
                 clustering_key=clustering_key, clusters_from=clusters_from,
                 refine_passes=refine_passes, max_cluster_ratio=max_cluster_ratio, live=live)
    build_name = staging_name(client, target) if client.has_collection(target) else target
    traffic = _Traffic.of(queries, probe_nprobe, cost_model, plan.info.dim) \
        if decides_from_traffic(plan.storage_asked, plan.lite) else None

    def build() -> BuildReport:
        return _build(client, plan, build_name, seed=seed, max_iter=max_iter, groups=groups,
                      clustering_key=clustering_key, index=index, spill_dir=spill_dir,
                      max_cluster_ratio=max_cluster_ratio, batch_size=batch_size, readers=readers,
                      writers=writers, request_bytes=request_bytes, traffic=traffic)

    if live is None and build_name == target:
        report = build()
        set_stamp(client, target, layout_id=report.layout.layout_id)
        if alias:
            point_alias(client, alias, target)
        return report
    key_type = next(f["type"] for f in plan.info.fields if f["name"] == plan.info.primary_field)
    return replace_layout(client, target=target, build_name=build_name, live=live, alias=alias,
                          overwrite=overwrite, build=build, key_type=key_type,
                          grace=switch_grace)


def _build(client: MilvusClient, plan: _Plan, name: str, *, seed: int, max_iter: int,
           groups: int | None, clustering_key: bool, index: dict | None, spill_dir: str | None,
           max_cluster_ratio: float | None, batch_size: int, readers: int, writers: int,
           request_bytes: int, traffic: "_Traffic | None" = None) -> BuildReport:
    """The pipeline (stages 2-6) writing the layout into the new collection ``name``."""
    seconds: dict[str, float] = {}
    spill = RowSpill(spill_dir)
    try:
        sample = _read_source(client, plan, spill, batch_size, readers, seed, seconds)
        centroids, names, clustering_id = _fit_clusters(plan, sample, seed, max_iter, seconds)
        if traffic is None:
            del sample              # up to every vector of the source: freed before the passes
        centroids = _refine(plan, spill, centroids, seconds)
        choice = None
        if traffic is not None:
            choice = _storage_from_traffic(plan, traffic, centroids, sample, groups)
            del sample
        layout = _new_layout(name, plan, centroids, names, clustering_id, groups, seed,
                             clustering_key, choice)
        try:
            seconds.update(_write_target(client, plan, layout, spill, name != plan.target, index,
                                         spill_dir, max_cluster_ratio, writers, request_bytes))
            t0 = time.perf_counter()
            empty = _verify(client, layout, plan.n_rows)
            seconds["verify"] = time.perf_counter() - t0
        except Exception as exc:
            raise LayoutError(
                f"building layout {name!r} failed: {exc}. The source {plan.source!r} is untouched; "
                f"remove the partial collection with: milvus-ltr-router drop-layout --collection "
                f"{name} (drops {name!r} and {layout_collection_name(name)!r})") from exc
        log.info("layout %s: %d rows in %d clusters of %r, storage %s (%d partitions, %d empty clusters)",
                 layout.layout_id, plan.n_rows, plan.n_clusters, name, plan.mode,
                 layout.storage.n_groups, len(empty))
        return BuildReport(layout=layout, rows=plan.n_rows, empty_partitions=empty, seconds=seconds,
                           storage_choice=choice)
    finally:
        spill.close()


# --------------------------------------------------------------------------- 1. plan
def _plan(client: MilvusClient, source: str, target: str, *, n_clusters: int | None,
          algorithm: str, sample_size, metric: str | None, vector_field: str | None,
          overwrite: bool, max_partitions: int | None, storage: str, clustering_key: bool,
          clusters_from: Layout | None, refine_passes: int,
          max_cluster_ratio: float | None, live: str | None = None) -> _Plan:
    """Every check that can fail before a row is read, in the order a user meets them."""
    algorithm = check_algorithm(algorithm)
    info = describe(client, source, vector_field)
    if source == target or info.name == target:
        raise LayoutError("target must differ from source: the source is never modified")
    if live is not None:            # a rebuild reads the layout in use, not the source
        info = describe(client, live, vector_field)
        info.fields = [f for f in info.fields if f["name"] != CLUSTER_FIELD]
    metric = check_metric(metric or info.metric or "IP")
    if client.has_collection(target) and not overwrite:
        raise LayoutError(f"target collection {target!r} already exists; choose another name or "
                          f"pass overwrite=True (--overwrite) to replace it")
    lite = is_milvus_lite(client)
    mode = _storage_mode(client, storage, lite, clustering_key)
    if CLUSTER_FIELD in info.field_names:
        raise LayoutError(f"source {source!r} already has a field {CLUSTER_FIELD!r}: is it a "
                          f"laid-out collection? Build from the original source")
    client.load_collection(info.name)
    n_rows = count_rows(client, info.name)
    if n_rows == 0:
        raise LayoutError(f"source collection {source!r} is empty")
    if clusters_from is not None:
        if clusters_from.dim != info.dim:
            raise LayoutError(f"clusters_from has dim {clusters_from.dim}, the source {info.dim}")
        n_clusters, algorithm = clusters_from.n_clusters, clusters_from.algorithm
    n_clusters = _n_clusters(n_rows, n_clusters, mode, lite, max_partitions)
    if n_rows < n_clusters:
        raise LayoutError(f"source has {n_rows} rows, fewer than the {n_clusters} clusters asked for")
    if max_cluster_ratio is not None and not max_cluster_ratio >= 1.0:
        raise LayoutError(f"max_cluster_ratio must be >= 1 (a multiple of the mean cluster size), "
                          f"got {max_cluster_ratio}")
    if refine_passes < 0:
        raise LayoutError(f"refine_passes must be >= 0, got {refine_passes}")
    if clusters_from is None:
        try:
            sample_size = resolve_sample_size(sample_size, n_rows, n_clusters, dim=info.dim)
        except ValueError as exc:
            raise LayoutError(f"sample size: {exc}") from exc
    else:
        sample_size, refine_passes = None, 0
    return _Plan(source=source, target=target, info=info, metric=metric, algorithm=algorithm,
                 mode=mode, lite=lite, n_rows=n_rows, n_clusters=n_clusters,
                 sample_size=sample_size, refine_passes=refine_passes, clusters_from=clusters_from,
                 live=live, storage_asked=storage)


def _storage_mode(client: MilvusClient, storage: str, lite: bool, clustering_key: bool) -> str:
    """The storage mode asked for (``auto`` resolved), checked against the server."""
    try:
        mode = choose_mode(storage, lite)
        if clustering_key:
            if mode == "partition":
                raise StorageError("clustering_key needs a cluster-id field: use storage 'single' "
                                   "or 'grouped'")
            check_clustering_key_support(str(client.get_server_version()))
    except StorageError as exc:
        raise LayoutError(str(exc)) from exc
    return mode


def _n_clusters(n_rows: int, n_clusters: int | None, mode: str, lite: bool,
                max_partitions: int | None) -> int:
    """The number of clusters: asked for, or round(sqrt(N)) within the partition limit."""
    limit = None
    if mode == "partition":
        limit = max_partitions or (None if lite else SERVER_PARTITION_LIMIT)
    if n_clusters is None:
        n_clusters = default_n_clusters(n_rows)
        if limit is not None:
            n_clusters = min(n_clusters, limit - 1)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if limit is not None and n_clusters > limit - 1:
        raise LayoutError(f"{n_clusters} clusters need {n_clusters + 1} partitions (with _default) "
                          f"but the server allows {limit} (rootCoord.maxPartitionNum, default 1024); "
                          f"raise rootCoord.maxPartitionNum on the server and pass max_partitions / "
                          f"--max-partitions, use fewer clusters, or a storage mode with a cluster-id "
                          f"field (--storage single)")
    return n_clusters


# --------------------------------------------------------------------------- 2. read
def _read_source(client: MilvusClient, plan: _Plan, spill: RowSpill, batch_size: int, readers: int,
                 seed: int, seconds: dict[str, float]) -> np.ndarray | None:
    """Every row of the source into ``spill``, read once; the sample for k-means on the way
    (None when the clusters are reused)."""
    info = plan.info
    t0 = time.perf_counter()
    out_fields = info.field_names + (["*"] if info.enable_dynamic_field else [])

    seen: set | None = set() if plan.live is not None else None

    def read(bar):
        for cols in iter_columns(client, info.name, out_fields, batch_size, readers=readers):
            keys = np.asarray(cols[info.primary_field])
            if seen is not None:    # a layout in use moves upserted rows while it is read
                fresh = [i for i, k in enumerate(keys.tolist()) if k not in seen]
                seen.update(keys.tolist())
                if len(fresh) < len(keys):
                    cols = take_rows(cols, np.asarray(fresh, dtype=np.int64))
                    keys = keys[fresh]
            spill.add(cols)
            bar.update(n_rows_of(cols))
            yield keys, cols[info.vector_field]

    sample = None
    with ProgressCounter(plan.n_rows, "read", "rows") as bar:
        if plan.clusters_from is None:
            # by key, not by read order: one seed on the same rows gives the same sample
            sample = keyed_sample(read(bar), plan.sample_size, seed)
        else:
            for _ in read(bar):
                pass
    seconds["read"] = time.perf_counter() - t0
    if plan.live is not None:       # written while read: the catch-up brings the rest
        plan.n_rows = spill.rows
    elif spill.rows != plan.n_rows:
        raise LayoutError(f"read {spill.rows} rows of {plan.source!r} but it holds {plan.n_rows}: is "
                          f"it being written to? Build from a collection nobody writes")
    return sample


# --------------------------------------------------------------------------- 3. cluster
def _fit_clusters(plan: _Plan, sample: np.ndarray | None, seed: int, max_iter: int,
                  seconds: dict[str, float]) -> tuple[np.ndarray, list[str], str]:
    """Centroids, cluster names and clustering id: k-means on the sample, or the clusters
    of ``plan.clusters_from`` (the same ones, so its routers still apply)."""
    if plan.clusters_from is not None:
        reused = plan.clusters_from
        return reused.centroids.copy(), list(reused.partition_names), reused.clustering_id
    t0 = time.perf_counter()
    log.info("clustering %d sampled rows into %d clusters (%s)", len(sample), plan.n_clusters,
             plan.algorithm)
    centroids = fit_centroids(sample, plan.n_clusters, plan.algorithm, seed=seed, max_iter=max_iter)
    seconds["cluster"] = time.perf_counter() - t0
    return centroids, partition_names_for(plan.n_clusters), ""


def _refine(plan: _Plan, spill: RowSpill, centroids: np.ndarray,
            seconds: dict[str, float]) -> np.ndarray:
    """``plan.refine_passes`` Lloyd passes over every spilled row (streamed)."""
    if not plan.refine_passes:
        return centroids
    t0 = time.perf_counter()
    with ProgressCounter(plan.n_rows * plan.refine_passes, "refine", "rows") as bar:
        centroids = refine_centroids(lambda: _spilled_vectors(spill, plan.info.vector_field, bar),
                                     centroids, plan.algorithm, passes=plan.refine_passes)
    seconds["refine"] = time.perf_counter() - t0
    return centroids


def _spilled_vectors(spill: RowSpill, vector_field: str, bar: ProgressCounter) -> Iterator[np.ndarray]:
    for cols in spill.batches():
        bar.update(n_rows_of(cols))
        yield cols[vector_field]


# --------------------------------------------------------------------------- 4. the layout
def decides_from_traffic(storage: str, lite: bool) -> bool:
    """Whether logged queries decide anything for this storage mode: the groups of
    ``grouped``, and ``auto``'s choice on a server (on milvus-lite ``auto`` is ``partition``)."""
    return storage == "grouped" or (storage == "auto" and not lite)


@dataclass(frozen=True)
class _Traffic:
    """Logged queries a build decides storage and groups from (see :func:`build_layout`)."""
    queries: np.ndarray
    nprobe: int
    cost_model: object

    @classmethod
    def of(cls, queries, nprobe: int, cost_model, dim: int) -> "_Traffic | None":
        if queries is None:
            return None
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != dim:
            raise LayoutError(f"queries must be [n, {dim}] vectors of the collection's dimension, "
                              f"got shape {q.shape} (a query log of another embedding? "
                              f"build-layout --no-query-log ignores it)")
        q = q[np.isfinite(q).all(axis=1)]
        if not len(q):
            return None
        if isinstance(nprobe, bool) or not isinstance(nprobe, numbers.Integral) or nprobe < 1:
            raise LayoutError(f"probe_nprobe must be a positive int, got {nprobe!r}")
        try:
            model = resolve_cost_model(cost_model)
        except InputError as exc:
            raise LayoutError(str(exc)) from exc
        return cls(q, int(nprobe), model)


def _storage_from_traffic(plan: _Plan, traffic: _Traffic, centroids: np.ndarray,
                          sample: np.ndarray | None, groups: int | None) -> StorageChoice:
    """The storage mode and groups the logged queries' co-probes call for (only asked where
    :func:`decides_from_traffic`): ``auto`` on a server chooses by the cost model, ``grouped``
    groups by co-probes."""
    auto = plan.storage_asked == "auto"
    if sample is not None and len(sample):
        labels = assign_clusters(sample, centroids, plan.algorithm)
        sizes = np.bincount(labels, minlength=plan.n_clusters) * (plan.n_rows / len(sample))
    else:                           # clusters reused: their sizes
        sizes = np.asarray(plan.clusters_from.sizes, dtype=np.float64)
    probed = centroid_probes(traffic.queries, centroids, plan.metric, traffic.nprobe)
    if auto:
        choice = choose_storage(probed, sizes, traffic.cost_model, dim=plan.info.dim,
                                candidates=[min(groups, plan.n_clusters)] if groups else None)
    else:
        G = groups or default_groups(plan.n_clusters)
        choice = StorageChoice("grouped", coprobe_groups(probed, sizes, min(G, plan.n_clusters)),
                               queries=len(probed))
    plan.mode = choice.mode
    log.info("%s", choice.summary())
    return choice


def _new_layout(target: str, plan: _Plan, centroids: np.ndarray, names: list[str],
                clustering_id: str, groups: int | None, seed: int, clustering_key: bool,
                choice: StorageChoice | None = None) -> Layout:
    """The layout of ``target`` before any row is written (sizes zero: assignment counts them)."""
    group_of = None
    if choice is not None and choice.group_of_cluster is not None:
        group_of = choice.group_of_cluster
    elif plan.mode == "grouped":
        n_groups = groups or default_groups(plan.n_clusters)
        try:
            group_of = group_clusters(centroids, n_groups, plan.algorithm, seed=seed)
        except StorageError as exc:
            raise LayoutError(str(exc)) from exc
    info = plan.info
    return Layout(collection=target, centroids=centroids, partition_names=names,
                  sizes=np.zeros(plan.n_clusters, dtype=np.int64), metric=plan.metric,
                  algorithm=plan.algorithm, dim=info.dim, layout_id=new_layout_id(),
                  vector_field=info.vector_field, primary_field=info.primary_field, seed=seed,
                  created_at=utc_now(), source=info.name,
                  storage=make_storage(plan.mode, names, group_of, clustering_key),
                  clustering_id=clustering_id)


# --------------------------------------------------------------------------- 5. write
def _write_target(client: MilvusClient, plan: _Plan, layout: Layout, source: RowSpill,
                  overwrite: bool, index: dict | None, spill_dir: str | None,
                  max_cluster_ratio: float | None, writers: int,
                  request_bytes: int) -> dict[str, float]:
    """The target with its rows in cluster order, the layout's metadata and its clusters'
    moments (from the rows as they are assigned); seconds taken."""
    capacity = None if max_cluster_ratio is None else \
        balanced_capacity(plan.n_rows, plan.n_clusters, max_cluster_ratio)
    if capacity is not None:
        layout.extra["max_cluster_ratio"] = max_cluster_ratio
    create_target(client, plan.info, layout, overwrite, index, plan.lite)
    t0 = time.perf_counter()
    spill = ClusterSpill(layout.n_clusters, source.rows, spill_dir)
    moments = MomentAccumulator.for_centroids(layout.centroids)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltr-moments") as pool:
        try:
            moment_s = _assign_rows(layout, source, spill, plan.info.vector_field, capacity, moments)
            assign_s = time.perf_counter() - t0 - moment_s
            computed = pool.submit(_timed, moments.result)    # while the rows are written
            t0 = time.perf_counter()
            _write_rows(client, layout, spill, source.rows, writers, request_bytes)
        finally:
            spill.close()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        moment_s += _store_and_load(client, layout, computed)
    return {"assign": assign_s, "write": write_s, "index_load": time.perf_counter() - t0,
            "moments": moment_s}


def _assign_rows(layout: Layout, source: RowSpill, spill: ClusterSpill, vector_field: str,
                 capacity: int | None, moments: MomentAccumulator) -> float:
    """Every spilled row to its cluster (with room, under ``capacity``), bucketed in ``spill``
    and fed to ``moments``; ``layout.sizes`` counts them. Returns the seconds ``moments`` took."""
    moment_s = 0.0
    with ProgressCounter(source.rows, "assign", "rows") as bar:
        for cols in source.batches():
            # sizes are updated by the assignment (balanced: best cluster with room)
            cluster = assign_balanced(cols[vector_field], layout.centroids,
                                      layout.algorithm, capacity, layout.sizes)
            spill.add(cols, cluster)
            t0 = time.perf_counter()
            moments.update(cols[vector_field], cluster)
            moment_s += time.perf_counter() - t0
            bar.update(n_rows_of(cols))
    return moment_s


def _write_rows(client: MilvusClient, layout: Layout, spill: ClusterSpill, n_rows: int,
                writers: int, request_bytes: int) -> None:
    """The rows of ``spill`` into the target in cluster order, ``writers`` requests in flight."""
    target, storage = layout.collection, layout.storage
    # a partition's rows are sent once a request's worth is pending or its last cluster
    # has come, so memory holds about one request per partition still being written
    last_cluster = {storage.write_partition(c): c for c in range(layout.n_clusters)}
    with ProgressCounter(n_rows, "write", "rows") as bar, \
            ParallelWriter(client, target, writers, request_bytes, bar.update) as writer:
        pending: dict[str, list[Columns]] = {}
        pending_rows: dict[str, int] = {}
        step = None
        for cluster, cols in spill.sorted_runs():
            if storage.cluster_field is not None:
                cols[storage.cluster_field] = np.full(n_rows_of(cols), cluster, dtype=np.int64)
            step = step or request_rows(cols, request_bytes)
            part = storage.write_partition(cluster)
            pending.setdefault(part, []).append(cols)
            pending_rows[part] = pending_rows.get(part, 0) + n_rows_of(cols)
            if pending_rows[part] >= step or last_cluster[part] == cluster:
                writer.submit(concat_columns(pending.pop(part)), part)
                pending_rows[part] = 0
        for part, bufs in pending.items():      # partitions whose last clusters were empty
            if bufs:
                writer.submit(concat_columns(bufs), part)
    if writer.rows_written != n_rows:
        raise LayoutError(f"wrote {writer.rows_written} rows, expected {n_rows}")


def _timed(fn):
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def _store_and_load(client: MilvusClient, layout: Layout, computed: Future) -> float:
    """The layout's metadata and its moments (``computed``: ``(moments, seconds)``) stored
    while the target flushes and loads; returns the seconds the moments took."""
    target, t0 = layout.collection, time.perf_counter()

    def store_moments() -> float:
        moments, seconds = computed.result()
        m0 = time.perf_counter()
        write_moments(client, layout, moments)
        return seconds + time.perf_counter() - m0

    # every row is written and the sizes are final: the two small collections are written
    # (create, insert, flush, load: seconds of server waits each) while the target flushes
    # and loads
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ltr-meta") as pool:
        meta = pool.submit(write_layout_meta, client, layout)
        stored = pool.submit(store_moments)
        client.flush(target)
        flush_s = time.perf_counter() - t0
        client.load_collection(target)
        if layout.storage.clustering_key:
            client.compact(target, is_clustering=True)
        meta.result()
        moment_s = stored.result()
    log.info("target %r: flush %.1f s, index and load %.1f s (moments %.1f s beside them)", target,
             flush_s, time.perf_counter() - t0 - flush_s, moment_s)
    return moment_s


# --------------------------------------------------------------------------- 6. verify
def _verify(client: MilvusClient, layout: Layout, n_rows: int) -> list[str]:
    """The target holds every source row, each assigned once; the empty clusters' names."""
    got = count_rows(client, layout.collection)
    if got != n_rows:
        raise LayoutError(f"target holds {got} rows but the source has {n_rows}")
    if int(layout.sizes.sum()) != n_rows:
        raise LayoutError(f"assigned {int(layout.sizes.sum())} rows but the source has {n_rows}")
    empty = [p for p, s in zip(layout.partition_names, layout.sizes) if s == 0]
    if empty:
        log.warning("%d of %d partitions are empty: %s", len(empty), layout.n_partitions, empty[:10])
    return empty
