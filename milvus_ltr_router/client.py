"""``RoutedMilvusClient``: pymilvus's ``MilvusClient`` with learned partition routing.

Switching is one line: ``MilvusClient(uri=...)`` -> ``RoutedMilvusClient(uri=...)``.
For a collection with a layout, :meth:`search` routes every query to its best
``nprobe`` partitions and searches only those; :meth:`insert` and
:meth:`upsert` put each row in the partition of its cluster. Every other
method, and every collection without a layout, behaves exactly as in pymilvus.

A thin shell: the decisions are the routing core's (:mod:`.plan` for searches,
:mod:`.placement` for writes), what serves each collection is kept by
:mod:`.serving` and routed writes are performed by :mod:`.writes`.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pymilvus import MilvusClient

from .batching import BatchPlan, CostModel, StorageFacts, max_queries_for, plan_batches, \
    resolve_cost_model
from .deprecation import moved_names
from .layout import Layout, live_sizes
from .milvus_io import is_milvus_lite
from .plan import SearchPlan, default_nprobe, group_by_clusters, merge, plan_search, \
    probe_clusters, search_is_routable, searches_layout_field
from .querylog import QueryLogger
from .registry import ModelRegistry
from .router import BaseRouter
from .serving import RoutedParamError, Routing, RoutingTable, routing_status, search_queries
from .writes import RoutedDataError, RoutedWrites, WriteError

__all__ = ["RoutedMilvusClient", "RoutedParamError", "RoutedDataError", "WriteError"]

log = logging.getLogger(__name__)


class RoutedMilvusClient(MilvusClient):
    """A drop-in ``MilvusClient`` that routes searches to the partitions a router picks.

    Extra keyword arguments (all optional): ``model_dir`` where routers are
    published, ``nprobe`` default partitions per query (else the router's own
    default, else 8), ``log_rate`` fraction of search vectors written to the
    query log (0 disables), ``log_ttl_seconds``, ``reload_interval`` seconds
    between checks for a newly published router, ``max_workers`` concurrent
    partition-restricted searches, ``log_queue_size``, ``router_threads``,
    ``size_refresh_interval`` seconds between re-reads of the cluster sizes that
    routed writes into a size-bounded layout go by (default: ``reload_interval``;
    see :meth:`insert`); ``batch_planning`` (default True) lets queries of one search whose
    clusters overlap share a request (see :meth:`search`) under ``cost_model`` (a
    :class:`.costs.CostModel`, the path of its JSON - ``benchmarks/bench_costs.py``
    writes one for your server - or None: the model measured on Milvus 2.3.5).
    """

    def __init__(self, uri: str = "http://localhost:19530", user: str = "", password: str = "",
                 db_name: str = "", token: str = "", timeout: float | None = None, *,
                 model_dir: str = "onnx_models", nprobe: int | None = None, log_rate: float = 0.01,
                 log_ttl_seconds: int | None = None, reload_interval: float = 10.0,
                 max_workers: int = 8, log_queue_size: int = 1000, router_threads: int = 1,
                 seed: int | None = None, size_refresh_interval: float | None = None,
                 batch_planning: bool = True, cost_model: CostModel | str | None = None, **kwargs):
        super().__init__(uri=uri, user=user, password=password, db_name=db_name, token=token,
                         timeout=timeout, **kwargs)
        if not 0.0 <= log_rate <= 1.0:
            raise ValueError(f"log_rate must be in [0, 1], got {log_rate}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.nprobe = nprobe
        self.log_rate = log_rate
        self.batch_planning = bool(batch_planning)
        self.cost_model = resolve_cost_model(cost_model)
        self._facts: dict[str, tuple[str, StorageFacts, float]] = {}  # collection -> (layout id, facts, read at)
        self._facts_reading: set[str] = set()
        self._stats_lock = threading.Lock()      # held for counter updates only, never across I/O
        self._plan_totals: dict[str, dict] = {}
        self._last = threading.local()
        self._rng = np.random.default_rng(seed)
        self._lite: bool | None = None
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ltr-search")
        self._routing = RoutingTable(self, ModelRegistry(model_dir), reload_interval, router_threads)
        self._writes = RoutedWrites(self, submit=self._pool.submit, is_lite=self._is_lite,
                                    refresh_interval=reload_interval if size_refresh_interval is None
                                    else size_refresh_interval)
        self._logger = QueryLogger(self, max_queue=log_queue_size, ttl_seconds=log_ttl_seconds) \
            if log_rate > 0 else None

    # the settings of the parts, under the names they always had
    registry = property(lambda self: self._routing.registry)
    router_threads = property(lambda self: self._routing.router_threads)

    @property
    def reload_interval(self) -> float:
        return self._routing.reload_interval

    @reload_interval.setter
    def reload_interval(self, value: float) -> None:
        self._routing.reload_interval = value

    @property
    def size_refresh_interval(self) -> float:
        return self._writes.refresh_interval

    @size_refresh_interval.setter
    def size_refresh_interval(self, value: float) -> None:
        self._writes.refresh_interval = value

    # ------------------------------------------------------------------ routing state
    def reload_router(self, collection_name: str) -> dict:
        """Re-read the layout and the published router now instead of at the next interval;
        for a size-bounded layout also the live cluster sizes that routed writes go by."""
        self._routing.forget(collection_name)
        state = self._routing.state(collection_name)
        if state is not None:
            self._writes.read_sizes(state.layout)
        return self.router_status(collection_name)

    def router_status(self, collection_name: str) -> dict:
        """How ``collection_name`` is routed: ``learned``, ``centroid`` (fallback) or ``none``;
        ``adaptive`` says whether ``recall_target`` is calibrated (None: served as fixed nprobe);
        ``rows_outside_layout`` counts rows written around the layout (searched until
        ``repair-layout`` moves them; -1: could not be counted); ``balance`` is the size bound
        routed writes keep (None: the layout has none; see :meth:`insert`); ``failures``
        counts consecutive failed reads of the model dir or router (with ``error`` the last
        reason) and ``next_check_s`` is how long until it is read again (None: no error);
        ``batches`` sums this client's routed searches of the collection so far (see
        :meth:`search` and :attr:`last_plan`): ``searches``, ``queries``, ``requests`` sent,
        ``requests_per_search``, ``extra_clusters_per_query`` (clusters scanned beyond a query's
        own because it shared a request), ``planned`` (searches the batch planner split)."""
        state = self._routing.state(collection_name)
        stats = vars(self._logger.stats).copy() if self._logger else {}
        if state is None:
            return {"collection": collection_name, "mode": "none", "query_log": stats}
        status = routing_status(state, nprobe=self._default_nprobe(state),
                                balance=self._writes.balance_status(state.layout),
                                rows_outside_layout=self._routing.stray_count(state), query_log=stats)
        status["batches"] = self.plan_totals(state.layout.collection)
        return status

    def plan_totals(self, collection_name: str) -> dict:
        """This client's routed searches of ``collection_name`` (the laid-out collection's
        name) so far: what ``router_status()`` reports under ``batches``."""
        with self._stats_lock:
            t = dict(self._plan_totals.get(collection_name) or
                     {"searches": 0, "planned": 0, "queries": 0, "requests": 0, "extra_clusters": 0})
        t["requests_per_search"] = t["requests"] / t["searches"] if t["searches"] else None
        t["extra_clusters_per_query"] = t.pop("extra_clusters") / t["queries"] if t["queries"] else None
        t.update(batch_planning=self.batch_planning, cost_model=self.cost_model.source)
        return t

    @property
    def last_plan(self) -> dict | None:
        """How this thread's last routed search was sent (None: none yet): ``queries``,
        ``requests``, ``planned`` (True: the batch planner split it), and from the planner
        ``distinct_sets``, ``extra_clusters`` (per query: clusters scanned beyond its own; 0:
        its hits are exactly its own routed search's), their ``mean_extra_clusters`` and
        ``max_extra_clusters``, ``extra_rows_share`` (rows scanned beyond the queries' own, as
        a share of them), ``predicted_ms`` (the cost model's server time, requests in series)
        against ``per_set_ms`` (one request per distinct cluster set) and ``per_query_ms``."""
        return getattr(self._last, "plan", None)

    def _default_nprobe(self, state: Routing) -> int:
        return default_nprobe(self.nprobe, state.router, state.layout.n_partitions)

    def _is_lite(self) -> bool:
        """milvus-lite (asked once): its upsert and delete act on every partition."""
        if self._lite is None:
            self._lite = is_milvus_lite(self)
        return self._lite

    # ------------------------------------------------------------------ routing
    def router(self, collection_name: str) -> BaseRouter | None:
        """The router serving ``collection_name`` now (learned, or the centroid fallback);
        None when the collection has no layout."""
        state = self._routing.state(collection_name)
        return None if state is None else state.router

    def layout(self, collection_name: str) -> Layout | None:
        """The layout ``collection_name`` (or the collection an alias names) is routed by."""
        state = self._routing.state(collection_name)
        return None if state is None else state.layout

    def route(self, collection_name: str, data, *, nprobe: int | None = None,
              recall_target: float | None = None, min_nprobe: int = 1,
              max_nprobe: int | None = None) -> list[list[int]]:
        """The clusters a routed search of ``data`` probes, per query, best first.

        Cluster indices into ``layout(collection_name).partition_names``; what
        :meth:`search` would search with the same arguments (nothing is searched
        or logged). Raises ``ValueError`` for a collection without a layout.
        """
        state = self._routing.state(collection_name)
        if state is None:
            raise ValueError(f"collection {collection_name!r} has no layout; nothing to route")
        queries = search_queries(state, data, one_vector_ok=True)
        return [row.tolist() for row in self._probe(state, queries, nprobe, recall_target,
                                                    min_nprobe, max_nprobe)]

    def _probe(self, state: Routing, queries: np.ndarray, nprobe, recall_target, min_nprobe,
               max_nprobe):
        return probe_clusters(state.router, queries, self._default_nprobe(state), nprobe,
                              recall_target, min_nprobe, max_nprobe, state.layout.collection)

    # ------------------------------------------------------------------ search
    def search(self, collection_name: str, data=None, filter: str = "", limit: int = 10,
               output_fields=None, search_params=None, timeout=None, partition_names=None,
               anns_field=None, *args, nprobe: int | None = None, recall_target: float | None = None,
               min_nprobe: int = 1, max_nprobe: int | None = None, **kwargs):
        """``MilvusClient.search``, restricted per query to the clusters the router picks.

        ``nprobe`` fixes the clusters per query; ``recall_target`` (e.g. 0.95)
        instead probes, per query, the clusters whose predicted share of its
        neighbours reaches the threshold that met that recall@k on held-out
        queries at retrain time, between ``min_nprobe`` and ``max_nprobe``.
        How the clusters are named to Milvus (partitions, a cluster-id filter
        combined with ``filter`` by ``and``) follows the layout's storage mode.

        A batch (several vectors in ``data``) is split into requests by the batch planner
        (:func:`.batching.plan_batches`; ``batch_planning=False``: one request per distinct
        cluster set): queries whose clusters overlap share one request naming the union of
        their clusters where the cost model says that is cheaper, so such a query gets the
        best ``limit`` hits of a superset of its own clusters (recall can only rise), and a
        query whose request adds no cluster gets exactly its own routed answer.
        :attr:`last_plan` says how the last search was split.

        Passes through untouched when the collection has no layout, when the
        caller names ``partition_names`` or another ``anns_field``, searches by
        ``ids``, or passes pymilvus's later parameters positionally (``ranker``, ...).
        The plugin's own parameters are keyword-only.
        """
        state = None
        if search_is_routable(data, partition_names, kwargs.get("ids"), args):
            state = self._routing.state(collection_name)
        if state is not None and not searches_layout_field(anns_field, state.layout):
            state = None
        if state is None:
            return super().search(collection_name, data, filter, limit, output_fields, search_params,
                                  timeout, partition_names, anns_field, *args, **kwargs)
        queries = search_queries(state, data)
        probed = self._probe(state, queries, nprobe, recall_target, min_nprobe, max_nprobe)
        self._log_queries(state.layout.collection, queries)
        plan = self._plan(state, probed, filter, limit)
        sup = super()

        def run(request):
            return sup.search(collection_name, data=request.take(queries).tolist(),
                              filter=request.filter, limit=limit, output_fields=output_fields,
                              search_params=search_params, timeout=timeout,
                              partition_names=request.partition_names, anns_field=anns_field,
                              **kwargs)

        requests = plan.requests
        if len(requests) == 1:
            return merge(plan, [run(requests[0])])
        # the first request on this thread, the others on the pool: one thread hand-off fewer,
        # and a search always progresses even while the pool is busy with other callers'
        futures = [self._pool.submit(run, r) for r in requests[1:]]
        try:
            first = run(requests[0])
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return merge(plan, [first] + [f.result() for f in futures])

    # ------------------------------------------------------------------ batch planning
    def _plan(self, state: Routing, probed, caller_filter: str, limit: int) -> SearchPlan:
        """The requests of one routed search: queries probing the same clusters share one;
        with ``batch_planning`` a batch is split by :func:`.batching.plan_batches` under the
        cost model (queries with overlapping clusters share a request naming their union)."""
        batch: BatchPlan | None = None
        group = group_by_clusters
        if self.batch_planning and len(probed) > 1:
            batch = plan_batches(probed, self._storage_facts(state.layout), self.cost_model,
                                 max_queries=max_queries_for(state.layout.dim))
            group = lambda _probed: batch.groups()      # noqa: E731
        plan = plan_search(state.layout, probed, caller_filter, limit=limit,
                           stray_partition=self._routing.stray_partition(state), group=group)
        self._record(state.layout.collection, plan, batch)
        return plan

    def _record(self, collection: str, plan: SearchPlan, batch: BatchPlan | None) -> None:
        stats = {"queries": plan.n_queries, "requests": len(plan.requests), "planned": batch is not None}
        if batch is not None:
            stats.update({k: batch.stats[k] for k in (
                "distinct_sets", "mean_extra_clusters", "max_extra_clusters", "extra_rows_share",
                "predicted_ms", "per_set_ms", "per_query_ms")})
            stats["extra_clusters"] = batch.extra_clusters.tolist()
        self._last.plan = stats
        extra = int(batch.extra_clusters.sum()) if batch is not None else 0
        with self._stats_lock:
            t = self._plan_totals.get(collection)
            if t is None:
                t = self._plan_totals[collection] = {"searches": 0, "planned": 0, "queries": 0,
                                                     "requests": 0, "extra_clusters": 0}
            t["searches"] += 1
            t["planned"] += batch is not None
            t["queries"] += plan.n_queries
            t["requests"] += len(plan.requests)
            t["extra_clusters"] += extra

    def _storage_facts(self, layout: Layout) -> StorageFacts:
        """How ``layout``'s clusters sit in storage, for the batch planner. At first from the
        build-time sizes; re-read in the background every ``reload_interval`` (cluster sizes
        as routed writes track them in a size-bounded layout, else the build-time sizes scaled
        to the live row count; sealed segments when the cost model prices them), so a search
        never waits for it."""
        entry = self._facts.get(layout.collection)
        if entry is None or entry[0] != layout.layout_id:
            entry = (layout.layout_id, StorageFacts.from_storage(layout.storage, layout.sizes), -np.inf)
            self._facts[layout.collection] = entry
        if time.monotonic() - entry[2] >= self.reload_interval:
            self._refresh_facts(layout)
        return entry[1]

    def _refresh_facts(self, layout: Layout) -> None:
        with self._stats_lock:
            if layout.collection in self._facts_reading:
                return
            self._facts_reading.add(layout.collection)

        def read():
            try:
                facts = StorageFacts.from_storage(layout.storage, self._planning_sizes(layout),
                                                  segments=self._planning_segments(layout))
                self._facts[layout.collection] = (layout.layout_id, facts, time.monotonic())
            except Exception as exc:    # plan by what is known; try again next interval
                log.warning("reading the storage facts of %r for batch planning failed (%s: %s)",
                            layout.collection, type(exc).__name__, exc)
                old = self._facts.get(layout.collection)
                if old is not None and old[0] == layout.layout_id:
                    self._facts[layout.collection] = (old[0], old[1], time.monotonic())
            finally:
                with self._stats_lock:
                    self._facts_reading.discard(layout.collection)
        try:
            self._pool.submit(read)
        except RuntimeError:            # the client is closing
            with self._stats_lock:
                self._facts_reading.discard(layout.collection)

    def _planning_sizes(self, layout: Layout) -> np.ndarray:
        sizes = self._writes.sizes(layout)
        if sizes is not None and sizes.checked_at is not None:
            return np.maximum(sizes.estimate(), 0)
        return live_sizes(self, layout)

    def _planning_segments(self, layout: Layout) -> int | None:
        """Loaded segments of a ``single`` layout, read only when the cost model prices
        segments; None (one per storage part: what a partition of one cluster usually is)
        otherwise."""
        if not self.cost_model.segment_ms or layout.storage.mode != "single" or self._is_lite():
            return None
        return max(1, len(self.list_loaded_segments(layout.collection)))

    def _log_queries(self, collection: str, queries: np.ndarray) -> None:
        if self._logger is None:
            return
        pick = self._rng.random(len(queries)) < self.log_rate
        if pick.any():
            self._logger.submit(collection, queries[pick])

    def flush_query_log(self, timeout: float = 30.0) -> bool:
        """Wait until sampled queries so far are written (tests, shutdown)."""
        return self._logger.flush(timeout) if self._logger else True

    # ------------------------------------------------------------------ writes
    def insert(self, collection_name: str, data, timeout=None, partition_name: str | None = "",
               **kwargs):
        """``MilvusClient.insert``, each row stored in its cluster (:meth:`.RoutedWrites.write`).

        For a layout built with ``--max-cluster-ratio R`` a row goes to its nearest cluster
        that still has room under ``R x`` the mean cluster size, the mean counted with the
        rows being written (:func:`.clustering.assign_with_room`); :meth:`upsert` likewise.
        The sizes this client goes by are read from Milvus before its first routed write into
        the collection (only the cluster-id column, or a ``count(*)`` per partition), then
        re-read in the background at most every ``size_refresh_interval`` seconds (at once by
        :meth:`reload_router`), plus the rows it routed since the last read began. The bound
        is therefore kept exactly by one writer and approximately by several: a client sees
        the other writers' rows only from its next read, so within one interval a cluster can
        pass the bound by what the *other* writers routed into it meanwhile. If a read fails,
        writes go on by the last sizes known (at first the layout's build-time sizes) and the
        read is retried after the interval. Deletes count from the next read. Until then an upsert of a
        stored key also counts as one more row (its old copy is not subtracted): its old
        cluster is over-counted, which errs on the strict side, and so is the row count,
        which loosens the bound by ``R x`` (such upserts) / (clusters) rows.
        """
        return self._routed_write("insert", collection_name, data, timeout, partition_name, **kwargs)

    def upsert(self, collection_name: str, data, timeout=None, partition_name: str | None = "",
               **kwargs):
        """``MilvusClient.upsert``, each row stored in its cluster and one row kept per key,
        also when a key's row moves to another cluster (see :meth:`insert`)."""
        return self._routed_write("upsert", collection_name, data, timeout, partition_name, **kwargs)

    def _routed_write(self, kind: str, collection_name, data, timeout, partition_name, **kwargs):
        write = super().insert if kind == "insert" else super().upsert
        state = None if partition_name else self._routing.state(collection_name)
        if state is None:
            return write(collection_name, data, timeout=timeout, partition_name=partition_name or "",
                         **kwargs)
        return self._writes.write(kind, write, super().delete, collection_name, state.layout, data,
                                  timeout, stray_partition=lambda: self._routing.stray_partition(state),
                                  **kwargs)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
        self._pool.shutdown(wait=True)
        super().close()


# Names that lived here before the routing core was split out (DeprecationWarning on use).
__getattr__ = moved_names(__name__, {"locate_keys": "milvus_ltr_router.placement"})
