"""Prometheus metrics of the routed clients (optional extra ``[metrics]``).

A client holds one recorder and calls its plain methods where it decides or learns something
(a search routed or passed through, a fallback, a routed write, a live recall estimate).
:func:`metrics_recorder` gives the recorder for a client's ``metrics=`` argument:

* ``None`` / ``False``: :data:`NULL_METRICS`, a recorder whose methods do nothing (the default;
  ``prometheus_client`` is never imported);
* ``True``: the metrics in prometheus_client's default ``REGISTRY`` (what
  ``prometheus_client.start_http_server(port)`` serves);
* a ``prometheus_client.CollectorRegistry``: the metrics in that registry (an application's own);
* a recorder: itself (several clients share one).

One :class:`RouterMetrics` exists per registry: every client given the same registry records
into the same series (a second set of the same names would be refused by the registry).
Importing this module never imports prometheus_client; asking for metrics without it raises
an ``ImportError`` that names the extra. No recorder method raises for an unknown label value
(a reason outside the documented set is recorded as ``other``): metrics never fail a search.

Every metric, its labels and its unit: ``docs/metrics.md``.
"""
from __future__ import annotations

import threading
import weakref
import numpy as np

NAMESPACE = "milvus_ltr_router"
INSTALL_HINT = "pip install 'milvus-ltr-router[metrics]'"

# Why a search passed through untouched (RoutedMilvusClient.search's pass-through rules).
PASSTHROUGH_REASONS = ("no_layout", "partition_names", "anns_field", "ids", "no_data",
                       "positional_args", "cluster_filter", "hybrid_partition_storage",
                       "iterator_batch")
# Why a laid-out collection is served by its layout's training-free router (moments, else
# centroids), or by the state it had before.
FALLBACK_REASONS = ("no_router", "unreadable_file", "layout_mismatch", "milvus_error")
# What became of a sampled search handed to the live recall auditor.
AUDIT_OUTCOMES = ("done", "empty", "failed", "dropped")
# What serves a collection: a published router of the ONNX contract's kinds (learned,
# moments, learned-moments), or the layout's training-free fallback (moments, else centroid).
ROUTER_KINDS = ("learned", "moments", "learned-moments", "centroid")
OTHER = "other"

# Histogram buckets: clusters probed per query; routing (the router's ranking, in-process) and
# search (the Milvus calls of one routed search) in seconds.
PROBED_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
ROUTING_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 1.0)
SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _prometheus():
    """prometheus_client, or an ImportError that says which extra installs it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(f"metrics need the prometheus_client package, which the [metrics] extra "
                          f"installs: {INSTALL_HINT}") from exc
    return prometheus_client


def _known(value: str, allowed: tuple) -> str:
    return value if value in allowed else OTHER


def target_label(recall_target: float | None) -> str:
    """The ``target`` label of a live recall series: ``none`` for fixed-nprobe searches, else
    the target as asked (``0.9``, ``0.95``; rounded to 4 decimals)."""
    return "none" if recall_target is None else f"{round(float(recall_target), 4):g}"


class NullMetrics:
    """The recorder interface; every method does nothing (metrics off).

    Collection labels are the laid-out collection's name where the client knows it (its
    layout's ``collection``), else the name the caller searched.
    """

    enabled = False

    def search_routed(self, collection: str, n_queries: int, probed_counts, routing_s: float,
                      search_s: float, router_kind: str) -> None:
        """One routed search returned: ``n_queries`` query vectors served by a ``router_kind``
        router (:data:`ROUTER_KINDS`), ``probed_counts`` clusters probed per query,
        ``routing_s`` seconds ranking clusters, ``search_s`` seconds in Milvus."""

    def search_passed_through(self, collection: str, reason: str) -> None:
        """One search passed to pymilvus untouched, for ``reason`` (:data:`PASSTHROUGH_REASONS`)."""

    def search_failed(self, collection: str) -> None:
        """One routed search raised (bad input, Milvus error): the caller saw the exception."""

    def fallback(self, collection: str, reason: str) -> None:
        """The client fell back, for ``reason`` (:data:`FALLBACK_REASONS`): a router load that
        ended in the layout's training-free router (its moments, else centroids), or a failed
        routing re-check that kept the previous state."""

    def router_info(self, collection: str, version: str | None, kind: str,
                    reason: str = "") -> None:
        """The router serving ``collection`` now: its ``version`` (None: a fallback), its
        ``kind`` (:data:`ROUTER_KINDS`) and, for a fallback, the reason."""

    def routed_write(self, collection: str, rows: int, spilled: int = 0, moved: int = 0,
                     failed: int = 0) -> None:
        """One routed insert/upsert ended: ``rows`` written, of them ``spilled`` sent by the size
        bound to a cluster other than their nearest, ``moved`` keys whose old copy in another
        cluster was deleted; ``failed`` rows not written (the write raised)."""

    def rows_outside_layout(self, collection: str, n: int) -> None:
        """Rows outside the layout's clusters as last counted (-1: could not be counted)."""

    def query_log(self, collection: str, sampled: int = 0, written: int = 0, dropped: int = 0,
                  failed: int = 0) -> None:
        """Query-log vectors: ``sampled`` for the log, ``written`` to it, ``dropped`` on a full
        queue (or refused: NaN/inf), ``failed`` to write."""

    def recall(self, collection: str, estimate) -> None:
        """A live recall estimate (:class:`.live_recall.RecallEstimate`) of ``collection``."""

    def recall_audit(self, collection: str, outcome: str, n: int = 1) -> None:
        """``n`` sampled searches of the live recall auditor ended in ``outcome``
        (:data:`AUDIT_OUTCOMES`)."""


