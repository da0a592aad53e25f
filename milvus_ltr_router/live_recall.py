"""The live recall estimate: the recall that real, routed searches receive.

A client with ``recall_sample=r`` hands a share ``r`` of its routed queries (chosen by a
:class:`RecallSampler`) to a :class:`RecallAuditor`: a background thread that re-runs each one
*exactly* through an injected callable (the client's unrestricted search of the laid-out
collection, with the caller's filter) and compares the ids the caller was served with the
exact top-k. A :class:`RecallEstimator` keeps a running recall@k per collection and per
``recall_target`` asked for, with a confidence interval; the auditor logs a warning when an
estimate falls below its target by more than its interval. Nothing here runs on a search's
path: the queue is bounded (a full queue drops the job, counted), and an exact search that
raises is counted, never raised.

The interval
------------
The unit of sampling is the query, not the neighbour: the ``k`` hits of one query are
correlated (a query routed to the wrong region misses most of them at once), so a binomial
interval on the pooled hits (``n * k`` trials) is far too narrow (on synthetic data with a
Beta spread of per-query recall it covers the true mean 66-90% of the time at a nominal 95%).
A normal interval on the per-query recalls, ``mean +- z s / sqrt(n)``, is right in the interior
but collapses at the boundary, where live recall sits (recall 0.99 from 10 queries that all
scored 1.0 gives the interval [1, 1]; 61% coverage in that regime). So the estimator uses a
**Wilson score interval on the mean per-query recall with an effective sample size**
``n_eff = p (1 - p) / (s^2 / n)`` (the design-effect correction of survey statistics), clamped
to ``[n, n k]``: a per-query recall in [0, 1] with mean p has variance at most p (1 - p), so
``n_eff >= n`` in expectation and ``n`` (each query one Bernoulli trial) is the conservative
end, ``n k`` (independent hits) the optimistic one. For large n it has the normal interval's
width; at the boundary and for small n it keeps Wilson's behaviour (never zero width, never
outside [0, 1]). Synthetic coverage at 95%: 0.93-0.96 from n = 10 to 2,000 and mean recall
0.5 to 0.99 (``tests/test_live_recall.py`` checks it).

The estimate is over a sliding window of the last ``window`` sampled queries (default
2,000), so a drift shows within one window instead of being averaged into everything
seen since the client started; ``total`` counts every sample.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np

from .metrics import NULL_METRICS, NullMetrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- pure parts
def query_recall(served: Sequence, exact: Sequence, k: int) -> float | None:
    """Recall@k of one query: the share of the exact top-k ids among the first ``k`` served
    ids. When the exact search finds fewer than ``k`` rows (a selective filter) the share is of
    those; None when it finds none (nothing to measure). Ties in distance at the k-th place can
    make an id count as missed although an equally near one was served."""
    truth = list(exact)[:k]
    if not truth:
        return None
    return len(set(list(served)[:k]).intersection(truth)) / len(truth)


def wilson_interval(p: float, n_eff: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` from ``n_eff`` trials."""
    if n_eff <= 0:
        return 0.0, 1.0
    z2 = z * z
    denom = 1.0 + z2 / n_eff
    centre = (p + z2 / (2 * n_eff)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n_eff + z2 / (4 * n_eff * n_eff)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def recall_interval(values, k: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lower, upper)`` of per-query recalls ``values`` (each in [0, 1], recall@``k``):
    the Wilson interval with the effective sample size of the module docstring."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return math.nan, 0.0, 1.0
    p = float(x.mean())
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    var_mean = float(x.var(ddof=1)) / n if n > 1 else 0.0
    most = n * max(int(k), 1)
    n_eff = most if var_mean <= 0 else p * (1 - p) / var_mean
    n_eff = min(max(n_eff, n), most)
    lower, upper = wilson_interval(p, n_eff, z)
    return p, lower, upper


@dataclass(frozen=True)
class RecallEstimate:
    """The live recall@``k`` of ``collection`` for searches asking ``recall_target`` (None:
    fixed nprobe): ``recall`` is the mean over the ``n`` sampled queries in the window, in
    ``[lower, upper]`` at ``confidence``; ``total`` samples ever. ``below_target``: at least
    ``min_samples`` queries and the whole interval below the target."""

    collection: str
    recall_target: float | None
    k: int
    n: int
    total: int
    recall: float
    lower: float
    upper: float
    confidence: float
    below_target: bool

    def as_dict(self) -> dict:
        return {"collection": self.collection, "recall_target": self.recall_target, "k": self.k,
                "n": self.n, "total": self.total, "recall": self.recall, "lower": self.lower,
                "upper": self.upper, "confidence": self.confidence,
                "below_target": self.below_target}


class RecallEstimator:
    """Running recall@k per ``(collection, recall_target, k)`` over a sliding window of the last
    ``window`` sampled queries, with a ``confidence`` interval (see the module docstring).
    Thread-safe."""

    def __init__(self, window: int = 2000, confidence: float = 0.95, min_samples: int = 30):
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.window, self.confidence, self.min_samples = int(window), float(confidence), \
            int(min_samples)
        self._series: dict[tuple, tuple[deque, list]] = {}   # key -> (window, [total])
        self._lock = threading.Lock()

    @staticmethod
    def _key(collection: str, recall_target: float | None, k: int) -> tuple:
        target = None if recall_target is None else round(float(recall_target), 4)
        return collection, target, int(k)

    def add(self, collection: str, recall: float, *, recall_target: float | None = None,
            k: int = 10) -> RecallEstimate:
        """Add one query's recall@k; returns the updated estimate of its series."""
        key = self._key(collection, recall_target, k)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (deque(maxlen=self.window), [0])
            series[0].append(float(recall))
            series[1][0] += 1
            values, total = np.fromiter(series[0], dtype=np.float64), series[1][0]
        return self._estimate(key, values, total)

    def _estimate(self, key: tuple, values: np.ndarray, total: int) -> RecallEstimate:
        collection, target, k = key
        mean, lower, upper = recall_interval(values, k, self.confidence)
        below = target is not None and len(values) >= self.min_samples and upper < target
        return RecallEstimate(collection, target, k, len(values), total, mean, lower, upper,
                              self.confidence, below)

    def estimate(self, collection: str, recall_target: float | None = None,
                 k: int = 10) -> RecallEstimate | None:
        """The current estimate of one series (None: no sample yet)."""
        key = self._key(collection, recall_target, k)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                return None
            values, total = np.fromiter(series[0], dtype=np.float64), series[1][0]
        return self._estimate(key, values, total)

    def estimates(self, collection: str | None = None) -> list[RecallEstimate]:
        """Every series' estimate (of ``collection`` only, if given), fixed nprobe first."""
        with self._lock:
            items = [(key, np.fromiter(s[0], dtype=np.float64), s[1][0])
                     for key, s in self._series.items() if collection in (None, key[0])]
        items.sort(key=lambda it: (it[0][0], it[0][1] is not None, it[0][1] or 0.0, it[0][2]))
        return [self._estimate(key, values, total) for key, values, total in items]

    def reset(self, collection: str | None = None) -> None:
        """Forget the samples (of ``collection`` only, if given): e.g. after a new router or
        layout, whose recall the old samples do not describe."""
        with self._lock:
            for key in [key for key in self._series if collection in (None, key[0])]:
                del self._series[key]


class RecallSampler:
    """Which queries of a search to audit: each independently with probability ``rate``, from
    a seeded generator (reproducible for one thread; thread-safe)."""

    def __init__(self, rate: float, seed: int | None = None):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"recall sample rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def pick(self, n_queries: int) -> np.ndarray:
        """Indices of the queries (of ``n_queries``) to audit; usually none."""
        if self.rate <= 0.0 or n_queries <= 0:
            return np.empty(0, dtype=np.int64)
        with self._lock:
            draws = self._rng.random(n_queries)
        return np.flatnonzero(draws < self.rate)


# ---------------------------------------------------------------------------- the worker
@dataclass(eq=False)
class RecallJob:
    """One sampled query to re-run exactly: what the caller asked and the ids it was served.

    ``limit``, ``filter`` and ``partition_names`` are the caller's; ``k`` is the recall@k to
    measure (default ``limit``); ``extra`` holds whatever else the exact search needs from the
    request (``anns_field``, ``search_params``, a consistency level...)."""

    collection: str
    vector: np.ndarray
    served_ids: Sequence
    limit: int
    filter: str = ""
    partition_names: Sequence[str] | None = None
    recall_target: float | None = None
    k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recall_k(self) -> int:
        return int(min(self.k or self.limit, self.limit))


_STOP = object()


class RecallAuditor:
    """Background worker re-running sampled searches exactly and feeding the estimates.

    ``exact(job) -> ids`` runs the exact search of ``job`` and returns its top ids, best first
    (at least ``job.recall_k`` of them where the collection has them). It runs on this
    worker's thread only; whatever it raises is counted (``failed``) and logged at most once
    per ``warn_interval`` seconds, never raised. :meth:`submit` never blocks: a full queue
    (``max_queue`` jobs) drops the job and counts it. Estimates go to ``metrics`` after each
    audit; a warning is logged when an estimate is below its target by more than its interval
    (again at most once per ``warn_interval`` seconds per series, and once when it recovers).
    """

    def __init__(self, exact: Callable[[RecallJob], Sequence], *,
                 estimator: RecallEstimator | None = None, metrics: NullMetrics = NULL_METRICS,
                 max_queue: int = 256, warn_interval: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, name: str = "ltr-recall-audit"):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._exact = exact
        self.estimator = estimator if estimator is not None else RecallEstimator()
        self.metrics = metrics
        self.max_queue = int(max_queue)
        self.warn_interval = float(warn_interval)
        self._clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=self.max_queue)
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}    # collection -> outcome -> count
        self._last_error = ""
        self._last_failure_log = -math.inf
        self._warned: dict[tuple, float] = {}           # series below target -> last warning
        self._warnings = 0
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- request side
    def submit(self, job: RecallJob) -> bool:
        """Queue ``job`` for an exact re-run; False (counted as dropped) when the queue is full
        or the auditor is closed. Never blocks, never raises for a full queue."""
        self._count(job.collection, "submitted")
        if not self._closed:
            try:
                self._queue.put_nowait(job)
                return True
            except queue.Full:
                pass
        self._count(job.collection, "dropped")
        self._record(self.metrics.recall_audit, job.collection, "dropped")
        return False

    # -- worker side
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if not self._stop.is_set():
                    self._audit(job)
            except Exception:       # a bug here must not end the worker
                log.exception("live recall audit failed unexpectedly")
            finally:
                self._queue.task_done()

    def _audit(self, job: RecallJob) -> None:
        try:
            exact_ids = self._exact(job)
            recall = query_recall(job.served_ids, exact_ids, job.recall_k)
        except Exception as exc:    # Milvus down, a dropped connection...: count, never raise
            self._count(job.collection, "failed")
            self._record(self.metrics.recall_audit, job.collection, "failed")
            now = self._clock()
            with self._lock:
                self._last_error = f"{type(exc).__name__}: {exc}"
                quiet = now - self._last_failure_log < self.warn_interval
                if not quiet:
                    self._last_failure_log = now
            if not quiet:
                log.warning("live recall: the exact re-run of a sampled search of %r failed "
                            "(%s: %s); searches are unaffected, the estimate resumes when it "
                            "succeeds", job.collection, type(exc).__name__, exc)
            return
        if recall is None:
            self._count(job.collection, "empty")
            self._record(self.metrics.recall_audit, job.collection, "empty")
            return
        estimate = self.estimator.add(job.collection, recall, recall_target=job.recall_target,
                                      k=job.recall_k)
        self._count(job.collection, "done")
        self._record(self.metrics.recall_audit, job.collection, "done")
        self._record(self.metrics.recall, job.collection, estimate)
        self._check(estimate)

    def _check(self, est: RecallEstimate) -> None:
        key = (est.collection, est.recall_target, est.k)
        now = self._clock()
        with self._lock:
            last = self._warned.get(key)
            if est.below_target:
                warn = last is None or now - last >= self.warn_interval
                if warn:
                    self._warned[key] = now
                    self._warnings += 1
            else:
                warn = False
                if last is not None:
                    del self._warned[key]
        if warn:
            log.warning("live recall@%d of %r at recall_target=%g is %.3f (%.0f%% interval "
                        "%.3f-%.3f, last %d sampled searches): below the target by more than its "
                        "interval. Queries or data may have drifted from what the router was "
                        "calibrated on: retrain the router (and repair or rebuild the layout if "
                        "rows were written around it)", est.k, est.collection, est.recall_target,
                        est.recall, 100 * est.confidence, est.lower, est.upper, est.n)
        elif last is not None and not est.below_target:
            log.info("live recall@%d of %r at recall_target=%g is back within its interval: "
                     "%.3f (%.3f-%.3f)", est.k, est.collection, est.recall_target, est.recall,
                     est.lower, est.upper)

    def _count(self, collection: str, outcome: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(collection, {})
            counts[outcome] = counts.get(outcome, 0) + 1

    @staticmethod
    def _record(method, *args) -> None:
        try:
            method(*args)
        except Exception as exc:    # a metrics problem must not stop the audits
            log.debug("recording a live recall metric failed: %s", exc)

    # -- views and life cycle
    def status(self, collection: str | None = None) -> dict:
        """Counts of sampled searches (``submitted``, ``done``, ``empty``: the exact search
        found no row, ``failed``, ``dropped``), the queue, the last error, warnings logged and
        the estimates, for every collection or for ``collection`` only."""
        with self._lock:
            names = [collection] if collection is not None else list(self._counts)
            totals = {o: 0 for o in ("submitted", "done", "empty", "failed", "dropped")}
            for name in names:
                for outcome, n in self._counts.get(name, {}).items():
                    totals[outcome] = totals.get(outcome, 0) + n
            last_error, warnings = self._last_error, self._warnings
        return {**totals, "queue": self._queue.qsize(), "max_queue": self.max_queue,
                "last_error": last_error, "warnings": warnings,
                "window": self.estimator.window, "confidence": self.estimator.confidence,
                "estimates": [e.as_dict() for e in self.estimator.estimates(collection)]}

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every job queued so far is audited (or ``timeout``); True if drained."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 10.0, drain: bool = False) -> None:
        """Stop the worker and join it. Queued jobs are discarded unless ``drain`` (then they
        are audited first, within ``timeout``); later submits are dropped."""
        if self._closed:
            return
        self._closed = True
        if drain:
            self.flush(timeout)
        self._stop.set()
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
