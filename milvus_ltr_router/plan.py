"""The routing core for searches: what a routed client decides, with no Milvus calls.

The way ``h11`` and ``hyper-h2`` keep a protocol apart from its sockets, the routing core
(this module for searches, :mod:`.placement` for writes) holds every decision a routed
client makes as plain functions and classes over arrays and request descriptions; the
clients (:mod:`.client`, and any other shell: an asyncio one, a batch planner) perform
the I/O these decisions name. Nothing here imports pymilvus or talks to Milvus, so every
decision is unit-tested without a server::

    queries = query_matrix(data, layout.dim, layout.collection)
    probed = probe_clusters(router, queries, default, nprobe=8)      # clusters per query
    plan = plan_search(layout, probed, caller_filter, limit=10)      # requests to send
    results = [search(r.take(queries), r.partition_names, r.filter) for r in plan.requests]
    hits = merge(plan, results)                                      # one result, query order
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .storage import Storage

log = logging.getLogger(__name__)

FALLBACK_NPROBE = 8            # clusters per query when neither client nor router names one
LARGER_IS_BETTER = ("IP", "COSINE")


class QueryInputError(InputError):
    """Search data that does not fit a laid-out collection (the shells re-raise it as
    pymilvus's ``ParamError``: see :class:`.serving.RoutedParamError`)."""


# --------------------------------------------------------------------------- clusters per query
def query_matrix(data, dim: int, collection: str, one_vector_ok: bool = False) -> np.ndarray:
    """``data`` as a float32 ``[nq, dim]`` matrix, or :class:`QueryInputError`."""
    try:
        queries = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise QueryInputError(f"search data for {collection!r} is not a list of "
                              f"float vectors: {exc}") from exc
    if queries.ndim == 1 and one_vector_ok and len(queries):
        queries = queries[None, :]
    if queries.ndim != 2 or len(queries) == 0 or queries.shape[1] != dim:
        raise QueryInputError(f"search data of shape {queries.shape} does not match collection "
                              f"{collection!r}: expected a non-empty list of vectors of dim {dim}")
    return queries


class ProbeArgumentError(QueryInputError):
    """A bad ``nprobe``, ``recall_target``, ``min_nprobe`` or ``max_nprobe`` (the shells
    re-raise it as pymilvus's ``ParamError``, like :class:`QueryInputError`)."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_nprobe(nprobe, name: str = "nprobe") -> None:
    """Refuse an ``nprobe`` that is not an integer >= 1 (:class:`ProbeArgumentError`). One
    above the collection's cluster count is not refused: it is clipped (:func:`clip_nprobe`)."""
    if nprobe is not None and not _is_int(nprobe):
        raise ProbeArgumentError(f"{name} must be an integer, got {nprobe!r}")
    if nprobe is not None and nprobe < 1:
        raise ProbeArgumentError(f"{name} must be >= 1, got {nprobe!r}")


def check_probe_args(nprobe=None, recall_target=None, min_nprobe=1, max_nprobe=None) -> None:
    """Refuse bad routing arguments the same way whatever serves the collection (calibrated
    or not): ``nprobe``/``min_nprobe``/``max_nprobe`` integers >= 1 (``max_nprobe`` >=
    ``min_nprobe``), ``recall_target`` a number in (0, 1] (0, 1.5 and nan are refused)."""
    check_nprobe(nprobe)
    check_nprobe(min_nprobe, "min_nprobe")
    check_nprobe(max_nprobe, "max_nprobe")
    if max_nprobe is not None and max_nprobe < min_nprobe:
        raise ProbeArgumentError(f"need min_nprobe ({min_nprobe}) <= max_nprobe ({max_nprobe})")
    if recall_target is None:
        return
    try:
        ok = not isinstance(recall_target, (bool, np.bool_)) and 0 < float(recall_target) <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:                      # nan compares False: refused too
        raise ProbeArgumentError(f"recall_target must be a number in (0, 1], got {recall_target!r}")


_CLIPPED: set = set()               # (collection, what, value) already logged


def clip_nprobe(nprobe: int, n_clusters: int, collection: str = "", what: str = "nprobe") -> int:
    """``nprobe`` clipped to ``n_clusters``: asking for more clusters than a collection has
    searches all of them (the exact answer), logged once per collection and value. The same
    rule for an explicit ``nprobe`` and a client's default."""
    if nprobe <= n_clusters:
        return nprobe
    key = (collection, what, int(nprobe))
    if key not in _CLIPPED and len(_CLIPPED) < 10_000:
        _CLIPPED.add(key)
        log.info("%s=%d is more than the %d clusters of %r: searching all %d", what, nprobe,
                 n_clusters, collection, n_clusters)
    return n_clusters


def default_nprobe(nprobe: int | None, router, n_clusters: int, collection: str = "") -> int:
    """Clusters per query when a search names none: the client's ``nprobe``, else the
    router's own default, else :data:`FALLBACK_NPROBE`; at most ``n_clusters``
    (:func:`clip_nprobe`)."""
    n = nprobe or getattr(router, "default_nprobe", None) or FALLBACK_NPROBE
    return clip_nprobe(n, n_clusters, collection, "default nprobe" if nprobe else "router nprobe")


def probe_clusters(router, queries: np.ndarray, default: int, nprobe: int | None = None,
                   recall_target: float | None = None, min_nprobe: int = 1,
                   max_nprobe: int | None = None, collection: str = ""):
    """The clusters each query probes, best first: ``nprobe`` of them (``default`` when
    None), or per query as many as ``recall_target`` needs (adaptive nprobe, between
    ``min_nprobe`` and ``max_nprobe``). Bad arguments raise :class:`ProbeArgumentError`
    whatever the router (:func:`check_probe_args`); an ``nprobe`` or ``min_nprobe`` above the
    router's cluster count is clipped to it (:func:`clip_nprobe`). A router without a recall
    calibration (centroid fallback, old routers) serves a valid ``recall_target`` at the fixed
    nprobe, with a warning, rather than failing the search."""
    check_probe_args(nprobe, recall_target, min_nprobe, max_nprobe)
    n_clusters = getattr(router, "n_partitions", None)
    if n_clusters:
        if nprobe is not None:
            nprobe = clip_nprobe(nprobe, n_clusters, collection)
        min_nprobe = clip_nprobe(min_nprobe, n_clusters, collection, "min_nprobe")
    if recall_target is not None and not router.recall_thresholds:
        log.warning("router of %r has no recall calibration; recall_target=%s served with "
                    "nprobe=%d", collection, recall_target, default)
        recall_target = None
    if recall_target is not None:
        return router.rank_adaptive(queries, recall_target, min_nprobe, max_nprobe)
    return router.rank(queries, default if nprobe is None else nprobe)


# --------------------------------------------------------------------------- search requests
def search_is_routable(data, partition_names, ids, positional: Sequence = ()) -> bool:
    """Whether a search can be routed at all: it sends vectors, names no partitions and no
    ``ids``, and passes no later pymilvus parameters positionally (``ranker``, ...)."""
    return partition_names is None and ids is None and data is not None and not positional


def searches_layout_field(anns_field, layout) -> bool:
    """Whether ``anns_field`` (None or "": the default) is the layout's vector field."""
    return anns_field in (None, "", layout.vector_field)


# Vector indexes that search only ``nprobe`` of their own lists: a routed request names whole
# clusters, so on such an index it must visit every list and let the cluster filter choose.
LIST_INDEXES = ("IVF_FLAT", "IVF_SQ8", "IVF_PQ", "IVF_SQ8H", "IVF_RABITQ", "SCANN",
                "BIN_IVF_FLAT", "GPU_IVF_FLAT", "GPU_IVF_PQ")


def index_search_defaults(index: dict | None) -> dict:
    """Search params a routed request needs on the laid-out collection's vector index
    (``describe_index``'s dict; None: unknown) so that it scans its clusters whole: every list
    of an IVF-family index (``nprobe = nlist``); nothing for FLAT, HNSW and the rest (HNSW
    answers a filter that keeps few rows by brute force over them)."""
    if not index or str(index.get("index_type", "")).upper() not in LIST_INDEXES:
        return {}
    params = index.get("params") if isinstance(index.get("params"), dict) else {}
    nlist = index.get("nlist", params.get("nlist"))
    try:
        return {"nprobe": int(nlist)} if nlist is not None and int(nlist) > 0 else {}
    except (TypeError, ValueError):
        return {}


def with_search_defaults(search_params: dict | None, defaults: dict) -> dict | None:
    """The caller's ``search_params`` with ``defaults`` (:func:`index_search_defaults`) added
    under ``params`` where the caller set none of them (at either level); never modified in
    place."""
    if not defaults:
        return search_params
    out = dict(search_params or {})
    params = dict(out.get("params") or {})
    for key, value in defaults.items():
        if key not in params and key not in out:
            params[key] = value
    out["params"] = params
    return out


@dataclass(frozen=True)
class SearchRequest:
    """One search to send: the batch's query ``rows`` (indices, in the order the request
    carries them), restricted to ``clusters`` as Milvus is told: ``partition_names`` (None:
    the whole collection) and ``filter`` (the caller's, combined with the cluster filter)."""

    rows: tuple[int, ...]
    clusters: tuple[int, ...]
    partition_names: list[str] | None
    filter: str

    def take(self, queries: np.ndarray) -> np.ndarray:
        """This request's query vectors out of the batch."""
        return queries[list(self.rows)]


@dataclass(frozen=True)
class SearchPlan:
    """The requests one routed search sends. Every query row is carried by at least one
    request; :func:`merge` puts their answers back together in query order (a row carried
    by several requests gets the best ``limit`` of their hits, by ``metric``)."""

    n_queries: int
    requests: tuple[SearchRequest, ...]
    limit: int | None = None
    metric: str = "IP"
    primary_field: str = "id"


def group_by_clusters(probed) -> list[tuple[tuple[int, ...], list[int]]]:
    """``(clusters, rows)`` per distinct probed set: queries that probe the same clusters
    share one request (in order of first use). A batch planner may group otherwise (e.g.
    queries whose clusters overlap share a request with their union)."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(probed):
        groups.setdefault(tuple(sorted(int(c) for c in row)), []).append(i)
    return list(groups.items())


def search_request(storage: Storage, clusters: Sequence[int], rows: Sequence[int],
                   caller_filter: str = "", extra_partitions: Sequence[str] = ()) -> SearchRequest:
    """The request searching ``clusters`` for query ``rows`` (:meth:`.Storage.search_target`).
    ``extra_partitions`` (e.g. ``_default`` while it holds rows written around the layout)
    are named too wherever the request names partitions."""
    clusters = tuple(sorted({int(c) for c in clusters}))
    parts, expr = storage.search_target(clusters, caller_filter)
    if extra_partitions and parts is not None:
        parts = parts + list(extra_partitions)
    return SearchRequest(tuple(int(r) for r in rows), clusters, parts, expr)


def plan_search(layout, probed, caller_filter: str = "", *, stray_partition: str | None = None,
                limit: int | None = None,
                group: Callable[[Any], list[tuple[Sequence[int], Sequence[int]]]] = group_by_clusters
                ) -> SearchPlan:
    """The requests that search each query's ``probed`` clusters of ``layout``.

    ``group(probed)`` gives ``(clusters, rows)`` pairs, one request each (default:
    :func:`group_by_clusters`); ``stray_partition`` is searched with the clusters (see
    :func:`search_request`)."""
    extra = (stray_partition,) if stray_partition is not None else ()
    requests = tuple(search_request(layout.storage, clusters, rows, caller_filter, extra)
                     for clusters, rows in group(probed))
    return SearchPlan(len(probed), requests, limit, layout.metric, layout.primary_field)


def _merge_hits(plan: SearchPlan, parts: list):
    """The best ``plan.limit`` hits of several answers for one query, each key once (hits
    are dicts with ``distance`` and the primary key, as pymilvus's ``Hit``)."""
    larger = plan.metric.upper() in LARGER_IS_BETTER
    by_key: dict = {}
    for hits in parts:
        for hit in hits:
            key = hit.get(plan.primary_field)
            kept = by_key.get(key)
            if kept is None or (hit["distance"] > kept["distance"] if larger
                                else hit["distance"] < kept["distance"]):
                by_key[key] = hit
    ranked = sorted(by_key.values(), key=lambda h: h["distance"], reverse=larger)[:plan.limit]
    merged = copy.copy(parts[0])
    merged[:] = ranked
    if hasattr(merged, "ids") and hasattr(merged, "distances"):    # pymilvus's Hits
        merged.ids = [h.get(plan.primary_field) for h in ranked]
        merged.distances = [h["distance"] for h in ranked]
    return merged


def merge(plan: SearchPlan, results: Sequence):
    """One result in query order from the answers to ``plan.requests`` (same order).

    The result is a shallow copy of the first answer (so pymilvus's ``SearchResult`` type
    and its extras survive) holding each query's hits; an ``extra["cost"]`` is summed over
    the answers."""
    if len(results) != len(plan.requests):
        raise ValueError(f"{len(results)} answers for {len(plan.requests)} requests")
    if len(results) == 1 and plan.requests[0].rows == tuple(range(plan.n_queries)):
        return results[0]               # one request carrying the batch in order: its answer is it
    parts: list[list] = [[] for _ in range(plan.n_queries)]
    for res, request in zip(results, plan.requests):
        for r, hits in zip(request.rows, res):
            parts[r].append(hits)
    hits = [p[0] if len(p) == 1 else _merge_hits(plan, p) if p else None for p in parts]
    merged = copy.copy(results[0])
    merged[:] = hits
    extra = getattr(merged, "extra", None)
    if isinstance(extra, dict) and "cost" in extra:
        merged.extra = dict(extra, cost=sum(getattr(r, "extra", {}).get("cost", 0) for r in results))
    return merged
