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


def mass_cutoff(probabilities: np.ndarray, target: float, min_nprobe: int = 1,
                max_nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Partitions in descending probability, and per query how many reach ``target`` mass.

    Returns ``(order [Q, cap], counts [Q])`` with ``min_nprobe <= counts <= cap``.
    """
    if not 0 < target <= 1:
        raise ValueError(f"recall_target must be in (0, 1], got {target}")
    n_parts = probabilities.shape[1]
    cap = n_parts if max_nprobe is None else min(max_nprobe, n_parts)
    if not 1 <= min_nprobe <= cap:
        raise ValueError(f"need 1 <= min_nprobe ({min_nprobe}) <= max_nprobe ({cap})")
    if cap < n_parts:
        top = np.argpartition(-probabilities, cap - 1, axis=1)[:, :cap]
    else:
        top = np.broadcast_to(np.arange(n_parts), probabilities.shape)
    p_top = np.take_along_axis(probabilities, top, 1)
    order = np.argsort(-p_top, axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    mass = np.cumsum(np.take_along_axis(p_top, order, 1), axis=1)
    counts = (mass < target - 1e-12).sum(axis=1) + 1
    return top, np.clip(counts, min_nprobe, cap)
