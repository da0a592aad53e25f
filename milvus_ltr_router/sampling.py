"""Uniform sampling from a stream of vector blocks, in memory bounded by the sample."""
from __future__ import annotations

from typing import Iterable

import numpy as np


def reservoir_sample(blocks: Iterable[np.ndarray], size: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of ``size`` rows from blocks of ``[b, d]`` rows (Algorithm R, blockwise).

    Returns fewer rows when the stream is shorter than ``size``; order is not meaningful.
    """
    if size < 1:
        raise ValueError(f"sample size must be >= 1, got {size}")
    rng = np.random.default_rng(seed)
    sample: np.ndarray | None = None
    seen = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if len(block) == 0:
            continue
        if sample is None:
            sample = np.empty((size, block.shape[1]), dtype=np.float32)
        take = min(len(block), max(0, size - seen))
        sample[seen:seen + take] = block[:take]
        rest = block[take:]
        if len(rest):
            pos = seen + take + np.arange(len(rest))          # stream positions of `rest`
            slots = (rng.random(len(rest)) * (pos + 1)).astype(np.int64)
            keep = slots < size
            sample[slots[keep]] = rest[keep]                  # later rows overwrite earlier: still uniform
        seen += len(block)
    if sample is None:
        return np.empty((0, 0), dtype=np.float32)
    return sample[:min(size, seen)]
