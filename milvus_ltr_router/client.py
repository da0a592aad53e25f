"""``RoutedMilvusClient``: pymilvus's ``MilvusClient`` with learned partition routing.

Switching is one line: ``MilvusClient(uri=...)`` -> ``RoutedMilvusClient(uri=...)``.
For a collection with a layout, :meth:`search` routes every query to its best
``nprobe`` partitions and searches only those; :meth:`insert` and
:meth:`upsert` put each row in the partition of its cluster. Every other
method, and every collection without a layout, behaves exactly as in pymilvus.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymilvus import MilvusClient

from .layout import Layout, assign, current_layout_id, laid_out_name, read_layout
from .querylog import QueryLogger
from .registry import ModelRegistry
from .router import BaseRouter, CentroidRouter, Router, RouterError

log = logging.getLogger(__name__)


@dataclass
class _Routing:
    """What serves one collection right now (swapped whole, never mutated in place)."""

    layout: Layout
    router: BaseRouter
    version: str | None = None
    error: str = ""
    stamp: tuple | None = None


class RoutedMilvusClient(MilvusClient):
    """A drop-in ``MilvusClient`` that routes searches to the partitions a router picks.

    Extra keyword arguments (all optional): ``model_dir`` where routers are
    published, ``nprobe`` default partitions per query (else the router's own
    default, else 8), ``log_rate`` fraction of search vectors written to the
    query log (0 disables), ``log_ttl_seconds``, ``reload_interval`` seconds
    between checks for a newly published router, ``max_workers`` concurrent
    partition-restricted searches, ``log_queue_size``, ``router_threads``.
    """

    def __init__(self, uri: str = "http://localhost:19530", user: str = "", password: str = "",
                 db_name: str = "", token: str = "", timeout: float | None = None, *,
                 model_dir: str = "onnx_models", nprobe: int | None = None, log_rate: float = 0.01,
                 log_ttl_seconds: int | None = None, reload_interval: float = 10.0,
                 max_workers: int = 8, log_queue_size: int = 1000, router_threads: int = 1,
                 seed: int | None = None, **kwargs):
        super().__init__(uri=uri, user=user, password=password, db_name=db_name, token=token,
                         timeout=timeout, **kwargs)
        if not 0.0 <= log_rate <= 1.0:
            raise ValueError(f"log_rate must be in [0, 1], got {log_rate}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.registry = ModelRegistry(model_dir)
        self.nprobe = nprobe
        self.log_rate = log_rate
        self.reload_interval = reload_interval
        self.router_threads = router_threads
        self._rng = np.random.default_rng(seed)
        self._routing: dict[str, tuple[_Routing | None, float]] = {}   # name -> (state, checked)
        self._routing_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ltr-search")
        self._logger = QueryLogger(self, max_queue=log_queue_size, ttl_seconds=log_ttl_seconds) \
            if log_rate > 0 else None

    # ------------------------------------------------------------------ routing state
    def _state(self, collection: str) -> _Routing | None:
        """Current routing of ``collection`` (None: no layout), re-checked every interval.

        A check re-resolves aliases, re-reads the layout id (a rebuilt layout is
        noticed) and stats the router pointer; swaps replace the whole record, so
        in-flight searches keep the router they started with.
        """
        cached = self._routing.get(collection)
        if cached is not None and time.monotonic() - cached[1] < self.reload_interval:
            return cached[0]
        with self._routing_lock:
            cached = self._routing.get(collection)
            if cached is None or time.monotonic() - cached[1] >= self.reload_interval:
                state = self._refresh(collection, cached[0] if cached else None)
                cached = (state, time.monotonic())
                self._routing[collection] = cached
            return cached[0]

    def _refresh(self, collection: str, old: _Routing | None) -> _Routing | None:
        name = laid_out_name(self, collection)      # one alias resolution per check
        if name is None:
            return None
        if old is not None and old.layout.collection == name and \
                current_layout_id(self, name) == old.layout.layout_id:
            layout = old.layout
        else:
            layout = read_layout(self, collection)
        stamp = self.registry.pointer_stamp(layout.collection)
        if old is not None and old.layout is layout and stamp == old.stamp:
            return old
        return self._load_router(layout, stamp)

    def _load_router(self, layout: Layout, stamp) -> _Routing:
        """The published router for ``layout``, or centroid routing with the reason why not."""
        try:
            current = self.registry.current(layout.collection)
        except Exception as exc:
            current, error = None, str(exc)
        else:
            error = "" if current else "no router published"
        if current is not None:
            try:
                router = Router.load(current.path, layout=layout, num_threads=self.router_threads)
                log.info("serving router %s for %r", current.version, layout.collection)
                return _Routing(layout, router, current.version, "", stamp)
            except RouterError as exc:
                error = str(exc)
                log.warning("router %s for %r unusable, falling back to centroid routing: %s",
                            current.version, layout.collection, exc)
        return _Routing(layout, CentroidRouter(layout), None, error, stamp)

    def reload_router(self, collection_name: str) -> dict:
        """Re-read the layout and the published router now instead of at the next interval."""
        with self._routing_lock:
            self._routing.pop(collection_name, None)
        return self.router_status(collection_name)

    def router_status(self, collection_name: str) -> dict:
        """How ``collection_name`` is routed: ``learned``, ``centroid`` (fallback) or ``none``;
        ``adaptive`` says whether ``recall_target`` is calibrated (None: served as fixed nprobe)."""
        state = self._state(collection_name)
        stats = vars(self._logger.stats).copy() if self._logger else {}
        if state is None:
            return {"collection": collection_name, "mode": "none", "query_log": stats}
        table = state.router.recall_thresholds
        adaptive = None if not table else {      # what recall_target can ask for
            "stopping_model": state.router.stopping_model is not None,
            "adaptive_head": state.router.has_adaptive_head,
            "max_recall": max(recall for _, recall, _ in table),
            "temperature": state.router.temperature}
        return {"collection": state.layout.collection, "mode": state.router.kind,
                "version": state.version, "layout_id": state.layout.layout_id,
                "n_partitions": state.layout.n_partitions, "nprobe": self._default_nprobe(state),
                "adaptive": adaptive, "error": state.error, "query_log": stats}

    def _default_nprobe(self, state: _Routing) -> int:
        n = self.nprobe or getattr(state.router, "default_nprobe", None) or 8
        return min(n, state.layout.n_partitions)

    # ------------------------------------------------------------------ search
    def search(self, collection_name: str, data=None, filter: str = "", limit: int = 10,
               output_fields=None, search_params=None, timeout=None, partition_names=None,
               anns_field=None, nprobe: int | None = None, recall_target: float | None = None,
               min_nprobe: int = 1, max_nprobe: int | None = None, **kwargs):
        """``MilvusClient.search``, restricted per query to the partitions the router picks.

        ``nprobe`` fixes the partitions per query; ``recall_target`` (e.g. 0.95)
        instead probes, per query, the partitions whose predicted share of its
        neighbours reaches the threshold that met that recall@k on held-out
        queries at retrain time, between ``min_nprobe`` and ``max_nprobe``.

        Passes through untouched when the collection has no layout, when the
        caller names ``partition_names`` or another ``anns_field``, or searches by ``ids``.
        """
        state = None
        if partition_names is None and kwargs.get("ids") is None and data is not None:
            state = self._state(collection_name)
        if state is not None and anns_field not in (None, "", state.layout.vector_field):
            state = None
        if state is None:
            return super().search(collection_name, data=data, filter=filter, limit=limit,
                                  output_fields=output_fields, search_params=search_params,
                                  timeout=timeout, partition_names=partition_names,
                                  anns_field=anns_field, **kwargs)
        queries = np.asarray(data, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != state.layout.dim:
            raise ValueError(f"search vectors of dimension {queries.shape[-1]} do not match "
                             f"collection {state.layout.collection!r} dim={state.layout.dim}")
        if recall_target is not None and not state.router.recall_thresholds:
            # centroid fallback (or an old router) has no recall calibration: a fixed nprobe
            # keeps searches working rather than failing them
            log.warning("router of %r has no recall calibration; recall_target=%s served with "
                        "nprobe=%d", state.layout.collection, recall_target, self._default_nprobe(state))
            recall_target = None
        if recall_target is not None:
            probed = state.router.rank_adaptive(queries, recall_target, min_nprobe, max_nprobe)
        else:
            probed = state.router.rank(queries, self._default_nprobe(state) if nprobe is None else nprobe)
        self._log_queries(state.layout.collection, queries)
        groups: dict[tuple, list[int]] = {}      # queries that probe the same partitions share a call
        for i, row in enumerate(probed):
            groups.setdefault(tuple(sorted(row.tolist())), []).append(i)
        names = state.layout.partition_names
        sup = super()

        def run(parts: tuple, rows: list[int]):
            return sup.search(collection_name, data=queries[rows].tolist(), filter=filter, limit=limit,
                              output_fields=output_fields, search_params=search_params,
                              timeout=timeout, partition_names=[names[p] for p in parts],
                              anns_field=anns_field, **kwargs)

        items = list(groups.items())
        if len(items) == 1:
            results = [run(*items[0])]
        else:
            results = list(self._pool.map(lambda kv: run(*kv), items))
        return _merge_results(results, [rows for _, rows in items], len(queries))

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
        return self._routed_write(super().insert, collection_name, data, timeout, partition_name,
                                  **kwargs)

    def upsert(self, collection_name: str, data, timeout=None, partition_name: str | None = "",
               **kwargs):
        return self._routed_write(super().upsert, collection_name, data, timeout, partition_name,
                                  **kwargs)

    def _routed_write(self, write, collection_name, data, timeout, partition_name, **kwargs):
        state = None if partition_name else self._state(collection_name)
        if state is None:
            return write(collection_name, data, timeout=timeout, partition_name=partition_name or "",
                         **kwargs)
        rows = [data] if isinstance(data, dict) else list(data)
        field = state.layout.vector_field
        missing = [i for i, r in enumerate(rows) if field not in r]
        if missing:
            raise ValueError(f"rows {missing[:5]} have no vector field {field!r}; a laid-out "
                             f"collection needs it to pick each row's partition")
        targets = assign(state.layout, np.asarray([r[field] for r in rows], dtype=np.float32))
        by_partition: dict[str, list[int]] = {}
        for i, p in enumerate(targets):
            by_partition.setdefault(p, []).append(i)
        total, ids = 0, [None] * len(rows)
        for p, idx in by_partition.items():
            res = write(collection_name, [rows[i] for i in idx], timeout=timeout, partition_name=p,
                        **kwargs)
            count = res.get("insert_count", res.get("upsert_count", len(idx)))
            total += count
            for i, pk in zip(idx, res.get("ids", []) or []):
                ids[i] = pk
        key = "upsert_count" if write.__name__ == "upsert" else "insert_count"
        return {key: total, "ids": ids}

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
        self._pool.shutdown(wait=True)
        super().close()


def _merge_results(results: list, row_groups: list[list[int]], n_queries: int):
    """One ``SearchResult`` in query order from per-group results (same type and extras)."""
    hits: list[Any] = [None] * n_queries
    for res, rows in zip(results, row_groups):
        for r, h in zip(rows, res):
            hits[r] = h
    merged = copy.copy(results[0])
    merged[:] = hits
    extra = getattr(merged, "extra", None)
    if isinstance(extra, dict) and "cost" in extra:
        merged.extra = dict(extra, cost=sum(getattr(r, "extra", {}).get("cost", 0) for r in results))
    return merged
