"""Batch planning under a cost model: which queries of a batch share one Milvus request.

A routed batch probes a different set of clusters per query. Queries can share a
request only if it names the *union* of their clusters, so every query of a
shared request scans the others' clusters too (more candidates: its recall can
only rise), while the batch pays the fixed cost of a request fewer times. Which
split is cheapest depends on the server, so it is decided by a measured
:class:`CostModel` (``benchmarks/bench_costs.py`` fits one) over the storage
facts of a layout (:class:`StorageFacts`).

A request with ``nq`` queries naming the cluster set ``C`` costs, in ms (:mod:`.costs`)::

    request_ms + cluster_ms * |C| + segment_ms * S(C) + row_walked_ms * W(C)
      + nq * (query_ms + row_scanned_ms * R(C) + query_row_walked_ms * W(C))

``R(C)``: rows of the clusters named (each query computes a distance for each);
``S(C)``: sealed segments of the storage parts (partitions) the request touches;
``W(C)``: rows of those parts when the request carries a filter - on Milvus
2.3.5 a filter becomes a bitset over every row of every segment searched, and
brute force tests every bit (docs/benchmarks.md), so a ``single`` layout walks
all N rows per request however few clusters it names.

:func:`plan_batch` merges greedily: it starts from one request per distinct
cluster set and, in rounds, computes the saving of merging every two requests
and merges disjoint pairs, largest saving first, while a merge saves cost. Pure
numpy, no pymilvus; deterministic (ties go to the lower index; shared rows,
clusters and segments are integer sums computed exactly, whatever BLAS's order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# the cost model and storage facts live in .costs; imported here for plan_batch's callers
from .costs import (DEFAULT_COST_MODEL, MAX_NQ, MAX_REQUEST_BYTES, CostModel,  # noqa: F401
                    StorageFacts, max_queries_for, resolve_cost_model)
from .errors import InputError

# Planning grows with the square of the distinct cluster sets: batches larger than this are
# planned in consecutive chunks (each chunk's queries share requests only among themselves).
PLAN_CHUNK = 256


@dataclass(frozen=True, eq=False)
class Request:
    """One search request of a plan: these queries (batch rows) over the union of their clusters."""

    queries: np.ndarray     # batch row indices, ascending
    clusters: np.ndarray    # cluster ids, ascending
    cost_ms: float          # predicted


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """How a batch is split into requests. Every query is in exactly one request, and each
    request names a superset of each of its queries' clusters."""

    requests: tuple[Request, ...]
    request_of: np.ndarray          # [Q] the request each query is in
    extra_clusters: np.ndarray      # [Q] clusters scanned beyond the query's own
    extra_rows: np.ndarray          # [Q] rows scanned beyond the query's own clusters
    predicted_ms: float             # sum of the requests' predicted costs (server time, serial)
    per_set_ms: float               # one request per distinct cluster set (no merging)
    per_query_ms: float             # one request per query
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def groups(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """``(clusters, query rows)`` per request: what :func:`.plan.plan_search`'s ``group``
        hook returns (``group=lambda probed: plan.groups()``)."""
        return [(tuple(r.clusters.tolist()), r.queries.tolist()) for r in self.requests]


def probe_matrix(probed, n_clusters: int) -> np.ndarray:
    """``[Q, L]`` boolean matrix of the clusters each query probes, from a boolean matrix, a
    ``[Q, nprobe]`` integer array or a list of integer arrays (lengths may differ)."""
    if isinstance(probed, np.ndarray) and probed.dtype == bool:
        if probed.ndim != 2 or probed.shape[1] != n_clusters:
            raise InputError(f"probe matrix must be [queries, {n_clusters}], got {probed.shape}")
        return probed
    if isinstance(probed, np.ndarray) and probed.ndim == 2:
        n_rows = len(probed)
        flat = probed.astype(np.int64, copy=False).ravel()
        rows = np.repeat(np.arange(n_rows), probed.shape[1])
    else:
        arrays = [np.asarray(p, dtype=np.int64).ravel() for p in probed]
        n_rows = len(arrays)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(n_rows), [len(r) for r in arrays])
    if len(flat) and (flat.min() < 0 or flat.max() >= n_clusters):
        raise InputError(f"cluster ids must lie in [0, {n_clusters}); got {flat.min()}..{flat.max()}")
    out = np.zeros((n_rows, n_clusters), dtype=bool)
    out[rows, flat] = True
    return out


