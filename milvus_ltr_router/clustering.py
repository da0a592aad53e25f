"""k-means for layouts: centroids from a sample, and the rule that assigns rows to them.

Two algorithms, as in the paper:

* ``"spherical"`` - k-means on unit-normalised vectors with unit centroids;
  a row belongs to the centroid of largest inner product.
* ``"kmeans"`` - standard (Euclidean) k-means; a row belongs to the nearest
  centroid in L2.

Routing a *query* is a separate question (see :mod:`milvus_ltr_router.router`):
for maximum inner product search the paper ranks centroids by ``<q, c>``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

ALGORITHMS = ("spherical", "kmeans")

FAISS_SAMPLE_PER_CLUSTER = 39          # faiss's minimum (and the old default)
DEFAULT_INIT_PER_CLUSTER = 16          # k-means++ seed rows per cluster (as good as 39 on MiniLM)
DEFAULT_SAMPLE_PER_CLUSTER = 256       # faiss's default max_points_per_centroid
DEFAULT_MAX_SAMPLE_ROWS = 131_072      # cap of the default: k-means cost grows with rows x L
DEFAULT_MAX_SAMPLE_BYTES = 512 << 20   # and its memory: rows x dim x 4 bytes (float32)


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    return algorithm


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def as_vector_batch(vectors, dim: int, owner: str) -> np.ndarray:
    """A C-contiguous float32 ``[n, dim]`` matrix (one vector becomes one row), or a clear error."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"vectors of shape {x.shape} do not match {owner} dim={dim}: expected "
                         f"one vector of {dim} values or a list of them")
    return np.ascontiguousarray(x)


def default_n_clusters(n_rows: int) -> int:
    """round(sqrt(N)), the paper's choice, at least 1."""
    return max(1, int(round(np.sqrt(n_rows))))


def fit_centroids(sample: np.ndarray, n_clusters: int, algorithm: str = "spherical",
                  seed: int = 0, max_iter: int = 25, init_rows: int | None = None) -> np.ndarray:
    """Centroids ``[n_clusters, d]`` float32 learned from ``sample`` (k-means++ start).

    Spherical centroids are unit vectors; standard ones are plain means. k-means++ (greedy,
    sklearn's) seeds come from ``init_rows`` random sample rows (default:
    ``DEFAULT_INIT_PER_CLUSTER`` = 16 per cluster, never fewer than ``n_clusters``), and the
    ``max_iter`` Lloyd iterations then run on the whole sample. k-means++ costs tens of Lloyd
    iterations' worth per row, so seeding from a subset is what keeps big samples affordable;
    on the MiniLM sets 16 seed rows per cluster reach the same objective as 39 or all.
    ``init_rows=len(sample)`` seeds from the whole sample (the behaviour before issue 16).
    """
    check_algorithm(algorithm)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < n_clusters:
        raise ValueError(f"need at least n_clusters={n_clusters} sample rows, got {len(sample)}")
    if algorithm == "spherical":
        sample = normalize_rows(sample)
    if init_rows is None:
        init_rows = DEFAULT_INIT_PER_CLUSTER * n_clusters
    seeds = sample
    if init_rows < len(sample):
        pick = np.random.default_rng(seed).choice(len(sample), max(init_rows, n_clusters), replace=False)
        seeds = sample[np.sort(pick)]
    from sklearn.cluster import kmeans_plusplus
    init, _ = kmeans_plusplus(seeds, n_clusters, random_state=seed)
    if algorithm == "kmeans":
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=n_clusters, init=init, n_init=1, max_iter=max_iter, random_state=seed)
        km.fit(sample)
        return km.cluster_centers_.astype(np.float32)
    return _spherical_kmeans(sample, normalize_rows(init.astype(np.float32)), seed, max_iter)


