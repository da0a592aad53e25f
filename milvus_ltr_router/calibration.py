"""Temperature calibration and probability-mass stopping for adaptive nprobe.

A router's softmax over partitions estimates where a query's neighbours are.
After fitting one temperature on held-out queries (minimum cross-entropy
against the observed neighbour distribution), probing the fewest partitions
whose probability mass reaches a target gives each query its own nprobe:
confident queries probe one or two partitions, ambiguous ones more. With
top-k multi-label training the mass estimates recall@k directly.
"""
from __future__ import annotations

import numpy as np


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def target_distribution(neighbour_partitions: np.ndarray, n_partitions: int) -> np.ndarray:
    """Fraction of each query's neighbours per partition (one-hot for a single column)."""
    parts = np.asarray(neighbour_partitions)
    if parts.ndim == 1:
        parts = parts[:, None]
    out = np.zeros((len(parts), n_partitions))
    rows = np.repeat(np.arange(len(parts)), parts.shape[1])
    flat = parts.reshape(-1)
    ok = flat >= 0
    np.add.at(out, (rows[ok], flat[ok]), 1.0)
    out /= np.maximum(out.sum(axis=1, keepdims=True), 1)
    return out


def fit_temperature(scores: np.ndarray, targets: np.ndarray,
                    grid=np.exp(np.linspace(np.log(0.05), np.log(20), 121))) -> float:
    """Temperature minimising cross-entropy of ``softmax(scores / T)`` against ``targets``."""
    scores = np.asarray(scores, dtype=np.float64)
    best_t, best_loss = 1.0, np.inf
    for t in grid:
        z = scores / t
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -(targets * logp).sum(axis=1).mean()
        if loss < best_loss:
            best_t, best_loss = float(t), loss
    return best_t


LAMBDA_GRID = tuple(float(x) for x in np.geomspace(0.5, 1e-4, 64))


def neighbour_ranks(probabilities: np.ndarray, neighbour_partitions: np.ndarray) -> np.ndarray:
    """Rank (0 = most probable) of each neighbour's partition in each query's ordering.

    ``-1`` partitions (no neighbour) get rank ``L`` so they are never covered.
    """
    order = np.argsort(-probabilities, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(len(order), 0), 1)
    parts = np.asarray(neighbour_partitions)
    out = np.take_along_axis(rank, np.maximum(parts, 0), 1)
    return np.where(parts >= 0, out, order.shape[1])


def threshold_counts(probabilities: np.ndarray, threshold: float, min_nprobe: int = 1,
                     max_nprobe: int | None = None) -> np.ndarray:
    """Per query, how many partitions have probability >= ``threshold`` (clipped to the bounds)."""
    cap = probabilities.shape[1] if max_nprobe is None else min(max_nprobe, probabilities.shape[1])
    if not 1 <= min_nprobe <= cap:
        raise ValueError(f"need 1 <= min_nprobe ({min_nprobe}) <= max_nprobe ({cap})")
    return np.clip((probabilities >= threshold).sum(axis=1), min_nprobe, cap)


def recall_table(probabilities: np.ndarray, neighbour_partitions: np.ndarray,
                 grid=LAMBDA_GRID) -> list[tuple[float, float, float]]:
    """``(threshold, recall@k, mean partitions probed)`` on held-out queries, for each threshold.

    Probing every partition whose probability (the expected share of a query's
    neighbours it holds) reaches one global threshold spends the probe budget
    where the expected recall gain is largest, unlike a fixed nprobe.
    """
    ranks = neighbour_ranks(probabilities, neighbour_partitions)
    valid = np.maximum((np.asarray(neighbour_partitions) >= 0).sum(axis=1), 1)
    rows = []
    for lam in grid:
        counts = threshold_counts(probabilities, lam)
        recall = float(((ranks < counts[:, None]).sum(axis=1) / valid).mean())
        rows.append((float(lam), recall, float(counts.mean())))
    return rows


def threshold_for(table: list, recall_target: float) -> float:
    """The largest threshold whose held-out recall reaches ``recall_target`` (else the smallest)."""
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    if not table:
        raise ValueError("this router has no recall calibration; retrain it or call calibrate()")
    ok = [lam for lam, recall, _ in table if recall >= recall_target]
    return max(ok) if ok else min(lam for lam, _, _ in table)
