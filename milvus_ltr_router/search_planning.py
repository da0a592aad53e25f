"""How one routed client splits its searches into requests, and what it counted doing so.

The decisions are the routing core's (:func:`.plan.plan_search`, and
:func:`.batching.plan_batches` under a cost model); a :class:`SearchPlanner` keeps what a
client needs around them: the storage facts the batch planner goes by (the build-time
sizes at first, re-read in the background every ``reload_interval``, so a search never
waits for them) and the counts ``router_status()`` reports under ``batches``. It does no
I/O on the caller's path, so the sync and the asyncio client can both call it inline.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from .batching import BatchPlan, CostModel, StorageFacts, max_queries_for, plan_batches, \
    resolve_cost_model
from .layout import Layout, live_sizes
from .plan import SearchPlan, group_by_clusters, plan_search

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
