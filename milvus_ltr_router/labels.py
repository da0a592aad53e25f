"""Exact maximum-inner-product neighbours over a streamed collection, and routing labels.

Modelled on faiss's ``contrib.exhaustive_search.knn_ground_truth``: the
collection arrives as an iterator of blocks, each block is one BLAS matmul
against the queries, and a running top-k is merged in. Memory is bounded by
the block size and the number of queries, never by the collection size.

The paper's label for a query is the partition that holds its exact top-1
neighbour; the partitions of the top-k are kept too (multi-label training).
When rows of two partitions share a query's exact top-1 score (an all-zero
query ties everywhere), that label is an arbitrary tie-break: ``exact_knn``
flags such queries (``Neighbours.top1_tied``) so that training can drop them
and evaluation never counts them as hits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .clustering import normalize_rows

log = logging.getLogger(__name__)

METRICS = ("IP", "COSINE", "L2")


@dataclass
class Neighbours:
    """Exact top-k neighbours of each query, best first."""

    ids: np.ndarray         # [Q, k] int64 primary keys (-1 where the collection ran out)
    scores: np.ndarray      # [Q, k] float32, larger is better (L2: -squared distance)
    partitions: np.ndarray  # [Q, k] int64 partition index of each neighbour (-1 if none)
    # [Q] bool: a row of another partition has exactly the top-1 score (None: not computed)
    top1_tied: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """The paper's label: the partition of each query's top-1 neighbour."""
        return self.partitions[:, 0]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx) -> "Neighbours":
        """The rows ``idx`` (an index array or boolean mask), tie flags included."""
        tied = None if self.top1_tied is None else self.top1_tied[idx]
        return Neighbours(self.ids[idx], self.scores[idx], self.partitions[idx], tied)


Block = tuple[np.ndarray, np.ndarray, np.ndarray]   # (ids [b], vectors [b, d], partition [b])


def check_metric(metric: str) -> str:
    metric = metric.upper()
    if metric not in METRICS:
        raise ValueError(f"unsupported metric {metric!r}; choose one of {METRICS}")
    return metric


def exact_knn(queries: np.ndarray, blocks: Iterable[Block], k: int = 10, metric: str = "IP",
              max_scores: int = 1 << 24) -> Neighbours:
    """Exact top-``k`` neighbours of ``queries`` over all rows that ``blocks`` yields.

    ``blocks`` yields ``(ids, vectors, partition)`` triples: a block of primary
    keys, their vectors and the partition index of each row (a scalar or an
    array). Scores: inner product (IP), cosine (COSINE) or negative squared L2.
    Queries are scored in chunks of at most ``max_scores`` entries per block
    (64 MiB of float32 by default), which bounds memory whatever the block size.
    ``top1_tied`` of the result flags queries whose top-1 score is reached
    exactly by rows of more than one partition, wherever those rows are (not
    only within the top ``k``).
    """
    metric = check_metric(metric)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be 2-D [Q, d], got shape {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if metric == "COSINE":
        queries = normalize_rows(queries)
    n_q, dim = queries.shape
    best_s = np.full((n_q, k), -np.inf, dtype=np.float32)
    best_i = np.full((n_q, k), -1, dtype=np.int64)
    best_p = np.full((n_q, k), -1, dtype=np.int64)
    top1_s = np.full(n_q, -np.inf, dtype=np.float32)      # best score so far, its partition,
    top1_p = np.full(n_q, -1, dtype=np.int64)             # and whether another partition ties it
    tied = np.zeros(n_q, dtype=bool)
    q_sq = np.einsum("ij,ij->i", queries, queries) if metric == "L2" else None
    for ids, vecs, parts in blocks:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if len(vecs) == 0:
            continue
        if vecs.ndim != 2 or vecs.shape[1] != dim:
            raise ValueError(f"block of shape {vecs.shape} does not match query dimension {dim}")
        ids = np.asarray(ids, dtype=np.int64)
        parts = np.broadcast_to(np.asarray(parts, dtype=np.int64), ids.shape)
        if metric == "COSINE":
            vecs = normalize_rows(vecs)
        x_sq = np.einsum("ij,ij->i", vecs, vecs) if metric == "L2" else None
        query_chunk = max(1, max_scores // len(vecs))
        for q0 in range(0, n_q, query_chunk):
            q1 = min(n_q, q0 + query_chunk)
            scores = queries[q0:q1] @ vecs.T
            if metric == "L2":
                scores *= 2
                scores -= x_sq
                scores -= q_sq[q0:q1, None]
            _track_top1_ties(scores, parts, top1_s[q0:q1], top1_p[q0:q1], tied[q0:q1])
            _merge_topk(scores, ids, parts, best_s[q0:q1], best_i[q0:q1], best_p[q0:q1], k)
    order = np.argsort(-best_s, axis=1, kind="stable")
    take = np.take_along_axis
    return Neighbours(ids=take(best_i, order, 1), scores=take(best_s, order, 1),
                      partitions=take(best_p, order, 1), top1_tied=tied)


def _track_top1_ties(scores, parts, top_s, top_p, tied) -> None:
    """Fold one block into each query's best score, its partition and its tie flag (in place).

    A query is tied when a row of a partition other than the best row's has
    exactly the best score. Only queries whose block maximum reaches their
    best so far are examined row by row, so after the first blocks this is
    one ``argmax`` pass over the scores.
    """
    arg = scores.argmax(axis=1)
    block_s = scores[np.arange(len(scores)), arg]
    rows = np.nonzero(block_s >= top_s)[0]
    if len(rows) == 0:
        return
    block_s, block_p = block_s[rows], parts[arg[rows]]
    block_tied = ((scores[rows] == block_s[:, None]) & (parts[None, :] != block_p[:, None])).any(axis=1)
    better = block_s > top_s[rows]
    up = rows[better]
    top_s[up], top_p[up], tied[up] = block_s[better], block_p[better], block_tied[better]
    same = rows[~better]
    tied[same] |= block_tied[~better] | (block_p[~better] != top_p[same])


def _merge_topk(scores, ids, parts, best_s, best_i, best_p, k) -> None:
    """Fold one block's scores into the running top-k (in place).

    Once every query has k finite scores, only entries above the query's
    current k-th best can enter: a single comparison pass finds those few
    candidates, so the expensive partial sort touches only them. Until then
    (the first blocks) a full argpartition of the block is used.
    """
    kth = best_s.min(axis=1)
    if np.isfinite(kth).all():
        rows, cols = np.nonzero(scores > kth[:, None])
        if len(rows) == 0:
            return
        _merge_candidates(rows, scores[rows, cols], ids[cols], parts[cols], best_s, best_i, best_p, k)
        return
    n_b = scores.shape[1]
    if n_b > k:   # block's own top-k first: the big argpartition touches only [q, n_b]
        cand = np.argpartition(scores, n_b - k, axis=1)[:, n_b - k:]
        cand_s = np.take_along_axis(scores, cand, 1)
    else:
        cand = np.broadcast_to(np.arange(n_b), scores.shape)
        cand_s = scores
    _keep_best(np.arange(len(scores)), cand_s, ids[cand], parts[cand], best_s, best_i, best_p, k)


def _merge_candidates(rows, cand_s, cand_i, cand_p, best_s, best_i, best_p, k) -> None:
    """Merge a sparse list of (query row, score, id, partition) candidates into the top-k."""
    order = np.lexsort((-cand_s, rows))                 # by row, best score first
    rows, cand_s, cand_i, cand_p = rows[order], cand_s[order], cand_i[order], cand_p[order]
    affected, start, counts = np.unique(rows, return_index=True, return_counts=True)
    rank = np.arange(len(rows)) - np.repeat(start, counts)
    keep = rank < k                                     # at most k new candidates per row
    width = int(min(k, counts.max()))
    slot = np.searchsorted(affected, rows[keep])
    pad_s = np.full((len(affected), width), -np.inf, dtype=np.float32)
    pad_i = np.full((len(affected), width), -1, dtype=np.int64)
    pad_p = np.full((len(affected), width), -1, dtype=np.int64)
    pad_s[slot, rank[keep]] = cand_s[keep]
    pad_i[slot, rank[keep]] = cand_i[keep]
    pad_p[slot, rank[keep]] = cand_p[keep]
    _keep_best(affected, pad_s, pad_i, pad_p, best_s, best_i, best_p, k)


def _keep_best(rows, cand_s, cand_i, cand_p, best_s, best_i, best_p, k) -> None:
    all_s = np.concatenate([best_s[rows], cand_s], axis=1)
    all_i = np.concatenate([best_i[rows], cand_i], axis=1)
    all_p = np.concatenate([best_p[rows], cand_p], axis=1)
    keep = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
    best_s[rows] = np.take_along_axis(all_s, keep, 1)
    best_i[rows] = np.take_along_axis(all_i, keep, 1)
    best_p[rows] = np.take_along_axis(all_p, keep, 1)


def array_blocks(vectors: np.ndarray, partitions: np.ndarray, ids: np.ndarray | None = None,
                 block_rows: int = 65536) -> Iterator[Block]:
    """Blocks over in-memory arrays: for tests, benchmarks and small data."""
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids)
    for start in range(0, len(vectors), block_rows):
        sl = slice(start, start + block_rows)
        yield ids[sl], vectors[sl], partitions[sl]


def degenerate_rows(arr: np.ndarray) -> np.ndarray:
    """Boolean mask of rows that carry no direction: all-zero or constant (every component
    equal - placeholder or padding vectors). Against a zero query every row of every
    partition scores the same, so its exact "top-1 partition" is an arbitrary tie-break
    that a router can learn for free; constant vectors are dropped with them."""
    if arr.shape[1] == 1:
        return arr[:, 0] == 0
    return arr.max(axis=1) == arr.min(axis=1)


def clean_queries(queries: np.ndarray, dim: int | None = None, name: str = "queries") -> np.ndarray:
    """Validate a query matrix at the boundary: 2-D, numeric, right dimension; drop NaN/inf
    rows and degenerate (all-zero or constant) rows.

    Returns float32 rows; logs how many rows of each kind were dropped.
    """
    arr = np.asarray(queries)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [n, dim], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: vectors of dimension 0 (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: dimension {arr.shape[1]} does not match the collection's {dim}")
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        log.warning("%s: dropped %d rows with NaN or inf", name, int((~finite).sum()))
        arr = arr[finite]
    degenerate = degenerate_rows(arr) if len(arr) else np.zeros(0, dtype=bool)
    if degenerate.any():
        log.warning("%s: dropped %d all-zero or constant rows (no direction to route by)",
                    name, int(degenerate.sum()))
        arr = arr[~degenerate]
    return arr
