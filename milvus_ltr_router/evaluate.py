"""How well a router's probed partitions cover each query's exact neighbours.

* top-1 accuracy - fraction of queries whose exact top-1 neighbour lies in a
  probed partition (the paper's measure). A query whose top-1 score is tied by
  a row in another partition has no well-defined top-1 partition: it counts as
  a miss for every router, never as a free hit for one that learned the
  tie-break (``Neighbours.top1_tied``);
* recall@k - fraction of the exact top-k neighbours inside the probed partitions,
  i.e. the recall a partition-restricted exact search would reach.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .labels import Neighbours


@dataclass
class RoutingQuality:
    nprobe: int
    top1_accuracy: float
    recall: float          # recall@k
    k: int
    mean_probed: float     # mean partitions probed per query (= nprobe unless adaptive)


def coverage(probed: np.ndarray, neighbour_parts: np.ndarray) -> np.ndarray:
    """Boolean ``[Q, k]``: is each neighbour's partition among the query's probed ones?

    ``probed`` is ``[Q, nprobe]`` partition indices (rows may be padded with -1).
    """
    probed = np.asarray(probed)
    parts = np.asarray(neighbour_parts)
    if probed.shape[0] != parts.shape[0]:
        raise ValueError(f"{probed.shape[0]} routed queries vs {parts.shape[0]} neighbour rows")
    hit = (parts[:, :, None] == probed[:, None, :]).any(axis=2)
    return hit & (parts >= 0)


def routing_quality(probed: np.ndarray, neighbours: Neighbours, k: int = 10) -> RoutingQuality:
    """Quality of one routing decision ``probed`` ``[Q, nprobe]`` against exact neighbours."""
    k = min(k, neighbours.partitions.shape[1])
    parts = neighbours.partitions[:, :k]
    hit = coverage(probed, parts)
    valid = (parts >= 0).sum(axis=1)
    recall = float((hit.sum(axis=1) / np.maximum(valid, 1)).mean())
    top1_hit = hit[:, 0]
    if neighbours.top1_tied is not None:
        top1_hit = top1_hit & ~np.asarray(neighbours.top1_tied, dtype=bool)
    n_probed = (np.asarray(probed) >= 0).sum(axis=1)
    return RoutingQuality(nprobe=int(np.asarray(probed).shape[1]), top1_accuracy=float(top1_hit.mean()),
                          recall=recall, k=k, mean_probed=float(n_probed.mean()))


def pad_routes(routes: list[np.ndarray]) -> np.ndarray:
    """Variable-length partition lists as one ``[Q, max_len]`` array padded with -1."""
    width = max((len(r) for r in routes), default=1)
    out = np.full((len(routes), width), -1, dtype=np.int64)
    for i, r in enumerate(routes):
        out[i, :len(r)] = r
    return out


def evaluate_adaptive(router, queries: np.ndarray, neighbours: Neighbours,
                      recall_targets: Sequence[float], k: int = 10, min_nprobe: int = 1,
                      max_nprobe: int | None = None) -> list[tuple[float, RoutingQuality]]:
    """Quality of adaptive routing at each probability-mass target."""
    return [(t, routing_quality(pad_routes(router.rank_adaptive(queries, t, min_nprobe, max_nprobe)),
                                neighbours, k)) for t in recall_targets]


def evaluate_router(router, queries: np.ndarray, neighbours: Neighbours,
                    nprobes: Sequence[int], k: int = 10) -> list[RoutingQuality]:
    """Quality of ``router`` at each ``nprobe`` (one scoring pass, reused for all)."""
    order = router.rank(queries, max(nprobes))
    return [routing_quality(order[:, :n], neighbours, k) for n in nprobes]


def nprobe_grid(n_partitions: int, fractions=(0.001, 0.01, 0.02, 0.05, 0.1)) -> list[int]:
    """The paper's probe budgets as fractions of L (at least 1 partition), plus 1 and 2."""
    values = {1, min(2, n_partitions)} | {max(1, int(round(f * n_partitions))) for f in fractions}
    return sorted(v for v in values if v <= n_partitions)