NULL_METRICS = NullMetrics()


class _BulkHistogram:
    """A histogram labelled by collection that takes many observations in one call (the
    clusters probed by each query of a batch: one numpy pass instead of a call per query)."""

    def __init__(self, name: str, documentation: str, buckets: tuple, registry):
        from prometheus_client.utils import floatToGoString
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._data: dict[str, tuple[np.ndarray, list]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, collection: str, values) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if not len(values):
            return
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"),
                             minlength=len(self._bounds) + 1)
        total = float(values.sum())
        with self._lock:
            entry = self._data.get(collection)
            if entry is None:
                entry = self._data[collection] = (np.zeros(len(self._bounds) + 1, np.int64), [0.0])
            entry[0][:] += counts
            entry[1][0] += total

    def _family(self):
        from prometheus_client.metrics_core import HistogramMetricFamily
        return HistogramMetricFamily(self.name, self.documentation, labels=["collection"])

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        with self._lock:
            items = [(c, counts.cumsum(), s[0]) for c, (counts, s) in self._data.items()]
        for collection, cumulative, total in items:
            family.add_metric([collection], list(zip(self._les, cumulative.tolist())), total)
        return [family]


class RouterMetrics(NullMetrics):
    """The recorder backed by prometheus_client, its metrics registered in ``registry``
    (default: prometheus_client's ``REGISTRY``). Use :func:`metrics_recorder` (one recorder
    per registry) rather than the constructor, which registers a new set of metrics."""

    enabled = True

    def __init__(self, registry=None):
        prom = _prometheus()
        self.registry = prom.REGISTRY if registry is None else registry
        Counter, Gauge, Histogram, Info = prom.Counter, prom.Gauge, prom.Histogram, prom.Info
        kw = {"namespace": NAMESPACE, "registry": self.registry}
        col = ["collection"]
        self._searches = Counter("searches", "Searches of a collection, routed or passed through "
                                 "to pymilvus untouched", col + ["routed"], **kw)
        self._passthrough = Counter("passthrough_searches", "Searches passed through untouched, "
                                    "by reason", col + ["reason"], **kw)
        self._search_errors = Counter("search_errors", "Routed searches that raised", col, **kw)
        self._queries = Counter("routed_queries", "Query vectors of routed searches, by the kind "
                                "of router that served them", col + ["router"], **kw)
        self._probed = _BulkHistogram(f"{NAMESPACE}_probed_clusters",
                                      "Clusters probed per query of a routed search",
                                      PROBED_BUCKETS, self.registry)
        self._routing = Histogram("routing_seconds", "Time ranking clusters for one routed search "
                                  "(the router, in-process)", col, buckets=ROUTING_BUCKETS, **kw)
        self._search = Histogram("search_seconds", "Time in Milvus for one routed search (all "
                                 "its requests)", col, buckets=SEARCH_BUCKETS, **kw)
        self._fallbacks = Counter("fallbacks", "Fallbacks: router loads that ended in the "
                                  "layout's training-free router, failed routing re-checks "
                                  "that kept the previous state", col + ["reason"], **kw)
        self._router = Info("router", "The router serving a collection (version empty: a "
                            "fallback)", col, **kw)
        self._write_rows = Counter("write_rows", "Rows stored by routed inserts and upserts",
                                   col, **kw)
        self._write_spilled = Counter("write_spilled_rows", "Rows of routed writes the size bound "
                                      "sent to a cluster other than their nearest", col, **kw)
        self._write_moved = Counter("write_moved_keys", "Upserted keys whose old copy in another "
                                    "cluster was deleted", col, **kw)
        self._write_failed = Counter("write_failed_rows", "Rows of routed writes that were not "
                                     "written (the write raised)", col, **kw)
        self._outside = Gauge("rows_outside_layout", "Rows outside the layout's clusters as last "
                              "counted (-1: could not be counted)", col, **kw)
        self._log_sampled = Counter("query_log_sampled", "Query vectors sampled for the query "
                                    "log", col, **kw)
        self._log_written = Counter("query_log_written", "Query vectors written to the query log",
                                    col, **kw)
        self._log_dropped = Counter("query_log_dropped", "Query vectors dropped before the query "
                                    "log (full queue, NaN or inf)", col, **kw)
        self._log_failed = Counter("query_log_failed", "Query vectors whose query-log write "
                                   "failed", col, **kw)
        rec = col + ["target", "k"]
        self._recall = Gauge("live_recall", "Live recall@k of sampled searches (window mean)",
                             rec, **kw)
        self._recall_lower = Gauge("live_recall_lower", "Lower bound of the live recall's "
                                   "confidence interval", rec, **kw)
        self._recall_upper = Gauge("live_recall_upper", "Upper bound of the live recall's "
                                   "confidence interval", rec, **kw)
        self._recall_samples = Gauge("live_recall_samples", "Sampled searches in the live "
                                     "recall's window", rec, **kw)
        self._audits = Counter("recall_audits", "Sampled searches handed to the live recall "
                               "auditor, by outcome", col + ["outcome"], **kw)

    def search_routed(self, collection, n_queries, probed_counts, routing_s, search_s,
                      router_kind):
        self._searches.labels(collection, "true").inc()
        self._queries.labels(collection, _known(router_kind, ROUTER_KINDS)).inc(n_queries)
        self._probed.observe_many(collection, probed_counts)
        self._routing.labels(collection).observe(routing_s)
        self._search.labels(collection).observe(search_s)

    def search_passed_through(self, collection, reason):
        self._searches.labels(collection, "false").inc()
        self._passthrough.labels(collection, _known(reason, PASSTHROUGH_REASONS)).inc()

    def search_failed(self, collection):
        self._search_errors.labels(collection).inc()

    def fallback(self, collection, reason):
        self._fallbacks.labels(collection, _known(reason, FALLBACK_REASONS)).inc()

    def router_info(self, collection, version, kind, reason=""):
        reason = _known(reason, FALLBACK_REASONS) if reason else ""
        self._router.labels(collection).info({"version": version or "",
                                              "kind": _known(kind, ROUTER_KINDS),
                                              "fallback_reason": reason})

    def routed_write(self, collection, rows, spilled=0, moved=0, failed=0):
        for counter, n in ((self._write_rows, rows), (self._write_spilled, spilled),
                           (self._write_moved, moved), (self._write_failed, failed)):
            if n:
                counter.labels(collection).inc(n)

    def rows_outside_layout(self, collection, n):
        self._outside.labels(collection).set(n)

    def query_log(self, collection, sampled=0, written=0, dropped=0, failed=0):
        for counter, n in ((self._log_sampled, sampled), (self._log_written, written),
                           (self._log_dropped, dropped), (self._log_failed, failed)):
            if n:
                counter.labels(collection).inc(n)

    def recall(self, collection, estimate):
        labels = (collection, target_label(estimate.recall_target), str(estimate.k))
        self._recall.labels(*labels).set(estimate.recall)
        self._recall_lower.labels(*labels).set(estimate.lower)
        self._recall_upper.labels(*labels).set(estimate.upper)
        self._recall_samples.labels(*labels).set(estimate.n)

    def recall_audit(self, collection, outcome, n=1):
        if n:
            self._audits.labels(collection, _known(outcome, AUDIT_OUTCOMES)).inc(n)


