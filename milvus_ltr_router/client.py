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
from pymilvus.client.types import OmitZeroDict
from pymilvus.exceptions import DataNotMatchException, ParamError

from .clustering import as_vector_batch, assign_with_room, balanced_capacity
from .errors import InputError, OperationalError
from .layout import (Layout, cluster_of, cluster_sizes, current_layout_id, has_stray_partition,
                     laid_out_name, read_layout, stray_rows)
from .milvus_io import is_milvus_lite, key_list_literal, snapshot_timestamp
from .storage import DEFAULT_PARTITION, storage_status
from .querylog import QueryLogger
from .registry import ModelRegistry
from .router import BaseRouter, CentroidRouter, Router

log = logging.getLogger(__name__)


@dataclass
class _Routing:
    """What serves one collection right now (swapped whole, never mutated in place)."""

    layout: Layout
    router: BaseRouter
    version: str | None = None
    error: str = ""
    stamp: tuple | None = None
    failures: int = 0        # consecutive failed loads of the model dir/router (0: no error)
    retry_at: float = 0.0    # time.monotonic() after which an error state is re-read


class _ClusterSizes:
    """Rows per cluster of one size-bounded layout as one client knows them (routed writes).

    ``read`` is the last count read from Milvus (the layout's build-time sizes until the
    first read); ``routed`` the rows this client sent to each cluster since that read's
    snapshot; ``inflight`` those of them whose write has not returned yet. The estimate is
    ``read + routed``. Guarded by ``lock``; reads of the live sizes hold ``reading``.
    """

    def __init__(self, layout: Layout, ratio: float):
        self.layout_id = layout.layout_id
        self.ratio = float(ratio)
        self.read = np.asarray(layout.sizes, dtype=np.int64).copy()
        self.routed = np.zeros(layout.n_clusters, dtype=np.int64)
        self.inflight = np.zeros(layout.n_clusters, dtype=np.int64)
        self.read_at: float | None = None     # time.monotonic() of the last read's start
        self.checked_at: float | None = None  # ... of the last read or failed attempt
        self.lock = threading.Lock()
        self.reading = threading.Lock()       # held while a read runs (one at a time)

    def estimate(self) -> np.ndarray:
        return self.read + self.routed


