"""How one routed client splits its searches into requests, and what it records about them.

The decisions are the routing core's (:func:`.plan.plan_search`, and
:func:`.batching.plan_batches` under a cost model); a :class:`SearchPlanner` keeps what a
client needs around them: the storage facts the batch planner goes by (the build-time
sizes at first, re-read in the background every ``reload_interval``, so a search never
waits for them) and the counts ``router_status()`` reports under ``batches``. A
:class:`SearchTelemetry` records what each search did into the client's metrics
(:mod:`.metrics`: routed or passed through and why, clusters probed, routing and search
time, failures), hands sampled routed queries to the live recall estimate
(:class:`.serving.LiveRecall`) and publishes that estimate to the model directory for
``milvus-ltr-router status`` (:mod:`.live_stats`). Neither does I/O on the caller's path, so the sync and the
asyncio client both call them inline: one implementation for both shells.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Callable

import numpy as np

from .batching import BatchPlan, CostModel, StorageFacts, max_queries_for, plan_batches, \
    resolve_cost_model
from .layout import Layout, live_sizes
from .live_stats import RecallPublisher
from .milvus_io import AuditConnection
from .metrics import NULL_METRICS, NullMetrics
from .plan import SearchPlan, group_by_clusters, plan_search, searches_layout_field
from .serving import LiveRecall, Routing

log = logging.getLogger(__name__)

_LAST_PLAN_KEYS = ("distinct_sets", "mean_extra_clusters", "max_extra_clusters", "extra_rows_share",
                   "predicted_ms", "per_set_ms", "per_query_ms")


def _zero_totals() -> dict:
    return {"searches": 0, "planned": 0, "queries": 0, "requests": 0, "extra_clusters": 0}


class SearchPlanner:
    """The requests of one client's routed searches (see :meth:`plan`).

    ``client`` is a synchronous ``MilvusClient`` for the background reads of the storage
    facts; ``submit(fn)`` runs such a read (a thread pool's ``submit``); ``cluster_sizes``
    (layout -> :class:`.placement.ClusterSizes` or None) gives the sizes routed writes track
    in a size-bounded layout; ``is_lite()`` says whether the backend is milvus-lite;
    ``reload_interval()`` how old the facts may get.
    """

    def __init__(self, client, *, batch_planning: bool = True,
                 cost_model: CostModel | str | None = None, submit: Callable,
                 cluster_sizes: Callable, is_lite: Callable[[], bool],
                 reload_interval: Callable[[], float]):
        self.client = client
        self.batch_planning = bool(batch_planning)
        self.cost_model = resolve_cost_model(cost_model)
        self.submit = submit
        self.cluster_sizes = cluster_sizes
        self.is_lite = is_lite
        self.reload_interval = reload_interval
        self._facts: dict[str, tuple[str, StorageFacts, float]] = {}  # collection -> (layout id, facts, read at)
        self._facts_reading: set[str] = set()
        self._lock = threading.Lock()            # held for counter updates only, never across I/O
        self._totals: dict[str, dict] = {}

    # ------------------------------------------------------------------ plans
    def plan(self, layout: Layout, probed, caller_filter: str, limit: int,
             stray_partition: str | None) -> tuple[SearchPlan, dict]:
        """The requests of one routed search, and how it was sent (what ``last_plan`` shows).

        Queries probing the same clusters share one request; with ``batch_planning`` a batch
        is split by :func:`.batching.plan_batches` under the cost model (queries with
        overlapping clusters share a request naming their union)."""
        batch: BatchPlan | None = None
        group = group_by_clusters
        if self.batch_planning and len(probed) > 1:
            batch = plan_batches(probed, self.storage_facts(layout), self.cost_model,
                                 max_queries=max_queries_for(layout.dim))
            group = lambda _probed: batch.groups()      # noqa: E731
        plan = plan_search(layout, probed, caller_filter, limit=limit,
                           stray_partition=stray_partition, group=group)
        return plan, self._record(layout.collection, plan, batch)

    def _record(self, collection: str, plan: SearchPlan, batch: BatchPlan | None) -> dict:
        stats = {"queries": plan.n_queries, "requests": len(plan.requests), "planned": batch is not None}
        if batch is not None:
            stats.update({k: batch.stats[k] for k in _LAST_PLAN_KEYS})
            stats["extra_clusters"] = batch.extra_clusters.tolist()
        extra = int(batch.extra_clusters.sum()) if batch is not None else 0
        with self._lock:
            t = self._totals.get(collection)
            if t is None:
                t = self._totals[collection] = _zero_totals()
            t["searches"] += 1
            t["planned"] += batch is not None
            t["queries"] += plan.n_queries
            t["requests"] += len(plan.requests)
            t["extra_clusters"] += extra
        return stats

    def totals(self, collection: str) -> dict:
        """This client's routed searches of ``collection`` (the laid-out collection's name)
        so far: what ``router_status()`` reports under ``batches``."""
        with self._lock:
            t = dict(self._totals.get(collection) or _zero_totals())
        extra = t.pop("extra_clusters")
        t["requests_per_search"] = t["requests"] / t["searches"] if t["searches"] else None
        t["extra_clusters_per_query"] = extra / t["queries"] if t["queries"] else None
        t.update(batch_planning=self.batch_planning, cost_model=self.cost_model.source)
        return t

    # ------------------------------------------------------------------ storage facts
    def storage_facts(self, layout: Layout) -> StorageFacts:
        """How ``layout``'s clusters sit in storage, for the batch planner. At first from the
        build-time sizes; re-read in the background every ``reload_interval`` (cluster sizes
        as routed writes track them in a size-bounded layout, else the build-time sizes scaled
        to the live row count; sealed segments when the cost model prices them), so a search
        never waits for it."""
        entry = self._facts.get(layout.collection)
        if entry is None or entry[0] != layout.layout_id:
            entry = (layout.layout_id, StorageFacts.from_storage(layout.storage, layout.sizes), -np.inf)
            self._facts[layout.collection] = entry
        if time.monotonic() - entry[2] >= self.reload_interval():
            self._refresh_facts(layout)
        return entry[1]

    def _refresh_facts(self, layout: Layout) -> None:
        with self._lock:
            if layout.collection in self._facts_reading:
                return
            self._facts_reading.add(layout.collection)

        def read():
            try:
                facts = StorageFacts.from_storage(layout.storage, self.planning_sizes(layout),
                                                  segments=self.planning_segments(layout))
                self._facts[layout.collection] = (layout.layout_id, facts, time.monotonic())
            except Exception as exc:    # plan by what is known; try again next interval
                log.warning("reading the storage facts of %r for batch planning failed (%s: %s)",
                            layout.collection, type(exc).__name__, exc)
                old = self._facts.get(layout.collection)
                if old is not None and old[0] == layout.layout_id:
                    self._facts[layout.collection] = (old[0], old[1], time.monotonic())
            finally:
                with self._lock:
                    self._facts_reading.discard(layout.collection)
        try:
            self.submit(read)
        except RuntimeError:            # the client is closing
            with self._lock:
                self._facts_reading.discard(layout.collection)

    def planning_sizes(self, layout: Layout) -> np.ndarray:
        sizes = self.cluster_sizes(layout)
        if sizes is not None and sizes.checked_at is not None:
            return np.maximum(sizes.estimate(), 0)
        return live_sizes(self.client, layout)

    def planning_segments(self, layout: Layout) -> int | None:
        """Loaded segments of a ``single`` layout, read only when the cost model prices
        segments; None (one per storage part: what a partition of one cluster usually is)
        otherwise."""
        if not self.cost_model.segment_ms or layout.storage.mode != "single" or self.is_lite():
            return None
        return max(1, len(self.client.list_loaded_segments(layout.collection)))


# ------------------------------------------------------------------------- what searches did
def passthrough_reason(data, partition_names, ids, positional=()) -> str | None:
    """Why a search is passed to pymilvus untouched whatever its collection
    (:data:`.metrics.PASSTHROUGH_REASONS`), None when it can be routed: the checks of
    :func:`.plan.search_is_routable`, named."""
    if partition_names is not None:
        return "partition_names"
    if ids is not None:
        return "ids"
    if data is None:
        return "no_data"
    if positional:
        return "positional_args"
    return None


def layout_reason(state: Routing | None, anns_field) -> str | None:
    """Why a routable search of a collection is passed through all the same: ``no_layout``
    (``state`` None) or ``anns_field`` (another vector field than the layout's); None: route it."""
    if state is None:
        return "no_layout"
    if not searches_layout_field(anns_field, state.layout):
        return "anns_field"
    return None


def probed_counts(probed) -> np.ndarray:
    """Clusters probed by each query (``probed``: ``[Q, nprobe]``, or one row per query of
    its own length with ``recall_target``)."""
    if isinstance(probed, np.ndarray) and probed.ndim == 2:
        return np.full(len(probed), probed.shape[1], dtype=np.int64)
    return np.fromiter((len(row) for row in probed), dtype=np.int64, count=len(probed))


def exact_search(search: Callable) -> Callable:
    """The live recall's exact re-run over ``search`` (an unrestricted, synchronous
    ``MilvusClient.search``): ``(collection, vector, limit, filter, **extra) -> hits``."""
    def run(collection, vector, limit, filter, **extra):
        return search(collection, data=[np.asarray(vector, dtype=np.float32).tolist()],
                      limit=limit, filter=filter, **extra)[0]
    return run


def _record(method, *args) -> None:
    try:
        method(*args)
    except Exception as exc:        # metrics never fail a search
        log.debug("recording a search metric failed: %s", exc)


class SearchTelemetry:
    """What one routed client records about its searches (both clients hold one).

    ``metrics`` is the client's recorder (:func:`.metrics.metrics_recorder`); with
    ``recall_sample`` > 0 a share of routed queries is re-run exactly in the background
    through ``search`` (an unrestricted synchronous ``MilvusClient.search`` to the same
    server: the sync client's own, the async client's worker-side client) for the live
    recall estimate (:class:`.serving.LiveRecall`, seeded by ``seed``). While sampling, the
    estimate of each collection is published to ``publish_to`` (the model directory, or the
    registry: :class:`.live_stats.RecallPublisher`) at most every ``publish_interval``
    seconds, by a task handed to ``submit`` (a thread pool's), and once more on
    :meth:`close`. Nothing here raises into a search or waits on Milvus or a file.
    """

    def __init__(self, metrics: NullMetrics = NULL_METRICS, *, recall_sample: float | None = None,
                 search: Callable | None = None, seed: int | None = None, publish_to=None,
                 submit: Callable | None = None, publish_interval: float = 30.0):
        rate = float(recall_sample or 0.0)
        if rate > 0 and search is None:
            raise ValueError("recall_sample needs an exact search")
        self.metrics = metrics
        self.live = LiveRecall(rate, exact_search(search) if search is not None else None,
                               metrics=metrics, seed=seed)
        self._search = search
        self.publisher = RecallPublisher(publish_to, interval=publish_interval) \
            if self.live.enabled and publish_to is not None else None
        self._submit = submit
        self._served: dict[str, dict] = {}        # collection -> the router its samples describe
        self._due: dict[str, float] = {}          # collection -> next publish (monotonic)
        self._publish_lock = threading.Lock()
        self._passthrough: dict[str, dict[str, int]] = {}   # collection -> "call:reason" -> n
        self._warned: set[tuple[str, str]] = set()

    @property
    def recall_sample(self) -> float:
        return self.live.rate

    def passed_through(self, collection: str, state: Routing | None, reason: str, *,
                       call: str = "search", warn: str = "") -> None:
        """A search passed to pymilvus untouched, for ``reason`` (labelled by the laid-out
        collection when ``state`` knows it, else by the name searched; a reason outside
        :data:`.metrics.PASSTHROUGH_REASONS` is labelled ``other``). On a laid-out collection
        it is also counted per ``call`` and reason (:meth:`passthrough_status`), and ``warn``
        (why the call cannot be routed) is said once per collection, call and reason: a
        ``RuntimeWarning`` and a log line."""
        name = collection if state is None else state.layout.collection
        if self.metrics.enabled:
            _record(self.metrics.search_passed_through, name, reason)
        if state is None:
            return
        key = f"{call}:{reason}"
        with self._publish_lock:
            counts = self._passthrough.setdefault(name, {})
            counts[key] = counts.get(key, 0) + 1
            first = warn and (name, key) not in self._warned
            if first:
                self._warned.add((name, key))
        if first:
            message = f"{call} on laid-out collection {name!r} is not routed ({reason}): {warn}"
            log.warning("%s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def passthrough_status(self, collection: str) -> dict:
        """Calls of ``collection`` (laid out) passed through unrouted so far, by
        ``"call:reason"`` (``router_status()["passthrough"]``)."""
        with self._publish_lock:
            return dict(self._passthrough.get(collection, {}))

    def routed(self, state: Routing, probed, routing_s: float, search_s: float) -> None:
        """A routed search returned: its queries' probed clusters, the router's time and the
        time of its requests in Milvus."""
        if self.metrics.enabled:
            _record(self.metrics.search_routed, state.layout.collection, len(probed),
                    probed_counts(probed), routing_s, search_s, state.router.kind)

    def failed(self, state: Routing) -> None:
        """A routed search raised to its caller."""
        if self.metrics.enabled:
            _record(self.metrics.search_failed, state.layout.collection)

    def audit(self, state: Routing, queries, result, *, limit: int, filter: str,
              recall_target: float | None, search_params=None, anns_field=None, timeout=None,
              kwargs: dict | None = None) -> int:
        """Offer a routed search's queries and ``result`` to the live recall estimate: the
        exact re-run gets the caller's filter, limit, search params, field, timeout and other
        keyword arguments (consistency level...), only the clusters are lifted. Returns how
        many queries were handed over (0 when off)."""
        if not self.live.enabled:
            return 0
        extra = {k: v for k, v in (kwargs or {}).items() if v is not None}
        for key, value in (("search_params", search_params), ("anns_field", anns_field),
                           ("timeout", timeout)):
            if value is not None:
                extra[key] = value
        n = self.live.offer(state, queries, result, limit=limit, filter=filter or "",
                            recall_target=recall_target, **extra)
        if n and self.publisher is not None:
            self._publish_when_due(state)
        return n

    def _publish_when_due(self, state: Routing) -> None:
        name = state.layout.collection
        now = time.monotonic()
        with self._publish_lock:
            self._served[name] = {"version": state.version, "kind": state.router.kind,
                                  "layout_id": state.layout.layout_id}
            if now < self._due.get(name, -np.inf):
                return
            self._due[name] = now + self.publisher.interval
        try:
            self._submit(self.publish, name)
        except Exception as exc:        # the client is closing: close() publishes
            log.debug("publishing the live recall of %r not scheduled: %s", name, exc)

    def publish(self, collection: str | None = None) -> None:
        """Publish the live recall of ``collection`` (None: of every sampled collection) to
        the model directory now; never raises (:class:`.live_stats.RecallPublisher`)."""
        if self.publisher is None:
            return
        with self._publish_lock:
            served = {c: dict(r) for c, r in self._served.items() if collection in (None, c)}
        for name, router in served.items():
            self.publisher.maybe_publish(name, self.live.status(name), force=True, **router)

    def status(self, collection: str) -> dict | None:
        """``router_status()["live_recall"]`` (None: ``recall_sample`` off)."""
        return self.live.status(collection)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every query handed to the live recall so far is re-run, then publish
        the estimates; True when every one was."""
        drained = self.live.flush(timeout)
        self.publish()
        return drained

    def close(self, timeout: float = 10.0) -> None:
        """Publish the last estimates, stop the live recall's worker and close its own
        connection (:class:`AuditConnection`) if it has one."""
        self.publish()
        self.live.close(timeout)
        if isinstance(self._search, AuditConnection):
            self._search.close()