_recorders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_recorders_lock = threading.Lock()


def metrics_recorder(metrics=None) -> NullMetrics:
    """The recorder for a client's ``metrics=`` argument (see the module docstring).

    Raises ``ImportError`` (naming the ``[metrics]`` extra) when metrics are asked for and
    prometheus_client is not installed, ``TypeError`` for an argument that is none of these.
    """
    if metrics is None or metrics is False:
        return NULL_METRICS
    if isinstance(metrics, NullMetrics):
        return metrics
    if metrics is True:
        registry = _prometheus().REGISTRY
    elif callable(getattr(metrics, "register", None)) and callable(getattr(metrics, "collect", None)):
        registry = metrics
    else:
        raise TypeError(f"metrics must be True, False, a prometheus_client CollectorRegistry or "
                        f"a metrics recorder, got {type(metrics).__name__}")
    with _recorders_lock:
        recorder = _recorders.get(registry)
        if recorder is None:
            recorder = _recorders[registry] = RouterMetrics(registry)
        return recorder


__all__ = ["NULL_METRICS", "NullMetrics", "RouterMetrics", "metrics_recorder", "target_label",
           "PASSTHROUGH_REASONS", "FALLBACK_REASONS", "AUDIT_OUTCOMES", "PROBED_BUCKETS",
           "ROUTING_BUCKETS", "SEARCH_BUCKETS"]
