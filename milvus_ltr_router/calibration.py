"""Calibration for adaptive nprobe: temperature, a learned stopping model, a recall table.

A router's softmax over partitions estimates where a query's neighbours are.
Adaptive nprobe probes, for each query, every partition whose *expected share
of the query's top-k neighbours* reaches one global threshold: that spends the
probe budget where the expected recall gain per partition is largest (the
Lagrangian solution of "most recall for a mean number of partitions"), so
confident queries probe one or two partitions and ambiguous ones many.

How good the rule is depends on how well the expected shares compare *across*
queries. The raw softmax is not enough: a partition at rank 5 with probability
0.02 means something different for a flat distribution than for a peaked one.
:class:`StoppingModel` (a logistic model over the shape of each query's ranked
probabilities - rank, log-probability, gap to the best, mass already covered,
entropy) is fitted on held-out queries and predicts the shares; serving
evaluates it with numpy only. A table from other held-out queries then maps a
threshold to the recall@k and mean partitions it gave, so a caller asks for a
recall target, not a threshold.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

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


LAMBDA_GRID = tuple(float(x) for x in np.geomspace(0.9, 1e-5, 120))
N_FEATURES = 8


def _ranked(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's partitions best first ``[Q, L]`` and their probabilities in that order."""
    p = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    return order, np.take_along_axis(p, order, 1)


@functools.lru_cache(maxsize=8)
def _log_ranks(n_partitions: int) -> np.ndarray:
    """``log(1 + rank)`` for ranks ``0..L-1`` (read-only, shared between calls)."""
    out = np.log1p(np.arange(n_partitions, dtype=np.float64))
    out.setflags(write=False)
    return out


def _ranked_features(probabilities: np.ndarray) -> tuple[np.ndarray, list]:
    """Each query's partitions best first ``[Q, L]`` and its stopping features, one
    ``[Q, L]``-broadcastable array per feature (see :func:`ranked_profile`)."""
    order, ps = _ranked(probabilities)
    lp = np.log(ps + 1e-12)
    entropy = -(ps * lp).sum(axis=1, keepdims=True)
    before = np.cumsum(ps, axis=1) - ps
    rank = _log_ranks(ps.shape[1])[None, :]
    return order, [lp, rank, lp[:, :1], entropy, lp - lp[:, :1],
                   np.log(np.clip(1 - before, 1e-9, None)), lp * rank, ps]


