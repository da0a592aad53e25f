"""A sample that depends on the rows, not on the order they are read in.

Milvus returns rows in no fixed order (segments, parallel reads, compaction), so a
reservoir sample of a read-out changes from one build to the next. :func:`keyed_sample`
keeps the ``size`` rows whose seeded hash of their primary key is smallest (bottom-k
sampling: a uniform sample when the hash is), returned in hash order, so one seed on the
same rows gives the same k-means sample - and the same layout - whatever the read order.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def key_hashes(keys, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit hash of each primary key (integers or strings)."""
    keys = np.asarray(keys)
    if keys.dtype.kind in "iu":
        salt = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        return _splitmix64(keys.astype(np.int64).view(np.uint64) ^ salt)
    salt = int(seed).to_bytes(16, "little", signed=True)
    return np.asarray([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8,
                                                      key=salt).digest(), "little")
                       for k in keys], dtype=np.uint64)


def keyed_sample(blocks: Iterable[tuple[np.ndarray, np.ndarray]], size: int,
                 seed: int = 0) -> np.ndarray:
    """The ``size`` rows of ``(keys, vectors)`` blocks with the smallest key hashes, in hash
    order (fewer when the stream is shorter); memory bounded by the sample."""
    if size < 1:
        raise ValueError(f"sample size must be >= 1, got {size}")
    best_h = np.empty(0, dtype=np.uint64)
    best_v: np.ndarray | None = None
    for keys, vectors in blocks:
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            continue
        h = key_hashes(keys, seed)
        if best_v is None:
            best_v = np.empty((0, vectors.shape[1]), dtype=np.float32)
        hs = np.concatenate([best_h, h])
        vs = np.concatenate([best_v, vectors])
        if len(hs) > size:
            keep = np.argpartition(hs, size - 1)[:size]
            hs, vs = hs[keep], vs[keep]
        best_h, best_v = hs, vs
    if best_v is None:
        return np.empty((0, 0), dtype=np.float32)
    order = np.argsort(best_h, kind="stable")
    return np.ascontiguousarray(best_v[order])
