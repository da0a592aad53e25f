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

import numpy as np

log = logging.getLogger(__name__)

ALGORITHMS = ("spherical", "kmeans")


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
        raise ValueError(f"vector dimension {x.shape[-1] if x.ndim else '?'} does not match "
                         f"{owner} dim={dim}")
    return np.ascontiguousarray(x)


def default_n_clusters(n_rows: int) -> int:
    """round(sqrt(N)), the paper's choice, at least 1."""
    return max(1, int(round(np.sqrt(n_rows))))


def fit_centroids(sample: np.ndarray, n_clusters: int, algorithm: str = "spherical",
                  seed: int = 0, max_iter: int = 25) -> np.ndarray:
    """Centroids ``[n_clusters, d]`` float32 learned from ``sample`` (k-means++ start).

    Spherical centroids are unit vectors; standard ones are plain means.
    """
    check_algorithm(algorithm)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < n_clusters:
        raise ValueError(f"need at least n_clusters={n_clusters} sample rows, got {len(sample)}")
    if algorithm == "kmeans":
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=max_iter, random_state=seed)
        km.fit(sample)
        return km.cluster_centers_.astype(np.float32)
    return _spherical_kmeans(normalize_rows(sample), n_clusters, seed, max_iter)


def _spherical_kmeans(x: np.ndarray, k: int, seed: int, max_iter: int) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus
    rng = np.random.default_rng(seed)
    centroids, _ = kmeans_plusplus(x, k, random_state=seed)
    centroids = normalize_rows(centroids.astype(np.float32))
    assign = None
    for it in range(max_iter):
        new_assign = np.argmax(x @ centroids.T, axis=1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        empty = np.flatnonzero(np.bincount(assign, minlength=k) == 0)
        if len(empty):  # re-seed empty clusters with random rows, as faiss does
            sums[empty] = x[rng.choice(len(x), len(empty), replace=False)]
        centroids = normalize_rows(sums)
    log.debug("spherical k-means stopped after %d iterations", it + 1)
    return centroids.astype(np.float32)


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