def ranked_profile(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's partitions best first ``[Q, L]`` and stopping features ``[Q, L, F]``.

    Features of the partition at rank r: log p, log(1 + r), the query's best
    log p, its entropy, log p - best log p, log of the mass not yet covered
    before r, log p * log(1 + r), and p itself.
    """
    order, feats = _ranked_features(probabilities)
    return order, np.stack([np.broadcast_to(f, order.shape) for f in feats], axis=-1)


@dataclass
class StoppingModel:
    """Logistic model of the share of a query's top-k neighbours a partition holds."""

    coef: list
    intercept: float

    def shares(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(order, shares)``: partitions best first and their predicted shares, made
        non-increasing along each row so a threshold always selects a prefix.

        Serving hot path: the linear model is folded into per-rank coefficient
        vectors, so a query costs one sort and a handful of array operations
        instead of eight feature arrays (same values as :func:`ranked_profile`).
        """
        order, ps = _ranked(probabilities)
        c = self.coef
        rank = _log_ranks(ps.shape[1])
        lp = np.log(ps + 1e-12)
        best = lp[:, :1]
        entropy = -(ps * lp).sum(axis=1, keepdims=True)
        remaining = 1.0 - np.cumsum(ps, axis=1)
        remaining += ps                                          # mass not covered before r
        np.log(np.maximum(remaining, 1e-9, out=remaining), out=remaining)
        z = lp * (c[0] + c[4] + c[6] * rank)                    # log p, gap to best, log p * rank
        z += self.intercept + c[1] * rank
        z += (c[2] - c[4]) * best + c[3] * entropy
        z += c[5] * remaining
        z += c[7] * ps
        np.minimum.accumulate(z, axis=1, out=z)                 # sigmoid is monotone
        return order, 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def fit(cls, probabilities: np.ndarray, neighbour_partitions: np.ndarray,
            max_rank: int = 128, max_rows: int = 1_000_000, seed: int = 0) -> "StoppingModel":
        """Fit on held-out queries: targets are each partition's observed neighbour share.

        Only the ``max_rank`` best partitions per query enter (beyond them shares
        are ~0) and at most ``max_rows`` (query, partition) pairs, so fitting costs
        seconds whatever the number of queries.
        """
        from sklearn.linear_model import LogisticRegression
        probabilities = np.asarray(probabilities)
        rng = np.random.default_rng(seed)
        m = min(max_rank, probabilities.shape[1])
        n_q = min(len(probabilities), max(1, max_rows // m))
        rows = np.sort(rng.choice(len(probabilities), n_q, replace=False))
        order, feats = ranked_profile(probabilities[rows])
        share = np.take_along_axis(target_distribution(neighbour_partitions[rows],
                                                       probabilities.shape[1]), order, 1)
        x = feats[:, :m].reshape(-1, N_FEATURES)
        y = share[:, :m].reshape(-1)
        # fractional targets as weighted positive and negative copies of each row
        xx, yy, ww = np.concatenate([x, x]), np.r_[np.ones(len(y)), np.zeros(len(y))], np.r_[y, 1 - y]
        keep = ww > 0
        model = LogisticRegression(max_iter=500).fit(xx[keep], yy[keep], sample_weight=ww[keep])
        return cls([float(c) for c in model.coef_[0]], float(model.intercept_[0]))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict | None) -> "StoppingModel | None":
        if not value:
            return None
        model = cls([float(c) for c in value["coef"]], float(value["intercept"]))
        if len(model.coef) != N_FEATURES:
            raise ValueError(f"stopping model has {len(model.coef)} coefficients, "
                             f"expected {N_FEATURES}")
        return model


@dataclass(frozen=True)
class Calibration:
    """What adaptive nprobe needs, fitted on held-out queries: pure data.

    ``temperature`` scales the router's adaptive scores before the softmax,
    ``stopping_model`` predicts each partition's neighbour share (``None``:
    threshold the probabilities themselves) and ``recall_thresholds`` holds
    ``(threshold, recall@k, mean partitions probed)`` rows. A router carries
    one through :meth:`~.router.BaseRouter.with_calibration`; an exported
    router in its metadata (:meth:`to_metadata`).
    """

    temperature: float
    recall_thresholds: list
    stopping_model: StoppingModel | None = None

    def to_metadata(self) -> dict:
        """Keyword values for :func:`~.export.export_router` / :class:`~.contract.RouterMetadata`."""
        return {"temperature": self.temperature,
                "recall_thresholds": [list(row) for row in self.recall_thresholds],
                "stopping_model": None if self.stopping_model is None else self.stopping_model.to_json()}


def fit_calibration(scores: np.ndarray, neighbour_partitions: np.ndarray,
                    stopping_model: bool = True, seed: int = 0) -> Calibration:
    """Calibrate adaptive nprobe from held-out queries' adaptive scores ``[Q, L]`` and the
    partitions of their top-k neighbours ``[Q, k]``.

    The temperature uses all queries; the stopping model one half and the
    recall table the other (with >= 200 queries), so the table measures the
    model on queries it was not fitted to.
    """
    scores = np.asarray(scores)
    parts = np.asarray(neighbour_partitions)
    if scores.ndim != 2 or parts.ndim not in (1, 2) or len(parts) != len(scores) or not len(scores):
        raise ValueError(f"calibration needs scores [Q, L] and neighbour partitions [Q, k] for "
                         f"the same Q > 0 queries, got {scores.shape} and {parts.shape}")
    temperature = fit_temperature(scores, target_distribution(parts, scores.shape[1]))
    probs = softmax(scores, temperature)
    model, table_rows = None, np.arange(len(probs))
    if stopping_model:
        perm = np.random.default_rng(seed).permutation(len(probs))
        fit_rows, table_rows = (perm[: len(perm) // 2], perm[len(perm) // 2:]) \
            if len(perm) >= 200 else (perm, perm)
        model = StoppingModel.fit(probs[fit_rows], parts[fit_rows], seed=seed)
    table = recall_table(probs[table_rows], parts[table_rows], model=model)
    return Calibration(temperature, [list(row) for row in table], model)


def expected_shares(probabilities: np.ndarray,
                    model: StoppingModel | None) -> tuple[np.ndarray, np.ndarray]:
    """``(order, values)`` for threshold routing: the stopping model's shares, or the
    sorted probabilities themselves for routers calibrated without one."""
    return _ranked(probabilities) if model is None else model.shares(probabilities)


def neighbour_ranks(probabilities: np.ndarray, neighbour_partitions: np.ndarray) -> np.ndarray:
    """Rank (0 = most probable) of each neighbour's partition in each query's ordering.

    ``-1`` partitions (no neighbour) get rank ``L`` so they are never covered.
    """
    return ranks_in(_ranked(probabilities)[0], neighbour_partitions)


def ranks_in(order: np.ndarray, neighbour_partitions: np.ndarray) -> np.ndarray:
    """Rank of each neighbour's partition within ``order`` (partitions best first per query)."""
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(len(order), 0), 1)
    parts = np.asarray(neighbour_partitions)
    out = np.take_along_axis(rank, np.maximum(parts, 0), 1)
    return np.where(parts >= 0, out, order.shape[1])


def threshold_counts(values: np.ndarray, threshold: float, min_nprobe: int = 1,
                     max_nprobe: int | None = None) -> np.ndarray:
    """Per query, how many partitions have a value >= ``threshold`` (clipped to the bounds)."""
    cap = values.shape[1] if max_nprobe is None else min(max_nprobe, values.shape[1])
    if not 1 <= min_nprobe <= cap:
        raise ValueError(f"need 1 <= min_nprobe ({min_nprobe}) <= max_nprobe ({cap})")
    return np.clip((values >= threshold).sum(axis=1), min_nprobe, cap)


def recall_table(probabilities: np.ndarray, neighbour_partitions: np.ndarray,
                 grid=LAMBDA_GRID, model: StoppingModel | None = None
                 ) -> list[tuple[float, float, float]]:
    """``(threshold, recall@k, mean partitions probed)`` on held-out queries, for each threshold.

    Thresholds apply to the stopping model's predicted shares (or, without a
    model, to the probabilities): every partition at or above it is probed.
    """
    order, values = expected_shares(probabilities, model)
    ranks = ranks_in(order, neighbour_partitions)
    valid = np.maximum((np.asarray(neighbour_partitions) >= 0).sum(axis=1), 1)
    rows = []
    for lam in grid:
        counts = threshold_counts(values, lam)
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