def plan_batch(probed, facts: StorageFacts, model: CostModel | None = None, *,
               max_queries: int | None = None) -> BatchPlan:
    """Split a batch into the requests the cost model predicts cheapest.

    ``probed``: the clusters each query probes (see :func:`probe_matrix`).
    ``max_queries``: the most queries one request may carry (a server's nq limit).
    Queries with the same cluster set share a request whenever a request costs
    anything. Then, round by round, the saving of merging every two requests is
    computed and pairs are merged greedily (largest saving first, each request in
    at most one merge per round), while a merge saves cost. A query without
    clusters gets a request of its own. Work grows with the square of the distinct
    cluster sets (about 0.4 / 0.75 / 1.8 ms of CPU for 8 / 32 / 128 queries probing 40
    clusters on this project's busy 2-core machines): plan a single query without it, and
    very large batches in chunks.
    """
    model = model or DEFAULT_COST_MODEL
    if max_queries is not None and max_queries < 1:
        raise InputError("max_queries must be >= 1")
    X0 = probe_matrix(probed, facts.n_clusters)
    Q = len(X0)
    used = np.flatnonzero(X0.any(axis=0))
    Xc = np.take(X0, used, axis=1)                 # C order (X0[:, used] is not: slow below)
    empty = ~Xc.any(axis=1)
    nc = len(used)
    # columns: the clusters used, then the storage parts they live in
    if facts.n_parts == 1:
        parts, Xp = np.zeros(1, np.int64), ~empty[:, None]
    else:
        parts, col_part = np.unique(facts.part_of_cluster[used], return_inverse=True)
        order = np.argsort(col_part, kind="stable")
        Xp = np.logical_or.reduceat(np.take(Xc, order, axis=1),
                                    np.searchsorted(col_part[order], np.arange(len(parts))), axis=1) \
            if nc else np.zeros((Q, 0), bool)
    Xq = np.concatenate([Xc, Xp], axis=1)
    # integer metrics per column (clusters named, rows scanned, segments searched, rows
    # walked by the filter) and what each costs per request (a) and per query (b)
    W = np.zeros((4, Xq.shape[1]))
    W[0, :nc] = 1
    W[1, :nc] = facts.sizes[used]
    W[2, nc:] = facts.part_segments[parts]
    if facts.filtered:
        W[3, nc:] = facts.part_rows[parts]
    a = np.array([model.cluster_ms, 0.0, model.segment_ms, model.row_walked_ms])
    b = np.array([0.0, model.row_scanned_ms, 0.0, model.query_row_walked_ms])
    F, q0 = model.request_ms, model.query_ms
    Mq = Xq @ W.T                                  # [Q, 4] each query's own metrics
    base_u, base_v = Mq @ a, Mq @ b
    per_query_ms = float((F + base_u + q0 + base_v).sum())

    group_of, reps = _initial_groups(Xc, (F + base_u > 0) & ~empty, max_queries)
    G = len(reps)
    X = Xq[reps]
    n = np.bincount(group_of, minlength=G).astype(np.float64)
    per_set_ms = float((F + base_u[reps] + n * (q0 + base_v[reps])).sum())
    alive = np.ones(G, bool)
    parent = np.arange(G)
    rounds = merges = 0
    lone = empty[reps]                             # no clusters: never merged
    # without a per-request cost no merge saves anything (a union's per-query cost is at
    # least its parts')
    if G - lone.sum() > 1 and (F > 0 or (W.T @ a > 0).any()):
        # columns every mergeable group holds (the one part of `single` storage, clusters all
        # queries probe) add the same to every intersection: their per-request cost is a
        # constant saving and their per-query cost cancels, so only the others are multiplied
        held = X[~lone].sum(axis=0)
        common = held == (~lone).sum()
        Wc = W[:, common].sum(axis=1)              # the common columns' metrics
        F_eff = F + float(a @ Wc)
        # a column one group holds never enters an intersection: only shared ones are multiplied
        shared = (held > 1) & ~common
        priced = ((a != 0) | (b != 0)) & (W[:, shared] != 0).any(axis=1)
        Wr, ar, br = W[priced][:, shared], a[priced], b[priced]
        Xr = X[:, shared].astype(np.float32)
        Ku, Kv = _intersections(Xr, Xr.T, Wr, ar, br, symmetric=True)
        Mg = np.where(lone[:, None], 0.0, Mq[reps] - Wc)   # [G, 4] metrics outside them
        U, V = Mg @ a, Mg @ b
        idx = np.arange(G)
        S = _savings(F_eff, Ku, Kv, n, U, V, idx, lone, max_queries)
        S[:, lone] = -np.inf
        tol = 1e-9 * (F_eff + U.max() + n.max() * V.max()) + 1e-12
        while True:
            i, j = _greedy_pairs(S, tol)
            if not len(i):
                break
            rounds += 1
            merges += len(i)
            X[i] |= X[j]
            Xr[i] = np.maximum(Xr[i], Xr[j])
            n[i] += n[j]
            alive[j] = False
            parent[j] = i
            S[j] = -np.inf
            S[:, j] = -np.inf
            Ku, Kv = _intersections(Xr[i], Xr.T, Wr, ar, br)
            Mi = X[i] @ W.T - Wc
            U[i], V[i] = Mi @ a, Mi @ b
            rows = _savings(F_eff, Ku, Kv, n, U, V, i, lone, max_queries)
            rows[:, ~alive | lone] = -np.inf
            S[i] = rows
            S[:, i] = rows.T
    while (parent[parent] != parent).any():
        parent = parent[parent]
    keep = np.flatnonzero(alive)
    slot = np.cumsum(alive) - 1
    return _finish(Xc, used, X[keep], nc, Mq, n[keep], slot[parent[group_of]], W, a, b, F, q0,
                   per_set_ms, per_query_ms, rounds, merges, G)


