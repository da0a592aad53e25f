"""Which clusters share a partition, and which storage a layout should use: decided from the
clusters real queries probe together.

In ``grouped`` storage (:mod:`.storage`) a routed request names the partitions (groups) of its
probed clusters, and on Milvus 2.3.5 its filter walks every row of the groups named; in
``single`` storage it walks every row of the collection. Groups pay when the queries' probed
clusters fall into few of them, so :func:`coprobe_groups` forms the groups from *co-probes* -
the cluster sets of sampled real queries (the query log, routed over the new clusters) -
instead of centroid geometry alone: it merges clusters greedily, each time the two groups whose
merge adds the fewest rows walked over the sample, within a size cap.

:func:`choose_storage` prices ``single`` and ``grouped`` at a few G under a measured
:class:`.costs.CostModel` (per request, per segment searched, per row walked and scanned) over
the same sample, and picks the cheapest. Pure numpy, no pymilvus.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .batching import probe_matrix
from .costs import DEFAULT_COST_MODEL, CostModel, StorageFacts
from .errors import InputError
from .storage import renumber_by_first_use

# Milvus seals a segment at dataCoord.segment.maxSize (512 MB by default on 2.3-2.5): the rows of
# one sealed segment are about that many bytes of float32 vectors.
SEGMENT_BYTES = 512 * 1024 * 1024


def rows_per_segment(dim: int, segment_bytes: int = SEGMENT_BYTES) -> int:
    """Rows of ``dim`` float32 values in one sealed segment (at least 1)."""
    if dim < 1:
        raise InputError(f"dim must be >= 1, got {dim}")
    return max(1, int(segment_bytes) // (4 * int(dim)))


def _check(probed, sizes) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any() or not np.isfinite(sizes).all():
        raise InputError("sizes must be a non-empty 1-d array of rows per cluster, each >= 0")
    X = probe_matrix(probed, len(sizes))
    if len(X) == 0:
        raise InputError("no probed queries: co-probes need at least one query")
    return X, sizes


def coprobe_groups(probed, sizes, n_groups: int, *, max_group_ratio: float = 1.5) -> np.ndarray:
    """The group of each cluster: ``n_groups`` groups of clusters that queries probe together.

    ``probed``: the clusters each sampled query probes (see :func:`.batching.probe_matrix`);
    ``sizes``: rows per cluster. Starting from one group per cluster, the two groups whose
    merge adds the fewest rows walked over the sample are merged, until ``n_groups`` are left:
    a query that touches only one of groups ``g`` and ``h`` walks the other's rows too once they
    are one, so the merge adds ``(n_g - n_gh) * r_h + (n_h - n_gh) * r_g`` (``n``: queries
    touching a group or both, ``r``: rows). No group grows past ``max_group_ratio`` times the
    mean group size while a merge within it remains (then the cap rises by 10% at a time).
    A cluster no query probes adds nothing to the rows its own queries walk, only its rows to
    the queries of the group it joins, so such clusters go to rarely probed groups first. Deterministic (ties go
    to the lower pair); group ids follow the first cluster of each group. Work is O(L^2) per
    merge (about a second at L = 1000).
    """
    X, r = _check(probed, sizes)
    L = len(r)
    if not isinstance(n_groups, (int, np.integer)) or not 1 <= n_groups <= L:
        raise InputError(f"n_groups must be an int in [1, {L}] (the number of clusters), got {n_groups!r}")
    if not max_group_ratio >= 1.0:
        raise InputError(f"max_group_ratio must be >= 1, got {max_group_ratio}")
    r = r.copy()
    T = X.astype(np.float32)                       # [Q, L] queries touching each group
    co = (T.T @ T).astype(np.float64)              # exact integer counts (< 2^24 queries)
    n = np.diag(co).copy()
    alive = np.ones(L, dtype=bool)
    owner = np.arange(L)                           # the group each cluster is in (its id: a cluster)
    cap = max_group_ratio * max(r.sum(), 1.0) / n_groups

    def added_rows() -> np.ndarray:
        # [g, h]: rows walked added by merging g and h (inf: itself, a dead group, over the cap)
        M = (n[:, None] - co) * r[None, :] + (n[None, :] - co) * r[:, None]
        M[(r[:, None] + r[None, :]) > cap] = np.inf
        M[~alive, :] = np.inf
        M[:, ~alive] = np.inf
        np.fill_diagonal(M, np.inf)
        return M

    M = added_rows()
    row_arg = np.argmin(M, axis=1)
    row_min = M[np.arange(L), row_arg]

    def refresh(x: int) -> None:
        row_arg[x] = int(np.argmin(M[x]))
        row_min[x] = M[x, row_arg[x]]

    for _ in range(L - n_groups):
        g = int(np.argmin(row_min))
        if not np.isfinite(row_min[g]):            # every pair is over the cap: raise it
            while not np.isfinite(row_min[g]):
                cap *= 1.1
                M = added_rows()
                row_arg[:] = np.argmin(M, axis=1)
                row_min[:] = M[np.arange(L), row_arg]
                g = int(np.argmin(row_min))
        h = int(row_arg[g])
        g, h = min(g, h), max(g, h)
        # merge h into g
        T[:, g] = np.maximum(T[:, g], T[:, h])
        T[:, h] = 0.0
        r[g] += r[h]
        r[h] = 0.0
        alive[h] = False
        owner[owner == h] = g
        co_g = (T.T @ T[:, g]).astype(np.float64)
        co[g, :] = co_g
        co[:, g] = co_g
        n[g] = co_g[g]
        co[h, :] = 0.0
        co[:, h] = 0.0
        n[h] = 0.0
        d = (n[g] - co_g) * r + (n - co_g) * r[g]
        d[(r + r[g]) > cap] = np.inf
        d[~alive] = np.inf
        d[g] = np.inf
        M[h, :] = np.inf
        M[:, h] = np.inf
        M[g, :] = d
        M[:, g] = d
        row_min[h] = np.inf
        refresh(g)
        stale = np.flatnonzero(alive & ((row_arg == g) | (row_arg == h)))
        better = alive & ((d < row_min) | ((d == row_min) & (g < row_arg)))
        better[g] = False
        row_arg[better] = g
        row_min[better] = d[better]
        for x in stale:
            if x != g:
                refresh(int(x))
    return renumber_by_first_use(owner)


def centroid_probes(queries, centroids, metric: str, nprobe: int) -> np.ndarray:
    """``[Q, nprobe]`` clusters each query probes under centroid routing (IP and COSINE by
    inner product, L2 by distance): the co-probes of logged queries over new clusters, which
    no trained router knows yet."""
    from .clustering import linear_centroid_scorer
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise InputError(f"queries {q.shape} and centroids {c.shape} must be 2-d of one dimension")
    if not 1 <= nprobe:
        raise InputError(f"nprobe must be >= 1, got {nprobe}")
    nprobe = min(int(nprobe), len(c))
    if metric.upper() == "COSINE":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    W, b = linear_centroid_scorer(c, metric)
    s = q @ W.T + b
    top = np.argpartition(-s, nprobe - 1, axis=1)[:, :nprobe]
    return np.sort(top, axis=1)


def mean_request_ms(probed, facts: StorageFacts, model: CostModel | None = None) -> float:
    """Predicted mean ms of one single-query request per sampled query under ``facts``."""
    model = model or DEFAULT_COST_MODEL
    X = probe_matrix(probed, facts.n_clusters)
    if len(X) == 0:
        raise InputError("no probed queries")
    return float(np.mean([model.request_cost(1, np.flatnonzero(x), facts) for x in X]))


def default_group_candidates(n_clusters: int) -> list[int]:
    """G values :func:`choose_storage` tries: powers of two from 2 up to about sqrt(L)."""
    top = max(2, int(round(np.sqrt(n_clusters))))
    out, g = [], 2
    while g <= min(top, n_clusters):
        out.append(g)
        g *= 2
    return out or [min(2, n_clusters)]


@dataclass(frozen=True, eq=False)
class StorageChoice:
    """What :func:`choose_storage` decided: the mode, the groups (``grouped``) and the predicted
    mean ms of a single-query request for every candidate tried (``"single"``, ``"grouped:G"``)."""

    mode: str
    group_of_cluster: np.ndarray | None
    predicted_ms: dict = field(default_factory=dict)
    queries: int = 0

    @property
    def n_groups(self) -> int | None:
        return None if self.group_of_cluster is None else int(self.group_of_cluster.max()) + 1

    def summary(self) -> str:
        what = f"storage {self.mode}" + (f" ({self.n_groups} groups of clusters probed together)"
                                         if self.n_groups else "")
        if not self.predicted_ms:
            return f"{what}, from the probes of {self.queries} logged queries"
        ranked = sorted(self.predicted_ms.items(), key=lambda kv: kv[1])
        top = ranked[:4] + [kv for kv in ranked[4:] if kv[0] == "single"]    # single always
        shown = ", ".join(f"{k} {v:.3f} ms" for k, v in top)
        return (f"{what}, chosen by the cost model over the probes of {self.queries} logged "
                f"queries (predicted ms a request: {shown})")


def choose_storage(probed, sizes, model: CostModel | None = None, *, dim: int,
                   candidates: list[int] | None = None,
                   max_group_ratio: float = 1.5) -> StorageChoice:
    """``single`` or ``grouped`` (with co-probe groups), whichever the cost model predicts
    cheapest for the sampled queries' single-query requests.

    Segments come from the rows of each part (:func:`rows_per_segment` of ``dim``); ``grouped``
    is tried at each G of ``candidates`` (default :func:`default_group_candidates`). Ties keep
    ``single`` (fewer partitions to manage). ``partition`` storage is not a candidate: on a
    server it loads a segment per cluster (minutes at L = 538, docs/benchmarks.md).
    """
    model = model or DEFAULT_COST_MODEL
    X, r = _check(probed, sizes)
    r = r.copy()                # StorageFacts freezes the arrays it holds
    rps = rows_per_segment(dim)
    predicted = {"single": mean_request_ms(X, StorageFacts.single(r, rows_per_segment=rps), model)}
    best = ("single", None, predicted["single"])
    for G in (candidates or default_group_candidates(len(r))):
        if not 2 <= G <= len(r):
            continue
        of = coprobe_groups(X, r, int(G), max_group_ratio=max_group_ratio)
        ms = mean_request_ms(X, StorageFacts.grouped(r, of, rows_per_segment=rps), model)
        predicted[f"grouped:{int(of.max()) + 1}"] = ms
        if ms < best[2] * (1 - 1e-9):
            best = ("grouped", of, ms)
    return StorageChoice(mode=best[0], group_of_cluster=best[1], predicted_ms=predicted, queries=len(X))
