"""Routed calls beyond ``search``: ``hybrid_search``, ``search_iterator``, and the routing
arguments' checks - shared by both clients (:mod:`.client`, :mod:`.async_client`).

The decisions are plain functions over a collection's :class:`.serving.Routing` and the
caller's requests (no Milvus calls); the shells perform the calls they name.

* ``hybrid_search``: every ``AnnSearchRequest`` on the layout's vector field is restricted
  to the clusters the router picks for its queries (its filter combined with the cluster
  filter by ``and``, exactly as a routed ``search``; partition storage: ``partition_names``),
  requests on other fields go unchanged; the reranker and limit are the caller's. Queries of a
  batch that probe different clusters are sent as separate hybrid searches (one per distinct
  cluster set, every request's data sliced alike) and put back in query order.
* ``search_iterator``: the one query is routed once, when the iterator is made, and every
  page is restricted to those clusters: the iterator pages through the routed clusters'
  hits, best first, and ends when they are exhausted (it never widens).
* A caller's filter that names the cluster field (``_ltr_cluster``) pins the clusters: the
  call passes through without the cluster filter (counted, and said once).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pymilvus.exceptions import MilvusException

from .errors import UnsupportedServerError
from .plan import QueryInputError, SearchPlan, SearchRequest, check_nprobe, probe_clusters, \
    search_request, with_search_defaults
from .serving import RoutedParamError, Routing, search_queries
from .storage import server_version

HYBRID_MIN_VERSION = (2, 4, 0)     # HybridSearch came with Milvus 2.4 (2.3 answers UNIMPLEMENTED)


class HybridSearchUnsupported(UnsupportedServerError, MilvusException):
    """``hybrid_search`` on a Milvus server without HybridSearch (before 2.4): both a
    ``MilvusException`` (what pymilvus code catches) and the plugin's ``OperationalError``."""

    def __init__(self, message: str):
        MilvusException.__init__(self, message=message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


def check_hybrid_support(version_text: str) -> None:
    """Refuse ``hybrid_search`` on a server older than 2.4, naming its version (milvus-lite
    and unparseable versions are let through)."""
    version = server_version(str(version_text))
    if version is not None and version < HYBRID_MIN_VERSION:
        need = ".".join(map(str, HYBRID_MIN_VERSION))
        raise HybridSearchUnsupported(
            f"hybrid_search needs Milvus >= {need}; this server reports {version_text!r}, which "
            f"has no HybridSearch (it answers UNIMPLEMENTED). Use search() per vector field")


def probe(state: Routing, queries: np.ndarray, default: int, nprobe, recall_target, min_nprobe,
          max_nprobe):
    """:func:`.plan.probe_clusters` for ``state``; bad routing arguments raise
    :class:`.serving.RoutedParamError` (pymilvus's ``ParamError``, a ``MilvusException``, and
    the plugin's ``InputError``, a ``ValueError``)."""
    try:
        return probe_clusters(state.router, queries, default, nprobe, recall_target, min_nprobe,
                              max_nprobe, state.layout.collection)
    except QueryInputError as exc:
        raise RoutedParamError(str(exc)) from exc


def check_client_nprobe(nprobe) -> None:
    """A client's default ``nprobe``: an integer >= 1 or None, else
    :class:`.serving.RoutedParamError` (one above a collection's cluster count is clipped
    at search time, as an explicit one is)."""
    try:
        check_nprobe(nprobe)
    except QueryInputError as exc:
        raise RoutedParamError(str(exc)) from exc


def pins_clusters(filter_text, layout) -> bool:
    """Whether a caller's filter names ``layout``'s cluster field (it then chooses the clusters
    itself: the call is not routed, so the filters are not ANDed into nothing)."""
    field = layout.storage.cluster_field
    return bool(field and filter_text and re.search(rf"(?<![\w]){re.escape(field)}(?![\w])",
                                                    str(filter_text)))


# --------------------------------------------------------------------------- hybrid_search
@dataclass(frozen=True)
class HybridCall:
    """One hybrid search to send: the batch's query ``rows``, per caller request its new
    filter (None: the caller's request unchanged but for the rows) and the
    ``partition_names`` (None: the whole collection)."""

    rows: tuple[int, ...]
    filters: tuple[str | None, ...]
    partition_names: list[str] | None


@dataclass(frozen=True)
class HybridRoute:
    """What a routed ``hybrid_search`` does: ``calls`` and the :class:`.plan.SearchPlan` that
    :func:`.plan.merge` puts their answers back together by (one request per call, same
    order)."""

    calls: tuple[HybridCall, ...]
    plan: SearchPlan


# why a call on a laid-out collection is not routed, said once (the rest are the caller's choice)
WHY = {
    "anns_field": "the request searches another vector field than the layout's, every row of it",
    "cluster_filter": "the filter names the cluster field, so the clusters it names are searched "
                      "as given, without the router's",
    "hybrid_partition_storage": "the layout stores clusters as partitions and partition_names "
                                "would restrict the requests on other fields too; every row is "
                                "searched",
    "iterator_batch": "search_iterator routes one query vector; the batch is passed to pymilvus",
}


def hybrid_reason(state: Routing, reqs) -> tuple[str | None, list[int], dict]:
    """Whether a hybrid search of a laid-out collection can be routed: ``(reason, routed,
    unrouted)`` - the whole call's pass-through reason (None: route it), the indices of the
    requests to route and the others ``{index: reason}`` (``anns_field``: another vector
    field; ``cluster_filter``: the caller pins the clusters)."""
    layout = state.layout
    routed, unrouted = [], {}
    for j, req in enumerate(reqs):
        if getattr(req, "anns_field", None) not in (None, "", layout.vector_field):
            unrouted[j] = "anns_field"
        elif pins_clusters(getattr(req, "expr", None), layout):
            unrouted[j] = "cluster_filter"
        else:
            routed.append(j)
    if not routed:
        return ("cluster_filter" if "cluster_filter" in unrouted.values() else "anns_field"), [], unrouted
    if unrouted and layout.storage.mode == "partition":
        # partition_names would restrict every request, also those on other fields
        return "hybrid_partition_storage", [], unrouted
    return None, routed, unrouted


def take_rows(data, rows: Sequence[int], n: int):
    """``data`` (a request's queries) restricted to ``rows``; ``data`` itself when ``rows`` is
    every row; None when it cannot be sliced here (an unknown container)."""
    rows = list(rows)
    if rows == list(range(n)):
        return data
    if isinstance(data, (list, tuple)):
        return [data[i] for i in rows]
    if isinstance(data, np.ndarray) or hasattr(data, "tocsr"):      # dense or scipy sparse rows
        return data[rows]
    return None


def plan_hybrid(state: Routing, reqs, probed: dict, routed: Sequence[int], n_queries: int,
                limit: int, stray_partition: str | None = None) -> HybridRoute:
    """The hybrid searches that restrict each routed request (``probed[j]``: its queries'
    clusters) to its clusters: one per distinct combination of the queries' cluster sets,
    or, when some request's data cannot be sliced, one for the batch naming each request's
    union of clusters (a superset: recall can only rise)."""
    layout = state.layout
    storage = layout.storage
    keys: dict[tuple, list[int]] = {}
    for i in range(n_queries):
        key = tuple(tuple(sorted(int(c) for c in probed[j][i])) for j in routed)
        keys.setdefault(key, []).append(i)
    groups = list(keys.values())
    if len(groups) > 1 and any(take_rows(req.data, [0], n_queries) is None for req in reqs):
        groups = [list(range(n_queries))]
    unrouted = [j for j in range(len(reqs)) if j not in routed]
    extra = (stray_partition,) if stray_partition is not None else ()
    calls, requests = [], []
    for rows in groups:
        filters: list[str | None] = [None] * len(reqs)
        parts: list[str] = []
        for j in routed:
            clusters = sorted({int(c) for i in rows for c in probed[j][i]})
            request = search_request(storage, clusters, rows, getattr(reqs[j], "expr", None) or "",
                                     extra)
            filters[j] = request.filter
            parts.extend(request.partition_names or [])
        names = list(dict.fromkeys(parts)) or None
        if unrouted and storage.mode != "partition":
            names = None            # grouped storage: the cluster filter alone restricts
        calls.append(HybridCall(tuple(rows), tuple(filters), names))
        requests.append(SearchRequest(tuple(rows), (), names, ""))
    plan = SearchPlan(n_queries, tuple(requests), limit, layout.metric, layout.primary_field)
    return HybridRoute(tuple(calls), plan)


def hybrid_queries(state: Routing, reqs, routed: Sequence[int]) -> dict:
    """The query matrix of each routed request (:class:`.serving.RoutedParamError` for data
    that does not fit the layout, or requests of different batch sizes)."""
    queries = {j: search_queries(state, reqs[j].data) for j in routed}
    sizes = {len(q) for q in queries.values()}
    if len(sizes) > 1:
        raise RoutedParamError(f"hybrid_search requests of {state.layout.collection!r} carry "
                               f"different numbers of queries: {sorted(sizes)}")
    return queries


def call_requests(reqs, call: HybridCall, n_queries: int, index_defaults: dict | None = None) -> list:
    """The caller's requests as ``call`` sends them: its rows of each, routed filters set, and
    on the routed ones the params the layout's vector index needs (``index_defaults``:
    :func:`.plan.index_search_defaults`, where the caller set none)."""
    out = []
    for req, new_filter in zip(reqs, call.filters):
        data = take_rows(req.data, call.rows, n_queries)
        if new_filter is None and data is req.data:
            out.append(req)
            continue
        req = copy.copy(req)
        req._data = data
        if new_filter is not None:
            req._expr = new_filter
            req._param = with_search_defaults(req._param, index_defaults or {})
        out.append(req)
    return out


# --------------------------------------------------------------------------- search_iterator
def iterator_request(state: Routing, clusters, filter_text, stray_partition: str | None):
    """The one restriction every page of a routed ``search_iterator`` carries: the routed
    ``clusters`` of its query as ``partition_names`` and filter (:func:`.plan.search_request`)."""
    extra = (stray_partition,) if stray_partition is not None else ()
    return search_request(state.layout.storage, clusters, (0,), filter_text or "", extra)