def locate_keys(keys_in, keys: list, guesses: list[str], partitions: list[str]) -> dict:
    """Key -> the partitions that hold a row with that key, found with few queries.

    ``keys_in(keys, partitions)`` answers which of ``keys`` have a row in any of
    ``partitions``. Keys are grouped by their guessed partition; per group one query
    checks the guess and one the other partitions, and keys found elsewhere (rows not in
    their nearest cluster, stale copies) are located by halving those partitions (about
    ``log2(len(partitions))`` queries per such key, batched per half). A key found
    nowhere maps to no partition.
    """
    out: dict = {}

    def halve(group: list, parts: list[str]) -> None:
        if len(parts) == 1:
            for key in group:
                out.setdefault(key, set()).add(parts[0])
            return
        for half in (parts[:len(parts) // 2], parts[len(parts) // 2:]):
            hit = keys_in(group, half)
            if hit:
                halve([k for k in group if k in hit], half)

    by_guess: dict[str, list] = {}
    for key, part in zip(keys, guesses):
        by_guess.setdefault(part, []).append(key)
    for guess, group in by_guess.items():
        hit = keys_in(group, [guess]) if guess in partitions else set()
        for key in group:
            if key in hit:
                out.setdefault(key, set()).add(guess)
        rest = [p for p in partitions if p != guess]
        elsewhere = keys_in(group, rest) if rest else set()
        if elsewhere:
            halve([k for k in group if k in elsewhere], rest)
    return out


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
    see :meth:`insert`).
    """

    def __init__(self, uri: str = "http://localhost:19530", user: str = "", password: str = "",
                 db_name: str = "", token: str = "", timeout: float | None = None, *,
                 model_dir: str = "onnx_models", nprobe: int | None = None, log_rate: float = 0.01,
                 log_ttl_seconds: int | None = None, reload_interval: float = 10.0,
                 max_workers: int = 8, log_queue_size: int = 1000, router_threads: int = 1,
                 seed: int | None = None, size_refresh_interval: float | None = None, **kwargs):
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
        self._strays: dict[str, tuple[int, float]] = {}   # collection -> (_default rows, checked)
        self.size_refresh_interval = reload_interval if size_refresh_interval is None \
            else size_refresh_interval
        self._sizes: dict[str, _ClusterSizes] = {}   # collection -> sizes of its bounded layout
        self._sizes_lock = threading.Lock()
        self._lite: bool | None = None
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
                try:
                    state = self._refresh(collection, cached[0] if cached else None)
                except Exception as exc:
                    if cached is None:
                        raise           # nothing known yet: the caller sees Milvus's error
                    # Milvus unreachable or a layout being rewritten: keep routing as before
                    # (the search itself reports an outage) and check again next interval.
                    log.warning("re-checking the routing of %r failed (%s: %s); keeping the "
                                "current layout and router", collection, type(exc).__name__, exc)
                    state = cached[0]
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
        try:
            stamp = self.registry.pointer_stamp(layout.collection)
        except Exception as exc:        # model dir is a file, unreadable...: _load_router reports it
            stamp = ("unreadable", str(exc))
        if old is not None and old.layout is layout and stamp == old.stamp and \
                (not old.failures or time.monotonic() < old.retry_at):
            return old                  # unchanged; an error state is re-read after its backoff
        return self._load_router(layout, stamp, old)

    def _load_router(self, layout: Layout, stamp, old: _Routing | None = None) -> _Routing:
        """The published router for ``layout``, or centroid routing with the reason why not.

        Never raises for a model-dir, pointer or router-file problem: it is logged and
        served by centroids, and read again after a backoff that doubles per consecutive
        failure (``registry.retry_delay``) even if the pointer did not change, so a fixed
        file (or a transient read error) recovers without a new publish.
        """
        from .registry import retry_delay
        current = None
        try:
            current = self.registry.current(layout.collection)
            if current is None:
                return _Routing(layout, CentroidRouter(layout), None, "no router published", stamp)
            router = Router.load(current.path, layout=layout, num_threads=self.router_threads)
        except Exception as exc:        # whatever is wrong on disk must not fail searches
            what = f"router {current.version}" if current is not None else "router pointer"
            error = f"{what} of {layout.collection!r} is unusable: {exc}"
        else:
            log.info("serving router %s for %r", current.version, layout.collection)
            return _Routing(layout, router, current.version, "", stamp)
        same_layout = old is not None and old.layout is layout
        failures = old.failures + 1 if same_layout else 1
        delay = retry_delay(failures, self.reload_interval)
        log.warning("%s; routing %r by centroids (failure %d, next check in %.0f s)",
                    error, layout.collection, failures, delay)
        fallback = old.router if same_layout and isinstance(old.router, CentroidRouter) \
            else CentroidRouter(layout)
        return _Routing(layout, fallback, None, error, stamp, failures, time.monotonic() + delay)

    def reload_router(self, collection_name: str) -> dict:
        """Re-read the layout and the published router now instead of at the next interval;
        for a size-bounded layout also the live cluster sizes that routed writes go by."""
        with self._routing_lock:
            self._routing.pop(collection_name, None)
            self._strays.clear()        # rows outside the layout: counted again too
        state = self._state(collection_name)
        sizes = None if state is None else self._cluster_sizes(state)
        if sizes is not None:
            with sizes.reading:
                self._read_sizes(state.layout, sizes)
        return self.router_status(collection_name)

    def router_status(self, collection_name: str) -> dict:
        """How ``collection_name`` is routed: ``learned``, ``centroid`` (fallback) or ``none``;
        ``adaptive`` says whether ``recall_target`` is calibrated (None: served as fixed nprobe);
        ``rows_outside_layout`` counts rows written around the layout (searched until
        ``repair-layout`` moves them; -1: could not be counted); ``balance`` is the size bound
        routed writes keep (None: the layout has none; see :meth:`insert`); ``failures``
        counts consecutive failed reads of the model dir or router (with ``error`` the last
        reason) and ``next_check_s`` is how long until it is read again (None: no error)."""
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
                "storage": storage_status(state.layout.storage),
                "adaptive": adaptive, "balance": self._balance_status(state), "error": state.error,
                "failures": state.failures,
                "next_check_s": max(0.0, state.retry_at - time.monotonic()) if state.failures
                else None,
                "rows_outside_layout": self._stray_count(state), "query_log": stats}

    def _balance_status(self, state: _Routing) -> dict | None:
        """The size bound routed writes keep: ``capacity`` for the ``rows`` this client counts,
        the ``largest`` cluster it counts, and the age of its last read of the live sizes
        (``sizes_age_s`` None: still the layout's build-time sizes). Reads nothing."""
        sizes = self._cluster_sizes(state)
        if sizes is None:
            return None
        with sizes.lock:
            est, read_at = sizes.estimate(), sizes.read_at
        rows = int(est.sum())
        return {"max_cluster_ratio": sizes.ratio,
                "capacity": balanced_capacity(rows, len(est), sizes.ratio), "rows": rows,
                "largest": int(est.max()),
                "sizes_age_s": None if read_at is None else time.monotonic() - read_at}

    def _default_nprobe(self, state: _Routing) -> int:
        n = self.nprobe or getattr(state.router, "default_nprobe", None) or 8
        return min(n, state.layout.n_partitions)

    # ------------------------------------------------------------------ routing
    def router(self, collection_name: str) -> BaseRouter | None:
        """The router serving ``collection_name`` now (learned, or the centroid fallback);
        None when the collection has no layout."""
        state = self._state(collection_name)
        return None if state is None else state.router

    def layout(self, collection_name: str) -> Layout | None:
        """The layout ``collection_name`` (or the collection an alias names) is routed by."""
        state = self._state(collection_name)
        return None if state is None else state.layout

    def route(self, collection_name: str, data, *, nprobe: int | None = None,
              recall_target: float | None = None, min_nprobe: int = 1,
              max_nprobe: int | None = None) -> list[list[int]]:
        """The clusters a routed search of ``data`` probes, per query, best first.

        Cluster indices into ``layout(collection_name).partition_names``; what
        :meth:`search` would search with the same arguments (nothing is searched
        or logged). Raises ``ValueError`` for a collection without a layout.
        """
        state = self._state(collection_name)
        if state is None:
            raise ValueError(f"collection {collection_name!r} has no layout; nothing to route")
        queries = self._query_matrix(state, data, one_vector_ok=True)
        return [row.tolist() for row in self._probe(state, queries, nprobe, recall_target,
                                                    min_nprobe, max_nprobe)]

    def _query_matrix(self, state: _Routing, data, one_vector_ok: bool = False) -> np.ndarray:
        """``data`` as a float32 [nq, dim] matrix, or pymilvus's error for the same mistake."""
        try:
            queries = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise RoutedParamError(f"search data for {state.layout.collection!r} is not a list of "
                                   f"float vectors: {exc}") from exc
        if queries.ndim == 1 and one_vector_ok and len(queries):
            queries = queries[None, :]
        if queries.ndim != 2 or len(queries) == 0 or queries.shape[1] != state.layout.dim:
            raise RoutedParamError(f"search data of shape {queries.shape} does not match collection "
                                   f"{state.layout.collection!r}: expected a non-empty list of "
                                   f"vectors of dim {state.layout.dim}")
        return queries

    def _probe(self, state: _Routing, queries: np.ndarray, nprobe, recall_target, min_nprobe,
               max_nprobe):
        if recall_target is not None and not state.router.recall_thresholds:
            # centroid fallback (or an old router) has no recall calibration: a fixed nprobe
            # keeps searches working rather than failing them
            log.warning("router of %r has no recall calibration; recall_target=%s served with "
                        "nprobe=%d", state.layout.collection, recall_target, self._default_nprobe(state))
            recall_target = None
        if recall_target is not None:
            return state.router.rank_adaptive(queries, recall_target, min_nprobe, max_nprobe)
        return state.router.rank(queries, self._default_nprobe(state) if nprobe is None else nprobe)

    def _is_lite(self) -> bool:
        """milvus-lite (asked once): its upsert and delete act on every partition."""
        if self._lite is None:
            self._lite = is_milvus_lite(self)
        return self._lite

    def _stray_partition(self, state: _Routing) -> str | None:
        """``_default`` while it holds rows outside the layout's partitions (written around the
        layout, e.g. by a plain MilvusClient): routed searches include it so no row is invisible
        until ``milvus-ltr-router repair-layout`` moves them. Re-checked every reload interval."""
        return DEFAULT_PARTITION if self._stray_count(state) != 0 else None

    def _stray_count(self, state: _Routing) -> int:
        """Rows outside the layout's partitions (0: none or none possible; -1: unknown)."""
        if not has_stray_partition(state.layout):
            return 0
        name = state.layout.collection
        cached = self._strays.get(name)
        if cached is None or time.monotonic() - cached[1] >= self.reload_interval:
            try:
                count = stray_rows(self, state.layout)
            except Exception:           # unknown: search it rather than risk hiding rows
                count = -1
            cached = (count, time.monotonic())
            self._strays[name] = cached
        return cached[0]

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

        Passes through untouched when the collection has no layout, when the
        caller names ``partition_names`` or another ``anns_field``, searches by
        ``ids``, or passes pymilvus's later parameters positionally (``ranker``, ...).
        The plugin's own parameters are keyword-only.
        """
        state = None
        if partition_names is None and kwargs.get("ids") is None and data is not None and not args:
            state = self._state(collection_name)
        if state is not None and anns_field not in (None, "", state.layout.vector_field):
            state = None
        if state is None:
            return super().search(collection_name, data, filter, limit, output_fields, search_params,
                                  timeout, partition_names, anns_field, *args, **kwargs)
        queries = self._query_matrix(state, data)
        probed = self._probe(state, queries, nprobe, recall_target, min_nprobe, max_nprobe)
        self._log_queries(state.layout.collection, queries)
        groups: dict[tuple, list[int]] = {}      # queries that probe the same clusters share a call
        for i, row in enumerate(probed):
            groups.setdefault(tuple(sorted(row.tolist())), []).append(i)
        storage, stray = state.layout.storage, self._stray_partition(state)
        sup = super()

        def run(clusters: tuple, rows: list[int]):
            parts, expr = storage.search_target(clusters, filter)
            if stray is not None and parts is not None:
                parts = parts + [stray]
            return sup.search(collection_name, data=queries[rows].tolist(), filter=expr, limit=limit,
                              output_fields=output_fields, search_params=search_params,
                              timeout=timeout, partition_names=parts,
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
        """``MilvusClient.insert``, each row stored in its cluster (see ``_routed_write``).

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
        return self._routed_write("upsert", collection_name, data, timeout, partition_name, **kwargs)

    def _routed_write(self, kind: str, collection_name, data, timeout, partition_name, **kwargs):
        """Each row to its cluster: the cluster's partition, and its id in the cluster-id field.

        An upsert keeps one row per primary key: where a key's new vector belongs
        to another partition than its stored row, the new row is written first
        and the old copy is then deleted from its old partition (Milvus servers
        upsert within one partition only; milvus-lite's upsert already replaces
        the key in every partition). A key given twice in one upsert keeps its
        last row, as within one Milvus request.
        """
        write = super().insert if kind == "insert" else super().upsert
        state = None if partition_name else self._state(collection_name)
        if state is None:
            return write(collection_name, data, timeout=timeout, partition_name=partition_name or "",
                         **kwargs)
        layout, storage = state.layout, state.layout.storage
        rows = [data] if isinstance(data, dict) else list(data)
        if not rows:
            return write(collection_name, rows, timeout=timeout, **kwargs)
        field, pk = layout.vector_field, layout.primary_field
        missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or r.get(field) is None]
        if missing:
            raise RoutedDataError(f"rows {missing[:5]} have no vector field {field!r}; a laid-out "
                                  f"collection needs it to pick each row's cluster")
        if kind == "upsert":        # the last row of a key wins, and lands in one partition only
            last = {r[pk]: i for i, r in enumerate(rows) if pk in r}
            rows = [r for i, r in enumerate(rows) if pk not in r or last[r[pk]] == i]
        try:
            vectors = as_vector_batch([r[field] for r in rows], layout.dim, f"layout {layout.layout_id}")
        except ValueError as exc:
            raise RoutedDataError(f"rows for {collection_name!r}: {exc}") from exc
        bound = self._cluster_sizes(state)
        # where stored copies of the keys are, found before anything is written (a failure
        # here writes nothing and counts nothing against the size bound)
        old_parts = self._stored_partitions(state, rows, timeout) \
            if kind == "upsert" and storage.mode != "single" and not self._is_lite() else {}
        clusters = self._assign_rows(state, bound, vectors)
        if storage.cluster_field is not None:
            rows = [{**r, storage.cluster_field: int(c)} for r, c in zip(rows, clusters)]
        by_partition: dict[str, list[int]] = {}
        for i, c in enumerate(clusters):
            by_partition.setdefault(storage.write_partition(c), []).append(i)
        total, cost, ids, done = 0, 0, [None] * len(rows), []
        try:
            for part, idx in by_partition.items():
                try:
                    res = write(collection_name, [rows[i] for i in idx], timeout=timeout,
                                partition_name=part, **kwargs)
                except Exception as exc:
                    if not done:            # nothing written: the caller sees what pymilvus raised
                        raise
                    written_rows = [i for p in done for i in by_partition[p]]
                    cleaned = ""
                    try:                    # keys that did move keep one row: drop their old copy
                        self._delete_moved(collection_name, layout, [rows[i] for i in written_rows],
                                           clusters[written_rows], old_parts, timeout)
                    except Exception as clean_exc:
                        cleaned = (f"; deleting the old copies of the written keys failed too "
                                   f"({clean_exc}): repeat the upsert to remove them")
                    raise WriteError(f"{kind} into {collection_name!r} failed at partition "
                                     f"{part or DEFAULT_PARTITION!r} after {len(written_rows)} of "
                                     f"{len(rows)} rows were written (into {done or 'none'}): "
                                     f"{exc}{cleaned}",
                                     written=len(written_rows), partitions_done=done) from exc
                total += res.get("insert_count", res.get("upsert_count", len(idx)))
                cost += res.get("cost", 0) or 0
                for i, pk in zip(idx, res.get("ids", []) or []):
                    ids[i] = pk
                done.append(part)
        finally:
            if bound is not None:
                self._written(bound, clusters, [i for p in done for i in by_partition[p]])
        try:
            self._delete_moved(collection_name, layout, rows, clusters, old_parts, timeout)
        except Exception as exc:
            raise WriteError(f"{kind} into {collection_name!r} wrote all {len(rows)} rows, but "
                             f"deleting the old copies of keys that moved to another partition "
                             f"failed; repeat the upsert to remove them: {exc}",
                             written=len(rows), partitions_done=done) from exc
        key = "upsert_count" if kind == "upsert" else "insert_count"
        return OmitZeroDict({key: total, "ids": ids, "cost": cost})

    # ------------------------------------------------------------------ size bound
    def _cluster_sizes(self, state: _Routing) -> _ClusterSizes | None:
        """This client's cluster sizes of a layout built with a size bound (None: no bound)."""
        ratio = state.layout.extra.get("max_cluster_ratio")
        if ratio is None:
            return None
        name = state.layout.collection
        with self._sizes_lock:
            sizes = self._sizes.get(name)
            if sizes is None or sizes.layout_id != state.layout.layout_id:   # new or rebuilt
                sizes = self._sizes[name] = _ClusterSizes(state.layout, ratio)
        return sizes

    def _assign_rows(self, state: _Routing, bound: _ClusterSizes | None,
                     vectors: np.ndarray) -> np.ndarray:
        """Cluster of each written row: its nearest, or under a size bound its nearest with
        room (then counted as routed, and in flight until :meth:`_written`)."""
        layout = state.layout
        if bound is None:
            return cluster_of(layout, vectors)
        if bound.checked_at is None:        # this client's first routed write: read sizes first
            with bound.reading:
                if bound.checked_at is None:
                    try:
                        self._read_sizes(layout, bound)
                    except Exception as exc:
                        bound.checked_at = time.monotonic()
                        log.warning("reading the cluster sizes of %r failed (%s: %s); routed "
                                    "writes go by its build-time sizes for now", layout.collection,
                                    type(exc).__name__, exc)
        with bound.lock:
            clusters, _ = assign_with_room(vectors, layout.centroids, layout.algorithm,
                                           bound.estimate(), bound.ratio)
            counts = np.bincount(clusters, minlength=layout.n_clusters)
            bound.routed += counts
            bound.inflight += counts
        self._refresh_sizes_when_due(layout, bound)
        return clusters

    @staticmethod
    def _written(bound: _ClusterSizes, clusters: np.ndarray, written: list[int]) -> None:
        """A routed write returned: its rows are no longer in flight, and rows it did not
        write (a failed request) are no longer counted."""
        k = len(bound.routed)
        sent = np.bincount(clusters, minlength=k)
        landed = np.bincount(clusters[np.asarray(written, dtype=np.int64)], minlength=k)
        with bound.lock:
            bound.inflight -= sent
            bound.routed -= sent - landed

    def _refresh_sizes_when_due(self, layout: Layout, bound: _ClusterSizes) -> None:
        """Re-read the live sizes in the background when the last read (or failed attempt)
        is ``size_refresh_interval`` old. Writes do not wait for it: they go by the estimate."""
        checked = bound.checked_at
        if checked is not None and time.monotonic() - checked < self.size_refresh_interval:
            return
        if not bound.reading.acquire(blocking=False):
            return                              # a read is under way
        bound.checked_at = time.monotonic()

        def read():
            try:
                self._read_sizes(layout, bound)
            except Exception as exc:            # keep the estimate; try again next interval
                log.warning("reading the cluster sizes of %r failed (%s: %s); routed writes go "
                            "by this client's estimate", layout.collection, type(exc).__name__, exc)
            finally:
                bound.reading.release()
        try:
            self._pool.submit(read)
        except RuntimeError:                    # the client is closing: no read
            bound.reading.release()

    def _read_sizes(self, layout: Layout, bound: _ClusterSizes) -> None:
        """Replace the estimate's base by the live sizes (the caller holds ``bound.reading``).

        Rows this client wrote before the read began are in it and leave ``routed``; rows in
        flight then, or routed later, stay counted (one may then count twice until the next
        read: the bound errs on the strict side)."""
        with bound.lock:
            done = bound.routed - bound.inflight
        started = time.monotonic()
        live = self._live_cluster_sizes(layout)
        with bound.lock:
            bound.read = live
            bound.routed -= done
            bound.read_at = bound.checked_at = started

    def _live_cluster_sizes(self, layout: Layout) -> np.ndarray:
        """Rows in each cluster now, including rows not flushed yet.

        On a server, partition statistics leave out rows not flushed yet, so partition storage
        is counted by ``count(*)`` per partition at one snapshot timestamp; the field storage
        modes read only the cluster-id column (:func:`.layout.cluster_sizes`)."""
        if layout.storage.cluster_field is None and not self._is_lite():
            ts = snapshot_timestamp()
            return np.asarray([int(self.query(layout.collection, filter="", output_fields=["count(*)"],
                                              partition_names=[p], consistency_level="Customized",
                                              guarantee_timestamp=ts)[0]["count(*)"])
                               for p in layout.partition_names], dtype=np.int64)
        return cluster_sizes(self, layout)

    def _stored_partitions(self, state: _Routing, rows: list[dict], timeout) -> dict:
        """Primary key -> partitions holding a stored row with that key (before an upsert)."""
        layout, storage = state.layout, state.layout.storage
        pk = layout.primary_field
        keys = [r[pk] for r in rows if pk in r]
        if not keys:
            return {}
        expr = f"{pk} in {key_list_literal(keys)}"
        if storage.cluster_field is not None:
            found = self.query(layout.collection, filter=expr, output_fields=[pk, storage.cluster_field],
                               timeout=timeout, consistency_level="Strong")
            out: dict = {}
            n = layout.n_partitions
            for r in found:
                c = r[storage.cluster_field]
                # an id outside the layout was not written by a routed client: look in _default
                part = storage.write_partition(c) if isinstance(c, int) and 0 <= c < n \
                    else DEFAULT_PARTITION
                out.setdefault(r[pk], set()).add(part)
            if found and self._stray_partition(state):  # _default holds rows written around it
                for key in self._keys_in(layout, sorted(out), [DEFAULT_PARTITION], timeout):
                    out[key].add(DEFAULT_PARTITION)
            return out
        # partition storage: Milvus does not say which partition a row is in. Only partitions
        # where the key is found now may be cleaned after the write: deleting it from every
        # other partition would also delete a concurrent writer's new copy (two upserts of one
        # key to two clusters would leave none). Each stored row is looked for first in the
        # partition of its stored vector's nearest cluster, the rest by halving the partitions.
        found = self.query(layout.collection, filter=expr, output_fields=[pk, layout.vector_field],
                           timeout=timeout, consistency_level="Strong")
        if not found:
            return {}
        guess = cluster_of(layout, np.asarray([r[layout.vector_field] for r in found],
                                              dtype=np.float32))
        candidates = [storage.write_partition(int(c)) or DEFAULT_PARTITION for c in guess]
        every = sorted(set(storage.partitions) | {DEFAULT_PARTITION})
        return locate_keys(lambda keys, parts: self._keys_in(layout, keys, parts, timeout),
                           [r[pk] for r in found], candidates, every)

    def _keys_in(self, layout: Layout, keys: list, partitions: list[str], timeout) -> set:
        """Which of ``keys`` have a row in any of ``partitions`` (a Strong query)."""
        pk = layout.primary_field
        rows = self.query(layout.collection, filter=f"{pk} in {key_list_literal(keys)}",
                          output_fields=[pk], partition_names=list(partitions), timeout=timeout,
                          consistency_level="Strong")
        return {r[pk] for r in rows}

    def _delete_moved(self, collection_name, layout: Layout, rows, clusters, old_parts: dict,
                      timeout) -> None:
        """Delete the stale copy of every upserted key from partitions other than its new one."""
        if not old_parts:
            return
        pk, storage = layout.primary_field, layout.storage
        stale: dict[str, list] = {}
        for r, c in zip(rows, clusters):
            new = storage.write_partition(c)
            for part in old_parts.get(r.get(pk), ()):
                if (part or DEFAULT_PARTITION) != (new or DEFAULT_PARTITION):
                    stale.setdefault(part or DEFAULT_PARTITION, []).append(r[pk])
        for part, keys in stale.items():
            super().delete(collection_name, filter=f"{pk} in {key_list_literal(keys)}",
                           partition_name=part, timeout=timeout)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
        self._pool.shutdown(wait=True)
        super().close()


class RoutedParamError(InputError, ParamError):
    """Bad search input on a laid-out collection: both what pymilvus raises for the same
    mistake (``ParamError``, a ``MilvusException``) and the plugin's ``InputError``."""

    def __init__(self, message: str):
        ParamError.__init__(self, message=message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


class RoutedDataError(InputError, DataNotMatchException):
    """A written row that does not fit a laid-out collection (pymilvus: DataNotMatchException)."""

    def __init__(self, message: str):
        DataNotMatchException.__init__(self, message=message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


class WriteError(OperationalError):
    """A routed insert/upsert that failed part-way: ``written`` rows landed, in
    ``partitions_done``; the rest did not."""

    def __init__(self, message: str, written: int = 0, partitions_done: list | None = None):
        super().__init__(message)
        self.written = written
        self.partitions_done = list(partitions_done or [])


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
