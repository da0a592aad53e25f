"""``AsyncRoutedMilvusClient``: pymilvus's ``AsyncMilvusClient`` with learned partition routing.

Switching is one line::

    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient  # was: from pymilvus import AsyncMilvusClient

The asyncio twin of :class:`.client.RoutedMilvusClient`: same constructor arguments, same
routing (``search``, ``hybrid_search``), routed writes, query log, ``router_status`` /
``reload_router`` / ``route`` / ``router`` / ``layout`` (awaited here). Another thin shell over the routing core: the
decisions are :mod:`.plan`'s and :mod:`.placement`'s (and :mod:`.search_planning`'s batch
plans), what serves each collection is kept by the same :class:`.serving.RoutingTable`;
this module performs the I/O they name with the async client's own calls.

What runs where:

* a search's requests run concurrently (``asyncio.gather``) on this client's own
  ``search``; routed writes, the stored-copy lookup of an upsert (driven from
  :func:`.placement.locate_keys_steps`) and the deletes of moved rows are awaited here;
* routing (the router's scores, the batch planner) runs on the event loop, but a batch of
  more than :data:`INLINE_ROUTE_QUERIES` queries is routed and planned on a worker thread;
* everything that may read files or Milvus metadata - a collection's layout and router
  (re)loaded by the routing table, rows outside the layout counted, the live cluster sizes
  of a size-bounded layout, the query log's writes - runs on worker threads (``max_workers``
  of them) through a synchronous ``MilvusClient`` to the same server, connected on first
  use. Between reloads the routing table answers from memory, on the loop. Concurrent
  callers that find a collection due for a reload share one read.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pymilvus import AsyncMilvusClient, MilvusClient

from .client_settings import RoutedClientSettings
from .costs import CostModel
from .async_writes import AsyncRoutedWrites
from .layout import Layout, has_stray_partition
from .metrics import metrics_recorder
from .milvus_io import AuditConnection, is_milvus_lite
from .plan import default_nprobe, merge, with_search_defaults
from .querylog import QueryLogger
from .registry import ModelRegistry
from .router import BaseRouter
from .routed_calls import WHY, call_requests, check_client_nprobe, check_hybrid_support, hybrid_queries, \
    hybrid_reason, pins_clusters, plan_hybrid, probe
from .search_planning import SearchPlanner, SearchTelemetry, layout_reason, passthrough_reason
from .serving import RoutedParamError, Routing, RoutingTable, routing_status, search_queries
from .storage import DEFAULT_PARTITION
from .switch import retrying_alias_miss_async
from .writes import RoutedDataError, RoutedWrites, WriteError

__all__ = ["AsyncRoutedMilvusClient", "RoutedParamError", "RoutedDataError", "WriteError"]

log = logging.getLogger(__name__)

INLINE_ROUTE_QUERIES = 256      # larger batches are routed on a worker thread

_MISSING = object()


class _SyncSide:
    """A synchronous ``MilvusClient`` to the same server, connected on first use (pymilvus's
    sync client connects in its constructor; this one is only ever touched on worker
    threads). The routing table, the size reads and the query log read through it."""

    def __init__(self, **connect):
        self._connect = connect
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def get(self) -> MilvusClient:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = MilvusClient(**self._connect)
        return self._client

    def __getattr__(self, name):
        return getattr(self.get(), name)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class _LoopRoutingTable(RoutingTable):
    """A :class:`.serving.RoutingTable` that also says, without any I/O, what it would answer
    from memory (so the event loop only waits for a thread when a reload is due)."""

    def cached_state(self, collection: str):
        """The routing of ``collection`` while it needs no re-check (neither the reload nor the
        layout stamp check of :meth:`state` is due), else ``_MISSING``."""
        cached = self._routing.get(collection)
        if cached is not None and _age(cached[1]) < self.reload_interval and \
                (cached[0] is None or not self.layout_check_due(collection)):
            return cached[0]
        return _MISSING

    def cached_stray_partition(self, state: Routing):
        """:meth:`stray_partition` while its count needs no re-read, else ``_MISSING``."""
        if not has_stray_partition(state.layout):
            return None
        cached = self._strays.get(state.layout.collection)
        if cached is not None and _age(cached[1]) < self.reload_interval:
            return DEFAULT_PARTITION if cached[0] != 0 else None
        return _MISSING


def _age(t: float) -> float:
    return time.monotonic() - t


class AsyncRoutedMilvusClient(RoutedClientSettings, AsyncMilvusClient):
    """A drop-in ``AsyncMilvusClient`` that routes searches to the partitions a router picks.

    Takes :class:`.client.RoutedMilvusClient`'s keyword arguments, with the same meaning:
    ``model_dir``, ``nprobe``, ``log_rate``, ``log_ttl_seconds``, ``reload_interval``,
    ``log_queue_size``, ``router_threads``, ``seed``, ``size_refresh_interval``,
    ``concurrent_writers``,
    ``batch_planning``, ``cost_model``, ``metrics``, ``recall_sample``, ``recall_uri``; ``max_workers`` is
    the number of worker threads for the reads that must not run on the event loop (a
    search's requests themselves run concurrently on the loop, however many).
    ``router_status``, ``reload_router``, ``route``, ``router``, ``layout``,
    ``flush_query_log`` and ``flush_live_recall`` are coroutines here. The live recall's
    exact re-runs go through the worker-side synchronous client (or ``recall_uri``'s own
    connection), on the auditor's thread.
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
        self._lite: bool | None = None
        self._server_version: str | None = None
        self._sync = _SyncSide(uri=uri, user=user, password=password, db_name=db_name, token=token,
                               timeout=timeout, **kwargs)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ltr-async")
        self._routing = _LoopRoutingTable(self._sync, ModelRegistry(model_dir), reload_interval,
                                          router_threads, metrics=self.metrics)
        self._writes = RoutedWrites(self._sync, submit=self._pool.submit, is_lite=self._is_lite_sync,
                                    refresh_interval=reload_interval if size_refresh_interval is None
                                    else size_refresh_interval, metrics=self.metrics,
                                    writers=concurrent_writers)
        self._planner = SearchPlanner(self._sync, batch_planning=batch_planning, cost_model=cost_model,
                                      submit=self._pool.submit, cluster_sizes=self._writes.sizes,
                                      is_lite=self._is_lite_sync,
                                      reload_interval=lambda: self._routing.reload_interval)
        self._telemetry = SearchTelemetry(self.metrics, recall_sample=recall_sample, seed=seed,
                                          search=lambda *a, **k: self._sync.search(*a, **k)
                                          if recall_uri is None else AuditConnection(
                                              recall_uri, user=user, password=password,
                                              db_name=db_name, token=token),
                                          publish_to=model_dir, submit=self._pool.submit)
        self._async_writes = AsyncRoutedWrites(self, self._writes, in_thread=self._in_thread,
                                               is_lite=self._is_lite,
                                               stray_partition=self._stray_partition)
        self._logger = QueryLogger(self._sync, max_queue=log_queue_size, ttl_seconds=log_ttl_seconds,
                                   rate=log_rate, seed=seed, metrics=self.metrics) \
            if log_rate > 0 else None
        self._last_plan: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
            "ltr_last_plan", default=None)
        self._reads: dict[tuple, asyncio.Future] = {}     # reads in flight, shared by callers

    # ------------------------------------------------------------------ off the loop
    async def _in_thread(self, fn, *args):
        """``fn(*args)`` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _shared(self, key: tuple, fn, *args):
        """``fn(*args)`` on a worker thread; callers asking for the same ``key`` meanwhile
        wait for the same read instead of starting their own."""
        loop = asyncio.get_running_loop()
        fut = self._reads.get(key)
        if fut is None or fut.get_loop() is not loop:
            fut = loop.run_in_executor(self._pool, functools.partial(fn, *args))
            self._reads[key] = fut

            def done(f, key=key):
                if self._reads.get(key) is f:
                    del self._reads[key]
                if not f.cancelled():
                    f.exception()           # retrieved: the callers see it
            fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def _state(self, collection: str) -> Routing | None:
        """What routes ``collection`` now (None: no layout); read on a worker thread only
        when the routing table re-checks it."""
        state = self._routing.cached_state(collection)
        if state is _MISSING:
            state = await self._shared(("state", collection), self._routing.state, collection)
        return state

    async def _stray_partition(self, state: Routing) -> str | None:
        part = self._routing.cached_stray_partition(state)
        if part is _MISSING:
            part = await self._shared(("strays", state.layout.collection),
                                      self._routing.stray_partition, state)
        return part

    def _is_lite_sync(self) -> bool:
        """milvus-lite (asked once, on a worker thread): its upsert and delete act on every
        partition."""
        if self._lite is None:
            self._lite = is_milvus_lite(self._sync)
        return self._lite

    async def _is_lite(self) -> bool:
        if self._lite is None:
            await self._in_thread(self._is_lite_sync)
        return self._lite

    # ------------------------------------------------------------------ routing state
    async def reload_router(self, collection_name: str) -> dict:
        """Re-read the layout and the published router now instead of at the next interval;
        for a size-bounded layout also the live cluster sizes that routed writes go by."""
        self._reads.pop(("state", collection_name), None)
        await self._in_thread(self._routing.forget, collection_name)
        state = await self._state(collection_name)
        if state is not None:
            await self._in_thread(self._writes.read_sizes, state.layout)
        return await self.router_status(collection_name)

    async def router_status(self, collection_name: str) -> dict:
        """How ``collection_name`` is routed (:meth:`.client.RoutedMilvusClient.router_status`:
        the same keys and meanings)."""
        state = await self._state(collection_name)
        stats = vars(self._logger.stats).copy() if self._logger else {}
        if state is None:
            return {"collection": collection_name, "mode": "none", "query_log": stats}
        strays = await self._in_thread(self._routing.stray_count, state)
        name = state.layout.collection
        status = routing_status(state, nprobe=self._default_nprobe(state),
                                balance=self._writes.balance_status(state.layout),
                                rows_outside_layout=strays, query_log=stats,
                                live_recall=self._telemetry.status(name))
        status["batches"] = self._planner.totals(name)
        status["passthrough"] = self._telemetry.passthrough_status(name)
        return status

    def plan_totals(self, collection_name: str) -> dict:
        """This client's routed searches of ``collection_name`` (the laid-out collection's
        name) so far: what ``router_status()`` reports under ``batches``."""
        return self._planner.totals(collection_name)

    @property
    def last_plan(self) -> dict | None:
        """How this task's last routed search was sent (None: none yet); the keys of
        :attr:`.client.RoutedMilvusClient.last_plan`."""
        return self._last_plan.get()

    def _default_nprobe(self, state: Routing) -> int:
        return default_nprobe(self.nprobe, state.router, state.layout.n_partitions,
                              state.layout.collection)

    # ------------------------------------------------------------------ routing
    async def router(self, collection_name: str) -> BaseRouter | None:
        """The router serving ``collection_name`` now; None when it has no layout."""
        state = await self._state(collection_name)
        return None if state is None else state.router

    async def layout(self, collection_name: str) -> Layout | None:
        """The layout ``collection_name`` (or the collection an alias names) is routed by."""
        state = await self._state(collection_name)
        return None if state is None else state.layout

    async def route(self, collection_name: str, data, *, nprobe: int | None = None,
                    recall_target: float | None = None, min_nprobe: int = 1,
                    max_nprobe: int | None = None) -> list[list[int]]:
        """The clusters a routed search of ``data`` probes, per query, best first
        (:meth:`.client.RoutedMilvusClient.route`). Raises ``ValueError`` for a collection
        without a layout."""
        state = await self._state(collection_name)
        if state is None:
            raise ValueError(f"collection {collection_name!r} has no layout; nothing to route")
        queries = search_queries(state, data, one_vector_ok=True)
        probed = await self._probe(state, queries, nprobe, recall_target, min_nprobe, max_nprobe)
        return [row.tolist() for row in probed]

    async def _probe(self, state: Routing, queries: np.ndarray, nprobe, recall_target, min_nprobe,
                     max_nprobe):
        args = (state, queries, self._default_nprobe(state), nprobe, recall_target, min_nprobe,
                max_nprobe)
        if len(queries) <= INLINE_ROUTE_QUERIES:
            return probe(*args)
        return await self._in_thread(probe, *args)

    # ------------------------------------------------------------------ search
    async def search(self, collection_name: str, data=None, filter: str = "", limit: int = 10,
                     output_fields=None, search_params=None, timeout=None, partition_names=None,
                     anns_field=None, *args, nprobe: int | None = None,
                     recall_target: float | None = None, min_nprobe: int = 1,
                     max_nprobe: int | None = None, **kwargs):
        """``AsyncMilvusClient.search``, restricted per query to the clusters the router picks
        (:meth:`.client.RoutedMilvusClient.search`: the same parameters, the same requests;
        they are sent concurrently). Passes through untouched in the same cases."""
        reason = passthrough_reason(data, partition_names, kwargs.get("ids"), args)
        state = None if reason else await self._state(collection_name)
        reason = reason or layout_reason(state, anns_field)
        if not reason and pins_clusters(filter, state.layout):
            reason = "cluster_filter"
        sup = super()
        if reason:
            self._telemetry.passed_through(collection_name, state, reason,
                                           warn=WHY["cluster_filter"] if reason == "cluster_filter"
                                           else "")
            return await sup.search(collection_name, data, filter, limit, output_fields,
                                    search_params, timeout, partition_names, anns_field, *args,
                                    **kwargs)
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
            probed = await self._probe(state, queries, nprobe, recall_target, min_nprobe,
                                       max_nprobe)
            routed = time.perf_counter()
            if self._logger is not None:
                self._logger.sample(state.layout.collection, queries)   # never waits
            stray = await self._stray_partition(state)
            planned = (state.layout, probed, filter, limit, stray)
            plan, stats = self._planner.plan(*planned) if len(queries) <= INLINE_ROUTE_QUERIES \
                else await self._in_thread(self._planner.plan, *planned)
            self._last_plan.set(stats)
            sent = time.perf_counter()
            result = await self._send(plan, run)
            searched = time.perf_counter()
        except Exception:
            self._telemetry.failed(state)
            raise
        self._telemetry.routed(state, probed, routed - started, searched - sent)
        self._telemetry.audit(state, queries, result, limit=limit, filter=filter,
                              recall_target=recall_target, search_params=search_params,
                              anns_field=anns_field, timeout=timeout, kwargs=kwargs)
        return result

    @staticmethod
    async def _send(plan, run):
        """The answer to ``plan``: its requests (``run(request)``, coroutines) gathered, merged
        (a request failing with the alias-cache transient of a freeze is sent once more)."""
        run = retrying_alias_miss_async(run)
        if len(plan.requests) == 1:
            return merge(plan, [await run(plan.requests[0])])
        tasks = [asyncio.ensure_future(run(r)) for r in plan.requests]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:             # one failed (or the caller gave up): stop the rest
                t.cancel()
            raise
        return merge(plan, results)

    async def hybrid_search(self, collection_name: str, reqs, ranker, limit: int = 10,
                            output_fields=None, timeout=None, partition_names=None, *,
                            nprobe: int | None = None, recall_target: float | None = None,
                            min_nprobe: int = 1, max_nprobe: int | None = None, **kwargs):
        """``AsyncMilvusClient.hybrid_search`` routed as the sync client's
        (:meth:`.client.RoutedMilvusClient.hybrid_search`); its hybrid searches run concurrently."""
        if self._server_version is None:
            self._server_version = str(await self._in_thread(self._sync.get_server_version))
        check_hybrid_support(self._server_version)
        reason = "partition_names" if partition_names is not None else None
        state = None if reason else await self._state(collection_name)
        reason, unrouted = reason or ("no_layout" if state is None else None), {}
        if not reason:
            reason, routed, unrouted = hybrid_reason(state, reqs)
        sup = super()
        if reason:
            self._telemetry.passed_through(collection_name, state, reason, call="hybrid_search",
                                           warn=WHY.get(reason, ""))
            return await sup.hybrid_search(collection_name, reqs, ranker, limit, output_fields,
                                           timeout, partition_names, **kwargs)
        for why in unrouted.values():
            self._telemetry.passed_through(collection_name, state, why, call="hybrid_search",
                                           warn=WHY[why])
        try:
            queries = hybrid_queries(state, reqs, routed)
            n = len(queries[routed[0]])
            started = time.perf_counter()
            probed = {j: await self._probe(state, q, nprobe, recall_target, min_nprobe, max_nprobe)
                      for j, q in queries.items()}
            routed_at = time.perf_counter()
            if self._logger is not None:
                self._logger.sample(state.layout.collection, queries[routed[0]])
            route = plan_hybrid(state, reqs, probed, routed, n, limit,
                                await self._stray_partition(state))
            calls = {id(r): c for r, c in zip(route.plan.requests, route.calls)}
            defaults = self._routing.index_defaults(state.layout)

            def run(request):
                call = calls[id(request)]
                return sup.hybrid_search(collection_name, call_requests(reqs, call, n, defaults), ranker,
                                         limit, output_fields, timeout, call.partition_names,
                                         **kwargs)
            sent = time.perf_counter()
            result = await self._send(route.plan, run)
            searched = time.perf_counter()
        except Exception:
            self._telemetry.failed(state)
            raise
        self._telemetry.routed(state, probed[routed[0]], routed_at - started, searched - sent)
        return result

    async def flush_query_log(self, timeout: float = 30.0) -> bool:
        """Wait until sampled queries so far are written (tests, shutdown)."""
        return await self._in_thread(self._logger.flush, timeout) if self._logger else True

    async def flush_live_recall(self, timeout: float = 30.0) -> bool:
        """Wait until the queries sampled for the live recall so far are re-run (tests)."""
        return await self._in_thread(self._telemetry.flush, timeout)

    # ------------------------------------------------------------------ writes
    async def insert(self, collection_name: str, data, timeout=None,
                     partition_name: str | None = "", **kwargs):
        """``AsyncMilvusClient.insert``, each row stored in its cluster
        (:meth:`.client.RoutedMilvusClient.insert`: the same placement and size bound)."""
        return await self._routed_write("insert", collection_name, data, timeout, partition_name,
                                        **kwargs)

    async def upsert(self, collection_name: str, data, timeout=None,
                     partition_name: str | None = "", **kwargs):
        """``AsyncMilvusClient.upsert``, each row stored in its cluster and one row kept per
        key, also when a key's row moves to another cluster (see :meth:`insert`)."""
        return await self._routed_write("upsert", collection_name, data, timeout, partition_name,
                                        **kwargs)

    async def _routed_write(self, kind: str, collection_name, data, timeout, partition_name,
                            **kwargs):
        sup = super()
        write = sup.insert if kind == "insert" else sup.upsert
        state = None if partition_name else await self._state(collection_name)
        if state is None:
            return await write(collection_name, data, timeout=timeout,
                               partition_name=partition_name or "", **kwargs)
        return await self._async_writes.write(kind, write, sup.delete, collection_name, state, data,
                                              timeout, upsert=sup.upsert, **kwargs)

    # ------------------------------------------------------------------ life cycle
    async def close(self) -> None:
        """Stop the live recall's worker, write out the query log, stop the worker threads,
        close both connections."""
        def stop():
            self._telemetry.close()
            if self._logger is not None:
                self._logger.close()
            self._pool.shutdown(wait=True)
            self._sync.close()
        await asyncio.get_running_loop().run_in_executor(None, stop)
        await super().close()
