"""``RoutedMilvusClient``: pymilvus's ``MilvusClient`` with learned partition routing.

Switching is one line: ``MilvusClient(uri=...)`` -> ``RoutedMilvusClient(uri=...)``.
For a collection with a layout, :meth:`search` (range searches too), :meth:`hybrid_search`
and :meth:`search_iterator` route every query to its best ``nprobe`` clusters and search
only those (:mod:`.routed_calls`); :meth:`insert` and :meth:`upsert` put each row in the
partition of its cluster. Every other method, and every collection without a layout,
behaves exactly as in pymilvus.

A thin shell: the decisions are the routing core's (:mod:`.plan` for searches,
:mod:`.placement` for writes), what serves each collection is kept by
:mod:`.serving` and routed writes are performed by :mod:`.writes`.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pymilvus import MilvusClient

from .client_settings import RoutedClientSettings
from .costs import CostModel
from .deprecation import moved_names
from .layout import Layout
from .metrics import metrics_recorder
from .milvus_io import AuditConnection, is_milvus_lite
from .plan import default_nprobe, merge, with_search_defaults
from .querylog import QueryLogger
from .registry import ModelRegistry
from .router import BaseRouter
from .routed_calls import WHY, call_requests, check_client_nprobe, check_hybrid_support, hybrid_queries, \
    hybrid_reason, iterator_request, pins_clusters, plan_hybrid, probe
from .search_planning import SearchPlanner, SearchTelemetry, layout_reason, passthrough_reason
from .serving import RoutedParamError, Routing, RoutingTable, routing_status, search_queries
from .switch import retrying_alias_miss
from .writes import RoutedDataError, RoutedWrites, WriteError

__all__ = ["RoutedMilvusClient", "RoutedParamError", "RoutedDataError", "WriteError"]

log = logging.getLogger(__name__)


class RoutedMilvusClient(RoutedClientSettings, MilvusClient):
    """A drop-in ``MilvusClient`` that routes searches to the partitions a router picks.

    Extra keyword arguments (all optional): ``model_dir`` where routers are
    published, ``nprobe`` default partitions per query (else the router's own
    default, else 8), ``log_rate`` fraction of search vectors written to the
    query log (0 disables), ``log_ttl_seconds``, ``reload_interval`` seconds
    between checks for a newly published router, ``max_workers`` concurrent
    partition-restricted searches, ``log_queue_size``, ``router_threads``,
    ``size_refresh_interval`` seconds between re-reads of the cluster sizes that
    routed writes into a size-bounded layout go by (default: ``reload_interval``;
    see :meth:`insert`); ``concurrent_writers`` (default 1) how many processes write into
    the same size-bounded layouts at once: each then takes 1/W of a cluster's room between
    size reads, so together they keep the bound; ``batch_planning`` (default True) lets queries of one search whose
    clusters overlap share a request (see :meth:`search`) under ``cost_model`` (a
    :class:`.costs.CostModel`, the path of its JSON - ``benchmarks/bench_costs.py``
    writes one for your server - or None: the model measured on Milvus 2.3.5);
    ``metrics`` (None: off; True: prometheus_client's default registry; a
    ``CollectorRegistry``; or a recorder: :func:`.metrics.metrics_recorder`) records
    Prometheus metrics of searches, fallbacks, routed writes and the query log
    (``docs/metrics.md``; needs the ``[metrics]`` extra); ``recall_sample`` (None or 0: off)
    re-runs that share of routed queries exactly in the background for the live recall
    estimate in ``router_status()["live_recall"]`` (:class:`.serving.LiveRecall`), also
    published to ``model_dir`` for ``milvus-ltr-router status`` (:mod:`.live_stats`); the
    re-runs go through this client's connection, or with ``recall_uri`` through a connection
    of their own to that URI (the same server on a channel of its own, or a replica; same
    credentials; :class:`.milvus_io.AuditConnection`).
    """

    def __init__(self, uri: str = "http://localhost:19530", user: str = "", password: str = "",
                 db_name: str = "", token: str = "", timeout: float | None = None, *,
                 model_dir: str = "onnx_models", nprobe: int | None = None, log_rate: float = 0.01,
                 log_ttl_seconds: int | None = None, reload_interval: float = 10.0,
                 max_workers: int = 8, log_queue_size: int = 1000, router_threads: int = 1,
                 seed: int | None = None, size_refresh_interval: float | None = None,
                 batch_planning: bool = True, cost_model: CostModel | str | None = None,
                 metrics=None, recall_sample: float | None = None,
                 recall_uri: str | None = None, concurrent_writers: int = 1, **kwargs):
        if not 0.0 <= log_rate <= 1.0:
            raise ValueError(f"log_rate must be in [0, 1], got {log_rate}")
        if not isinstance(concurrent_writers, int) or concurrent_writers < 1:
            raise ValueError(f"concurrent_writers must be a positive int, got {concurrent_writers!r}")
        check_client_nprobe(nprobe)
        self.metrics = metrics_recorder(metrics)      # before connecting: a missing extra raises
        super().__init__(uri=uri, user=user, password=password, db_name=db_name, token=token,
                         timeout=timeout, **kwargs)
        self.nprobe = nprobe
        self.log_rate = log_rate
        self._last = threading.local()
        self._lite: bool | None = None
        self._server_version: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ltr-search")
        self._routing = RoutingTable(self, ModelRegistry(model_dir), reload_interval, router_threads,
                                     metrics=self.metrics)
        self._writes = RoutedWrites(self, submit=self._pool.submit, is_lite=self._is_lite,
                                    refresh_interval=reload_interval if size_refresh_interval is None
                                    else size_refresh_interval, metrics=self.metrics,
                                    writers=concurrent_writers)
        self._planner = SearchPlanner(self, batch_planning=batch_planning, cost_model=cost_model,
                                      submit=self._pool.submit, cluster_sizes=self._writes.sizes,
                                      is_lite=self._is_lite,
                                      reload_interval=lambda: self._routing.reload_interval)
        self._telemetry = SearchTelemetry(self.metrics, recall_sample=recall_sample, seed=seed,
                                          search=functools.partial(MilvusClient.search, self)
                                          if recall_uri is None else AuditConnection(
                                              recall_uri, user=user, password=password,
                                              db_name=db_name, token=token),
                                          publish_to=model_dir, submit=self._pool.submit)
        self._logger = QueryLogger(self, max_queue=log_queue_size, ttl_seconds=log_ttl_seconds,
                                   rate=log_rate, seed=seed, metrics=self.metrics) \
            if log_rate > 0 else None

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
        own because it shared a request), ``planned`` (searches the batch planner split);
        ``live_recall`` the live recall estimate of the collection's routed searches (None:
        ``recall_sample`` off; ``docs/metrics.md``); ``passthrough`` counts this client's calls
        of the collection passed through unrouted, by ``"call:reason"`` (e.g.
        ``"hybrid_search:anns_field"``, ``"search:cluster_filter"``)."""
        state = self._routing.state(collection_name)
        stats = vars(self._logger.stats).copy() if self._logger else {}
        if state is None:
            return {"collection": collection_name, "mode": "none", "query_log": stats}
        name = state.layout.collection
        status = routing_status(state, nprobe=self._default_nprobe(state),
                                balance=self._writes.balance_status(state.layout),
                                rows_outside_layout=self._routing.stray_count(state), query_log=stats,
                                live_recall=self._telemetry.status(name))
        status["batches"] = self.plan_totals(name)
        status["passthrough"] = self._telemetry.passthrough_status(name)
        return status

    def plan_totals(self, collection_name: str) -> dict:
        """This client's routed searches of ``collection_name`` (the laid-out collection's
        name) so far: what ``router_status()`` reports under ``batches``."""
        return self._planner.totals(collection_name)

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
        return default_nprobe(self.nprobe, state.router, state.layout.n_partitions,
                              state.layout.collection)

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
        return probe(state, queries, self._default_nprobe(state), nprobe, recall_target,
                     min_nprobe, max_nprobe)

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
        The plugin's own parameters are keyword-only. A ``filter`` naming the cluster field
        (``_ltr_cluster``) pins the clusters: passed through as given (said once). Bad
        ``nprobe`` / ``recall_target`` values raise :class:`.serving.RoutedParamError` (a
        pymilvus ``ParamError`` and a ``ValueError``); an ``nprobe`` above the collection's
        cluster count is clipped to it (all clusters: the exact answer), as the client's default is.
        """
        reason = passthrough_reason(data, partition_names, kwargs.get("ids"), args)
        state = None if reason else self._routing.state(collection_name)
        reason = reason or layout_reason(state, anns_field)
        if not reason and pins_clusters(filter, state.layout):
            reason = "cluster_filter"
        if reason:
            self._telemetry.passed_through(collection_name, state, reason,
                                           warn=WHY.get(reason, "") if reason == "cluster_filter"
                                           else "")
            return super().search(collection_name, data, filter, limit, output_fields, search_params,
                                  timeout, partition_names, anns_field, *args, **kwargs)
        sup = super()
        search_params = with_search_defaults(search_params, self._routing.index_defaults(state.layout))

        def run(request):
            return sup.search(collection_name, data=request.take(queries).tolist(),
                              filter=request.filter, limit=limit, output_fields=output_fields,
                              search_params=search_params, timeout=timeout,
                              partition_names=request.partition_names, anns_field=anns_field,
                              **kwargs)
        try:
            queries = search_queries(state, data)
            started = time.perf_counter()
            probed = self._probe(state, queries, nprobe, recall_target, min_nprobe, max_nprobe)
            routed = time.perf_counter()
            if self._logger is not None:
                self._logger.sample(state.layout.collection, queries)
            plan, self._last.plan = self._planner.plan(state.layout, probed, filter, limit,
                                                       self._routing.stray_partition(state))
            sent = time.perf_counter()
            result = self._send(plan, run)
            searched = time.perf_counter()
        except Exception:
            self._telemetry.failed(state)
            raise
        self._telemetry.routed(state, probed, routed - started, searched - sent)
        self._telemetry.audit(state, queries, result, limit=limit, filter=filter,
                              recall_target=recall_target, search_params=search_params,
                              anns_field=anns_field, timeout=timeout, kwargs=kwargs)
        return result

    def _send(self, plan, run):
        """The answer to ``plan``: ``run(request)`` for each of its requests, merged (a request
        failing with the alias-cache transient of a freeze is sent once more)."""
        run = retrying_alias_miss(run)
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

    # ------------------------------------------------------------------ hybrid, iterator
    def _check_hybrid(self) -> None:
        if self._server_version is None:
            self._server_version = str(self.get_server_version())
        check_hybrid_support(self._server_version)

    def hybrid_search(self, collection_name: str, reqs, ranker, limit: int = 10,
                      output_fields=None, timeout=None, partition_names=None, *,
                      nprobe: int | None = None, recall_target: float | None = None,
                      min_nprobe: int = 1, max_nprobe: int | None = None, **kwargs):
        """``MilvusClient.hybrid_search`` with each ``AnnSearchRequest`` on the layout's vector
        field restricted to the clusters the router picks for its queries (its filter ANDed
        with the cluster filter, as :meth:`search` does; partition storage:
        ``partition_names``); requests on other fields go unchanged (said once), and the
        ``ranker`` and ``limit`` are the caller's (:mod:`.routed_calls`). ``nprobe`` and
        ``recall_target`` as in :meth:`search`. Passes through when the caller names
        ``partition_names``, no request is on the layout's field, or the layout stores
        clusters as partitions while a request searches another field. On a Milvus server
        before 2.4 (no HybridSearch) raises :class:`.routed_calls.HybridSearchUnsupported`
        naming its version."""
        self._check_hybrid()
        reason = "partition_names" if partition_names is not None else None
        state = None if reason else self._routing.state(collection_name)
        reason = reason or ("no_layout" if state is None else None)
        unrouted: dict = {}
        if not reason:
            reason, routed, unrouted = hybrid_reason(state, reqs)
        if reason:
            self._telemetry.passed_through(collection_name, state, reason, call="hybrid_search",
                                           warn=WHY.get(reason, ""))
            return super().hybrid_search(collection_name, reqs, ranker, limit, output_fields,
                                         timeout, partition_names, **kwargs)
        for why in unrouted.values():
            self._telemetry.passed_through(collection_name, state, why, call="hybrid_search",
                                           warn=WHY[why])
        sup = super()
        try:
            queries = hybrid_queries(state, reqs, routed)
            n = len(queries[routed[0]])
            started = time.perf_counter()
            probed = {j: self._probe(state, q, nprobe, recall_target, min_nprobe, max_nprobe)
                      for j, q in queries.items()}
            routed_at = time.perf_counter()
            if self._logger is not None:
                self._logger.sample(state.layout.collection, queries[routed[0]])
            route = plan_hybrid(state, reqs, probed, routed, n, limit,
                                self._routing.stray_partition(state))
            calls = {id(r): c for r, c in zip(route.plan.requests, route.calls)}
            defaults = self._routing.index_defaults(state.layout)

            def run(request):
                call = calls[id(request)]
                return sup.hybrid_search(collection_name, call_requests(reqs, call, n, defaults), ranker,
                                         limit, output_fields, timeout, call.partition_names,
                                         **kwargs)
            sent = time.perf_counter()
            result = self._send(route.plan, run)
            searched = time.perf_counter()
        except Exception:
            self._telemetry.failed(state)
            raise
        self._telemetry.routed(state, probed[routed[0]], routed_at - started, searched - sent)
        return result

    def search_iterator(self, collection_name: str, data, *args, nprobe: int | None = None,
                        recall_target: float | None = None, min_nprobe: int = 1,
                        max_nprobe: int | None = None, **kwargs):
        """``MilvusClient.search_iterator`` restricted to the clusters the router picks.

        The rule: the query is routed once, when the iterator is made (``nprobe`` /
        ``recall_target`` as in :meth:`search`), and every page carries the same restriction
        (cluster filter ANDed with ``filter``, or ``partition_names``): the iterator pages
        through the hits of those clusters, best first, and ends when they are exhausted - it
        never widens. Paging thus returns what one routed :meth:`search` with a larger limit
        returns. Passes through in :meth:`search`'s cases, and with more than one query vector
        (pymilvus's iterator takes one; said once)."""
        bound = inspect.signature(MilvusClient.search_iterator).bind(
            self, collection_name, data, *args, **kwargs)
        params = bound.arguments
        extra = params.get("kwargs", {})
        filter_text = params.get("filter")
        reason = passthrough_reason(data, params.get("partition_names"), extra.get("ids"))
        state = None if reason else self._routing.state(collection_name)
        reason = reason or layout_reason(state, params.get("anns_field"))
        if not reason and pins_clusters(filter_text, state.layout):
            reason = "cluster_filter"
        queries = None
        if not reason:
            queries = search_queries(state, data, one_vector_ok=True)
            if len(queries) != 1:
                reason = "iterator_batch"
        if reason:
            self._telemetry.passed_through(collection_name, state, reason, call="search_iterator",
                                           warn=WHY.get(reason, ""))
            return super().search_iterator(collection_name, data, *args, **kwargs)
        started = time.perf_counter()
        clusters = self._probe(state, queries, nprobe, recall_target, min_nprobe, max_nprobe)[0]
        routed = time.perf_counter()
        if self._logger is not None:
            self._logger.sample(state.layout.collection, queries)
        request = iterator_request(state, clusters, filter_text,
                                   self._routing.stray_partition(state))
        params.update(filter=request.filter, partition_names=request.partition_names)
        defaults = self._routing.index_defaults(state.layout)
        if defaults:
            params["search_params"] = with_search_defaults(params.get("search_params"), defaults)
        iterator = MilvusClient.search_iterator(*bound.args, **bound.kwargs)
        # the search time recorded is the iterator's making (its first request), not its pages'
        self._telemetry.routed(state, [clusters], routed - started, time.perf_counter() - routed)
        return iterator

    def flush_query_log(self, timeout: float = 30.0) -> bool:
        """Wait until sampled queries so far are written (tests, shutdown)."""
        return self._logger.flush(timeout) if self._logger else True

    def flush_live_recall(self, timeout: float = 30.0) -> bool:
        """Wait until the queries sampled for the live recall so far are re-run, and publish
        the estimate to the model directory (tests, shutdown)."""
        return self._telemetry.flush(timeout)

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
        """Stop the live recall's worker, write out the query log, stop the search threads and
        close the connection."""
        self._telemetry.close()
        if self._logger is not None:
            self._logger.close()
        self._pool.shutdown(wait=True)
        super().close()


# Names that lived here before the routing core was split out (DeprecationWarning on use).
__getattr__ = moved_names(__name__, {"locate_keys": "milvus_ltr_router.placement"})