def _greedy_pairs(S: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint pairs ``(i, j)``, ``i < j``, each a row's best partner with a saving above
    ``tol``, taken largest saving first (ties: lower row first). Disjoint merges' savings add
    up, so a round's pairs are priced exactly by ``S``."""
    idx = np.arange(len(S))
    best = S.argmax(axis=1)
    gain = S[idx, best]
    active = gain > tol
    if not active.any():
        return idx[:0], idx[:0]
    mutual = active & (best[best] == idx)              # each other's best: always taken
    pi, pj = idx[mutual & (idx < best)], best[mutual & (idx < best)]
    free = ~mutual
    rest = np.flatnonzero(active & free & free[best])  # best partner still free: greedy
    if len(rest):
        rest = rest[np.lexsort((rest, -gain[rest]))]
        free_l, extra_i, extra_j = free.tolist(), [], []
        for r, c in zip(rest.tolist(), best[rest].tolist()):
            if free_l[r] and free_l[c]:
                free_l[r] = free_l[c] = False
                extra_i.append(min(r, c))
                extra_j.append(max(r, c))
        pi, pj = np.r_[pi, extra_i].astype(np.int64), np.r_[pj, extra_j].astype(np.int64)
    return pi, pj


def _initial_groups(Xc, shares, max_queries) -> tuple[np.ndarray, list[int]]:
    """One group per distinct cluster set among ``shares`` queries (in first-occurrence
    order, at most ``max_queries`` each), one per query otherwise."""
    Q = len(Xc)
    keys = np.packbits(Xc, axis=1)
    keys = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel() \
        if keys.shape[1] else np.zeros(Q, np.int8)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    key_of = np.where(shares, first[inverse.ravel()], np.arange(Q))   # first query with the set
    reps, group_of = np.unique(key_of, return_inverse=True)
    group_of = group_of.ravel().astype(np.int64)
    reps = reps.tolist()
    if max_queries is not None:
        counts = np.bincount(group_of, minlength=len(reps))
        if counts.max() > max_queries:
            for g in np.flatnonzero(counts > max_queries):
                members = np.flatnonzero(group_of == g)
                for start in range(max_queries, len(members), max_queries):
                    chunk = members[start:start + max_queries]
                    group_of[chunk] = len(reps)
                    reps.append(int(chunk[0]))
            order = np.argsort(reps, kind="stable")       # keep first-occurrence order
            renum = np.empty_like(order)
            renum[order] = np.arange(len(order))
            group_of, reps = renum[group_of], sorted(reps)
    return group_of, reps


# OpenBLAS computes a product of m*n*k < 2 * 65536 * 4 multiply-adds on the calling thread;
# larger ones wake its worker threads, which on a busy host costs milliseconds, not microseconds
_ONE_THREAD_MNK = 2 * 65536 * 4 - 1


def _intersections(A, BT, W, a, b, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(Ku, Kv)``: per-request and per-query cost of the columns each group of ``A``
    ([m, c] 0/1) shares with each group of ``BT`` ([c, G] 0/1), from the integer metrics
    ``W`` ([M, c]) priced by ``a`` and ``b``. Each metric is an integer sum, exact in
    float32 below 2**24 (float64 beyond), so the plan does not depend on BLAS's summation
    order. Products run in row blocks small enough for one BLAS thread; ``symmetric``
    (``A`` is ``BT.T``) computes the upper triangle and mirrors it."""
    m, c = A.shape
    G = BT.shape[1]
    Ku, Kv = np.zeros((m, G)), np.zeros((m, G))
    dtype = np.float32 if W.sum(axis=1).max(initial=0) < 2 ** 24 else np.float64
    BT = BT.astype(dtype, copy=False)
    for w, am, bm in zip(W, a, b):
        Aw = A * w.astype(dtype)
        K = np.empty((m, G), dtype)
        s = 0
        while s < m:
            lo = s if symmetric else 0
            e = min(m, s + max(1, _ONE_THREAD_MNK // max(1, c * (G - lo))))
            block = Aw[s:e] @ BT[:, lo:]
            K[s:e, lo:] = block
            if symmetric:
                K[s:, s:e] = block.T
            s = e
        if am:
            Ku += am * K
        if bm:
            Kv += bm * K
    return Ku, Kv


def _savings(F, Ku, Kv, n, U, V, rows, lone, max_queries) -> np.ndarray:
    """Cost saved by merging each group of ``rows`` with every group (``-inf``: not
    allowed): F + shared per-request cost + (n_a + n_b) * shared per-query cost
    - n_a * V_b - n_b * V_a."""
    na, nb = n[rows][:, None], n[None, :]
    S = F + Ku + (na + nb) * Kv - na * V[None, :] - nb * V[rows][:, None]
    S[np.arange(len(rows)), rows] = -np.inf
    S[lone[rows], :] = -np.inf
    if max_queries is not None:
        S[(na + nb) > max_queries] = -np.inf
    return S


def _finish(Xc, used, Xg, nc, Mq, n, request_of, W, a, b, F, q0, per_set_ms, per_query, rounds,
            merges, n_sets) -> BatchPlan:
    Q = len(Xc)
    _, first = np.unique(request_of, return_index=True)
    rank = np.argsort(first, kind="stable")        # requests in the order of their first query
    renum = np.empty_like(rank)
    renum[rank] = np.arange(len(rank))
    request_of = renum[request_of]
    Xs = Xg[rank]
    Mr = Xs @ W.T                                  # [R, 4] each request's metrics
    costs = F + Mr @ a + n[rank] * (q0 + Mr @ b)
    members = np.argsort(request_of, kind="stable")
    cuts = np.cumsum(np.bincount(request_of, minlength=len(rank)))[:-1]
    cols = np.flatnonzero(Xs[:, :nc]) % max(nc, 1)
    requests = tuple(map(Request, np.split(members, cuts),
                         np.split(used[cols], np.cumsum(Mr[:, 0]).astype(np.int64)[:-1]),
                         costs.tolist()))
    extra_clusters = (Mr[request_of, 0] - Mq[:, 0]).astype(np.int64)
    extra_rows = Mr[request_of, 1] - Mq[:, 1]
    predicted = float(costs.sum())
    stats = {"queries": Q, "requests": len(requests), "distinct_sets": n_sets, "rounds": rounds,
             "merges": merges,
             "mean_extra_clusters": float(extra_clusters.mean()) if Q else 0.0,
             "max_extra_clusters": int(extra_clusters.max()) if Q else 0,
             "extra_rows_share": float(extra_rows.sum() / max(Mq[:, 1].sum(), 1.0)),
             "predicted_ms": predicted, "per_set_ms": per_set_ms, "per_query_ms": per_query}
    return BatchPlan(requests, request_of, extra_clusters, extra_rows, predicted, per_set_ms,
                     per_query, stats)


def plan_batches(probed, facts: StorageFacts, model: CostModel | None = None, *,
                 max_queries: int | None = None, chunk: int = PLAN_CHUNK) -> BatchPlan:
    """:func:`plan_batch` over consecutive chunks of at most ``chunk`` queries (planning
    grows with the square of the distinct cluster sets), joined into one plan of the whole
    batch: query rows renumbered, requests in chunk order, costs and counts summed."""
    if chunk < 1:
        raise InputError("chunk must be >= 1")
    X = probe_matrix(probed, facts.n_clusters)
    Q = len(X)
    if Q <= chunk:
        return plan_batch(X, facts, model, max_queries=max_queries)
    plans = [(s, plan_batch(X[s:s + chunk], facts, model, max_queries=max_queries))
             for s in range(0, Q, chunk)]
    requests, request_of, offset = [], [], 0
    for s, p in plans:
        requests += [Request(r.queries + s, r.clusters, r.cost_ms) for r in p.requests]
        request_of.append(p.request_of + offset)
        offset += len(p.requests)
    extra_clusters = np.concatenate([p.extra_clusters for _, p in plans])
    extra_rows = np.concatenate([p.extra_rows for _, p in plans])
    stats = {k: sum(p.stats[k] for _, p in plans)
             for k in ("queries", "requests", "distinct_sets", "merges", "predicted_ms",
                       "per_set_ms", "per_query_ms")}
    own_rows = float(X.sum(axis=0) @ facts.sizes)     # rows of each query's own clusters, summed
    stats.update(rounds=max(p.stats["rounds"] for _, p in plans), chunks=len(plans),
                 mean_extra_clusters=float(extra_clusters.mean()),
                 max_extra_clusters=int(extra_clusters.max()),
                 extra_rows_share=float(extra_rows.sum() / own_rows) if own_rows else 0.0)
    return BatchPlan(tuple(requests), np.concatenate(request_of), extra_clusters, extra_rows,
                     stats["predicted_ms"], stats["per_set_ms"], stats["per_query_ms"], stats)