def _spherical_kmeans(x: np.ndarray, centroids: np.ndarray, seed: int, max_iter: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = len(centroids)
    assign = None
    for it in range(max_iter):
        new_assign = np.argmax(x @ centroids.T, axis=1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        sums = np.asarray(_onehot(assign, k) @ x, dtype=np.float32)   # per-cluster sums
        empty = np.flatnonzero(np.bincount(assign, minlength=k) == 0)
        if len(empty):  # re-seed empty clusters with random rows, as faiss does
            sums[empty] = x[rng.choice(len(x), len(empty), replace=False)]
        centroids = normalize_rows(sums)
    log.debug("spherical k-means stopped after %d iterations", it + 1)
    return centroids.astype(np.float32)


def _onehot(assign: np.ndarray, k: int):
    """Sparse ``[k, n]`` membership matrix: ``_onehot(a, k) @ x`` sums the rows of each cluster."""
    from scipy.sparse import csr_matrix
    n = len(assign)
    return csr_matrix((np.ones(n, dtype=np.float32), (assign, np.arange(n))), shape=(k, n))


def assign_clusters(vectors: np.ndarray, centroids: np.ndarray, algorithm: str,
                    block_rows: int = 8192) -> np.ndarray:
    """Cluster index of each row under the layout's own rule (int64 ``[n]``)."""
    check_algorithm(algorithm)
    vectors = np.asarray(vectors, dtype=np.float32)
    out = np.empty(len(vectors), dtype=np.int64)
    half_sq = 0.5 * np.einsum("ij,ij->i", centroids, centroids) if algorithm == "kmeans" else None
    for start in range(0, len(vectors), block_rows):
        scores = vectors[start:start + block_rows] @ centroids.T
        if half_sq is not None:   # argmin ||x-c||^2 == argmax <x,c> - ||c||^2/2
            scores -= half_sq
        out[start:start + block_rows] = np.argmax(scores, axis=1)
    return out


def linear_centroid_scorer(centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` so that ``W q + b`` ranks centroids as centroid routing does.

    IP and COSINE rank by ``<q, c>`` (the paper's MIPS routing); L2 ranks by
    ``-||q - c||^2``, which up to a per-query constant is ``2<q, c> - ||c||^2``.
    The scorer of centroid routing and the starting point of a trained router.
    """
    c = np.asarray(centroids, dtype=np.float32)
    if metric.upper() == "L2":
        return 2 * c, -np.einsum("ij,ij->i", c, c).astype(np.float32)
    return c.copy(), np.zeros(len(c), dtype=np.float32)


# --------------------------------------------------------------------------- sample size


def resolve_sample_size(spec: int | str | None, n_rows: int, n_clusters: int,
                        max_rows: int = DEFAULT_MAX_SAMPLE_ROWS, dim: int | None = None,
                        max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> int:
    """Rows to sample for k-means, from a user spec; never more than ``n_rows``.

    ``spec`` is ``None`` (the default rule: ``DEFAULT_SAMPLE_PER_CLUSTER`` = 256 rows per
    cluster, capped at ``max_rows`` and, when ``dim`` is given, at ``max_bytes`` of float32
    rows, but never below faiss's 39 per cluster), a row count (``50000`` or ``"50000"``), a
    multiple of the cluster count (``"256x"``, ``"39x"``) or ``"all"``. Explicit specs are not
    capped; the caller asked for them. Raises ``ValueError`` for malformed specs and for
    samples smaller than ``n_clusters``.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if n_rows < n_clusters:
        raise ValueError(f"{n_rows} rows cannot fill {n_clusters} clusters")
    if spec is None:
        cap = max_rows if dim is None else min(max_rows, max_bytes // (4 * dim))
        rows = max(min(DEFAULT_SAMPLE_PER_CLUSTER * n_clusters, cap),
                   FAISS_SAMPLE_PER_CLUSTER * n_clusters)
        return min(rows, n_rows)
    if isinstance(spec, bool):
        raise ValueError(f"sample size must be a row count, 'NNNx' or 'all', got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        rows = int(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
        try:
            if text == "all":
                return n_rows
            if text.endswith("x"):
                factor = float(text[:-1])
                if not np.isfinite(factor) or factor <= 0:
                    raise ValueError
                rows = int(np.ceil(factor * n_clusters))
            else:
                rows = int(text)
        except ValueError:
            raise ValueError(f"sample size must be a row count, 'NNNx' (rows per cluster) or "
                             f"'all', got {spec!r}") from None
    else:
        raise ValueError(f"sample size must be a row count, 'NNNx' or 'all', got {spec!r}")
    if rows < n_clusters:
        raise ValueError(f"sample size {spec!r} gives {rows} rows, fewer than the "
                         f"{n_clusters} clusters")
    return min(rows, n_rows)


# --------------------------------------------------------------------------- blocks
BlockSource = Callable[[], Iterable[np.ndarray]]


def array_block_source(x: np.ndarray, block_rows: int = 65536) -> BlockSource:
    """A re-iterable block source over an in-memory matrix (tests, benchmarks, small data)."""
    def blocks():
        for start in range(0, len(x), block_rows):
            yield x[start:start + block_rows]
    return blocks


def _open_blocks(blocks) -> Iterable[np.ndarray]:
    """One pass over ``blocks``: a callable returning an iterable, or a list/tuple of arrays."""
    if callable(blocks):
        return blocks()
    if isinstance(blocks, (list, tuple)):
        return blocks
    raise TypeError("blocks must be a callable returning an iterator of [n, d] arrays (one "
                    "fresh iterator per pass) or a list of arrays, not a one-shot iterator")


def _scores(x: np.ndarray, centroids: np.ndarray, half_sq: np.ndarray | None) -> np.ndarray:
    """Assignment scores (larger is better): <x, c>, minus ||c||^2 / 2 for standard k-means."""
    s = x @ centroids.T
    if half_sq is not None:
        s -= half_sq
    return s


def _half_sq(centroids: np.ndarray, algorithm: str) -> np.ndarray | None:
    return 0.5 * np.einsum("ij,ij->i", centroids, centroids) if algorithm == "kmeans" else None


# --------------------------------------------------------------------------- refinement
@dataclass
class LloydStats:
    """What one Lloyd pass saw, under the centroids it started from."""

    objective: float             # mean k-means objective of the *input* centroids (lower is better)
    counts: np.ndarray           # [L] rows per cluster under the input centroids
    rows: int
    reseeded: list[int]          # empty clusters given a new centroid (split of the largest)


def _row_objective(x: np.ndarray, best: np.ndarray, algorithm: str) -> np.ndarray:
    """Per-row objective from the best score: 1 - cos for spherical (x already unit),
    squared L2 distance for standard k-means (best = <x,c> - ||c||^2/2)."""
    if algorithm == "spherical":
        return 1.0 - best
    return np.maximum(np.einsum("ij,ij->i", x, x) - 2.0 * best, 0.0)


def kmeans_objective(blocks, centroids: np.ndarray, algorithm: str) -> float:
    """Mean k-means objective of ``centroids`` over every row of ``blocks`` (lower is better).

    Spherical: mean of ``1 - cos(x, c)`` for each row's best unit centroid. Standard: mean
    squared L2 distance to the nearest centroid.
    """
    check_algorithm(algorithm)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    half_sq = _half_sq(centroids, algorithm)
    total, rows = 0.0, 0
    for block in _open_blocks(blocks):
        x = np.asarray(block, dtype=np.float32)
        if not len(x):
            continue
        if algorithm == "spherical":
            x = normalize_rows(x)
        best = _scores(x, centroids, half_sq).max(axis=1)
        total += float(_row_objective(x, best, algorithm).astype(np.float64).sum())
        rows += len(x)
    if rows == 0:
        raise ValueError("no rows to evaluate")
    return total / rows


def lloyd_pass(blocks, centroids: np.ndarray, algorithm: str, empty: str = "split",
               progress=None) -> tuple[np.ndarray, LloydStats]:
    """One Lloyd step over every row of ``blocks``, block by block.

    Each row is assigned to its cluster under the layout rule; per-cluster sums (float64)
    and counts are accumulated, then each centroid becomes its cluster's mean (renormalised
    to unit length for spherical, whose rows are normalised first). Only one block and the
    ``[L, d]`` sums are in memory at a time. A cluster left empty keeps its centroid
    (``empty="keep"``) or, with ``empty="split"`` (faiss's rule), takes a slightly perturbed
    copy of the largest cluster's new centroid, which then shares that cluster's rows on the
    next pass or assignment. ``progress``: anything with ``update(n_rows)``.
    """
    check_algorithm(algorithm)
    if empty not in ("split", "keep"):
        raise ValueError(f"empty must be 'split' or 'keep', got {empty!r}")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = centroids.shape
    half_sq = _half_sq(centroids, algorithm)
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    total, rows = 0.0, 0
    for block in _open_blocks(blocks):
        x = np.asarray(block, dtype=np.float32)
        if not len(x):
            continue
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"block of shape {x.shape} does not match centroid dim {d}")
        if algorithm == "spherical":
            x = normalize_rows(x)
        scores = _scores(x, centroids, half_sq)
        assign = np.argmax(scores, axis=1)
        best = scores[np.arange(len(x)), assign]
        total += float(_row_objective(x, best, algorithm).astype(np.float64).sum())
        sums += _onehot(assign, k).astype(np.float64) @ x.astype(np.float64)
        counts += np.bincount(assign, minlength=k)
        rows += len(x)
        if progress is not None:
            progress.update(len(x))
    if rows == 0:
        raise ValueError("no rows to refine on")
    filled = counts > 0
    new = centroids.astype(np.float64)
    new[filled] = sums[filled] / counts[filled, None]
    reseeded: list[int] = []
    if empty == "split" and not filled.all():
        new, reseeded = _split_largest(new, counts.copy(), np.flatnonzero(~filled))
    if algorithm == "spherical":
        new = normalize_rows(new)
    return new.astype(np.float32), LloydStats(total / rows, counts, rows, reseeded)


_SPLIT_EPS = 1.0 / 1024.0


def _split_largest(centroids: np.ndarray, counts: np.ndarray, empty: np.ndarray):
    """faiss's empty-cluster rule: each empty cluster takes a perturbed copy of the currently
    largest cluster's centroid (even dims x(1+eps) on one side and x(1-eps) on the other, odd
    dims the reverse), and the two split that cluster's count."""
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    reseeded = []
    for e in empty:
        m = int(np.argmax(counts))
        if counts[m] < 2:          # nothing left to split (fewer distinct rows than clusters)
            break
        base = centroids[m].copy()
        centroids[m] = base * (1 + _SPLIT_EPS * sign)
        centroids[e] = base * (1 - _SPLIT_EPS * sign)
        counts[e] = counts[m] // 2
        counts[m] -= counts[e]
        reseeded.append(int(e))
    return centroids, reseeded


def refine_centroids(blocks, centroids: np.ndarray, algorithm: str, passes: int = 2,
                     progress=None, empty: str = "split", tol: float = 0.0,
                     history: list | None = None) -> np.ndarray:
    """Centroids after ``passes`` Lloyd steps over the whole collection (see :func:`lloyd_pass`).

    ``blocks`` is re-iterable: a callable returning a fresh iterator of float32 ``[n, d]``
    blocks on each call (one call per pass), or a list of blocks. Memory is one block plus
    ``[L, d]`` sums. Stops early when a pass improves the mean objective by less than ``tol``
    (relative). ``history``, when given, receives each pass's :class:`LloydStats`.
    """
    if passes < 0:
        raise ValueError(f"passes must be >= 0, got {passes}")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if algorithm == "spherical" and passes:
        centroids = normalize_rows(centroids).astype(np.float32)
    previous = None
    for p in range(passes):
        centroids, stats = lloyd_pass(blocks, centroids, algorithm, empty=empty, progress=progress)
        if history is not None:
            history.append(stats)
        log.info("refine pass %d/%d: objective %.6f of the centroids in, %d empty%s", p + 1, passes,
                 stats.objective, int((stats.counts == 0).sum()),
                 f", {len(stats.reseeded)} re-seeded" if stats.reseeded else "")
        if previous is not None and tol > 0 and previous - stats.objective <= tol * abs(previous):
            break
        previous = stats.objective
    return centroids


# --------------------------------------------------------------------------- balance
def balanced_capacity(n_rows: int, n_clusters: int, max_cluster_ratio: float) -> int:
    """Size bound ``ceil(max_cluster_ratio * n_rows / n_clusters)`` for :func:`assign_balanced`."""
    if not max_cluster_ratio >= 1.0:
        raise ValueError(f"max_cluster_ratio must be >= 1, got {max_cluster_ratio}")
    return int(np.ceil(max_cluster_ratio * n_rows / n_clusters - 1e-9))


def assign_balanced(vectors: np.ndarray, centroids: np.ndarray, algorithm: str,
                    capacity: int | None, sizes: np.ndarray, block_rows: int = 8192) -> np.ndarray:
    """Cluster of each row: its best cluster (layout rule) that still has room under ``capacity``.

    ``sizes`` (int64 ``[L]``, rows already in each cluster) is updated in place and also
    returned through the assignment, so a layout build can call this block by block and routed
    inserts can keep enforcing the bound. When more rows of a block want a cluster than it has
    room for, the rows that score highest for it get the room and the rest move to their next
    best cluster with room. ``capacity=None`` is unbounded and gives :func:`assign_clusters`
    exactly. Raises ``ValueError`` (with ``sizes`` untouched) when the rows cannot fit.
    """
    check_algorithm(algorithm)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k = len(centroids)
    if not isinstance(sizes, np.ndarray) or sizes.shape != (k,) or sizes.dtype.kind not in "iu":
        raise ValueError(f"sizes must be an integer array of shape ({k},)")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != centroids.shape[1]:
        raise ValueError(f"vectors of shape {vectors.shape} do not match centroids {centroids.shape}")
    if capacity is None:
        out = assign_clusters(vectors, centroids, algorithm, block_rows)
        sizes += np.bincount(out, minlength=k).astype(sizes.dtype)
        return out
    capacity = int(capacity)
    room_total = int(np.maximum(capacity - sizes, 0).sum())
    if room_total < len(vectors):
        raise ValueError(f"{len(vectors)} rows do not fit: {room_total} free slots left under "
                         f"capacity {capacity} x {k} clusters")
    half_sq = _half_sq(centroids, algorithm)
    out = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), block_rows):
        scores = _scores(vectors[start:start + block_rows], centroids, half_sq)
        out[start:start + len(scores)] = _greedy_fill(scores, capacity, sizes)
    return out


def assign_with_room(vectors: np.ndarray, centroids: np.ndarray, algorithm: str, sizes,
                     max_cluster_ratio: float | None, block_rows: int = 8192, share: int = 1
                     ) -> tuple[np.ndarray, int | None]:
    """Clusters of new rows joining clusters that hold ``sizes`` rows, under a size bound.

    What routed inserts into a layout built with ``max_cluster_ratio`` do: the bound follows
    the row count *after* these rows land, ``capacity = balanced_capacity(sizes.sum() + n, L,
    max_cluster_ratio)``, and each row goes to its best cluster under the layout rule that
    still has room (:func:`assign_balanced`: when more rows want a cluster than it has room
    for, the best-scoring ones get it and the rest take their next best cluster with room).
    A cluster already at or over the capacity takes no row. The rows always fit, since
    ``L x capacity >= sizes.sum() + n``. ``sizes`` is not modified. Returns ``(clusters,
    capacity)``; ``max_cluster_ratio=None`` is :func:`assign_clusters` with capacity None.

    ``share`` = W > 1: one of W writers placing rows at the same time, each seeing only its
    own rows between reads of the live sizes. The capacity is reckoned as if every writer
    wrote ``n`` rows now, and these rows get only ``1/W`` (rounded up) of each cluster's
    room, so W writers together keep the bound (``sizes`` should count this writer's rows
    since the last read W times: :meth:`.placement.ClusterSizes.estimate`).
    """
    check_algorithm(algorithm)
    sizes = np.asarray(sizes)
    k = len(centroids)
    if sizes.shape != (k,) or sizes.dtype.kind not in "iu" or (sizes < 0).any():
        raise ValueError(f"sizes must be non-negative integers of shape ({k},), got {sizes!r}")
    vectors = np.asarray(vectors, dtype=np.float32)
    if max_cluster_ratio is None:
        return assign_clusters(vectors, centroids, algorithm, block_rows), None
    if share < 1:
        raise ValueError(f"share must be a positive number of writers, got {share}")
    capacity = balanced_capacity(int(sizes.sum()) + share * len(vectors), k, max_cluster_ratio)
    taken = sizes.astype(np.int64)
    if share > 1:               # leave (W-1)/W of each cluster's room to the other writers
        room = np.maximum(capacity - taken, 0)
        taken = np.where(room > 0, capacity - -(-room // share), taken)
    out = assign_balanced(vectors, centroids, algorithm, capacity, taken, block_rows)
    return out, capacity


def _greedy_fill(scores: np.ndarray, capacity: int, sizes: np.ndarray) -> np.ndarray:
    n, k = scores.shape
    out = np.full(n, -1, dtype=np.int64)
    pending = np.arange(n)
    full = sizes >= capacity
    while len(pending):
        s = scores[pending]
        if full.any():
            s = s.copy()
            s[:, full] = -np.inf
        choice = np.argmax(s, axis=1)
        best = s[np.arange(len(pending)), choice]
        wanted = np.bincount(choice, minlength=k)
        room = capacity - sizes
        over = wanted > room
        accept = ~over[choice]
        out[pending[accept]] = choice[accept]
        sizes += np.bincount(choice[accept], minlength=k).astype(sizes.dtype)
        keep_pending = []
        for c in np.flatnonzero(over):   # oversubscribed: the best-scoring rows get the room
            rows = np.flatnonzero(choice == c)
            order = rows[np.argsort(-best[rows], kind="stable")]
            take = order[:room[c]]
            out[pending[take]] = c
            sizes[c] += len(take)
            keep_pending.append(order[room[c]:])
        full = sizes >= capacity
        pending = pending[np.sort(np.concatenate(keep_pending))] if keep_pending else pending[:0]
    return out


def size_summary(sizes) -> dict:
    """min / median / max cluster size, max over mean (1.0 = perfectly even) and empty count."""
    sizes = np.asarray(sizes)
    if sizes.size == 0:
        raise ValueError("no clusters")
    mean = float(sizes.mean())
    return {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
            "max_over_mean": float(sizes.max() / mean) if mean > 0 else float("nan"),
            "empty": int((sizes == 0).sum())}
