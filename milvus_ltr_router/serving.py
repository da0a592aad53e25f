"""What serves each laid-out collection now: its layout and router, kept current.

A routed client (:mod:`.client`, or another shell over the same core) asks a
:class:`RoutingTable` for a collection's :class:`Routing` before each call. The table
re-checks it every ``reload_interval`` seconds: aliases are resolved again, a rebuilt
layout is noticed by its id, and a newly published router by its pointer's stamp. A
collection without a usable published router (none published yet, a file that cannot be
read, one made for another layout) is routed by its layout's training-free router
(:func:`fallback_router`: the cluster moments when the layout has them, else the
centroids); a router that cannot be read never fails a search, and the model dir is
read again after a backoff (:func:`.registry.retry_delay`).

With a metrics recorder (:mod:`.metrics`) the table records what serves each collection,
every fallback with its reason and the rows outside each layout; :class:`LiveRecall` samples
routed searches for the live recall estimate (:mod:`.live_recall`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pymilvus import MilvusClient
from pymilvus.exceptions import ParamError

from .errors import InputError
from .layout import Layout, current_layout_id, has_stray_partition, laid_out_name, read_layout
from .live_recall import RecallAuditor, RecallJob, RecallSampler
from .metrics import NULL_METRICS, NullMetrics
from .milvus_io import vector_indexes
from .plan import QueryInputError, index_search_defaults, query_matrix
from .registry import ModelRegistry, retry_delay
from .repair import stray_rows
from .router import BaseRouter, CentroidRouter, MomentRouter, Router, RouterError
from .storage import DEFAULT_PARTITION, storage_status
from .switch import read_stamp, register_table

log = logging.getLogger(__name__)


@dataclass
class Routing:
    """What serves one collection right now (swapped whole, never mutated in place)."""

    layout: Layout
    router: BaseRouter
    version: str | None = None
    error: str = ""
    stamp: tuple | None = None
    failures: int = 0        # consecutive failed loads of the model dir/router (0: no error)
    retry_at: float = 0.0    # time.monotonic() after which an error state is re-read


def _moments_misfit(layout: Layout) -> str:
    """Why ``layout``'s moments cannot route it ("": they can, or it has none)."""
    moments = getattr(layout, "moments", None)
    if moments is None or (moments.n_clusters, moments.dim) == (layout.n_clusters, layout.dim):
        return ""
    return (f"they hold {moments.n_clusters} clusters of dim {moments.dim}, the layout "
            f"{layout.n_clusters} of dim {layout.dim}")


def fallback_kind(layout: Layout) -> str:
    """The kind of router that serves ``layout`` while no usable router is published:
    ``"moments"`` when the layout has cluster moments (of its clusters and dimension),
    else ``"centroid"``."""
    if getattr(layout, "moments", None) is None or _moments_misfit(layout):
        return "centroid"
    return "moments"


def fallback_router(layout: Layout) -> BaseRouter:
    """The training-free router of ``layout`` (:func:`fallback_kind`): its cluster moments
    (:class:`.MomentRouter`, the cold-start router) when it has them, else its centroids
    (:class:`.CentroidRouter`). Moments that cannot be served (not of this layout's
    clusters, ...) are logged and the centroids serve instead: a fallback never fails a
    search."""
    if getattr(layout, "moments", None) is not None:
        try:
            misfit = _moments_misfit(layout)
            if misfit:
                raise ValueError(misfit)
            return MomentRouter(layout)
        except Exception as exc:
            log.warning("the cluster moments of %r cannot route it (%s: %s); routing by "
                        "centroids", layout.collection, type(exc).__name__, exc)
    return CentroidRouter(layout)


class _LayoutMismatch(RouterError):
    """A published router that loads but was made for another layout."""


def fallback_reason(error: str | BaseException | None) -> str:
    """The metrics' reason (:data:`.metrics.FALLBACK_REASONS`) of a fallback: ``no_router``
    (none published), ``layout_mismatch`` (a router made for another layout) or
    ``unreadable_file`` (the pointer or the router file cannot be read or loaded)."""
    if error is None:
        return "no_router"
    return "layout_mismatch" if isinstance(error, _LayoutMismatch) else "unreadable_file"


def _record(method, *args) -> None:
    """Call a metrics recorder's ``method``; a metrics problem never fails routing."""
    try:
        method(*args)
    except Exception as exc:
        log.debug("recording a routing metric failed: %s", exc)


def _training_free(router: BaseRouter) -> bool:
    return isinstance(router, (MomentRouter, CentroidRouter))


class RoutedParamError(InputError, ParamError):
    """Bad search input on a laid-out collection: both what pymilvus raises for the same
    mistake (``ParamError``, a ``MilvusException``) and the plugin's ``InputError``."""

    def __init__(self, message: str):
        ParamError.__init__(self, message=message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


def search_queries(state: Routing, data, one_vector_ok: bool = False):
    """``data`` as a float32 query matrix for ``state``'s layout (:func:`.plan.query_matrix`),
    or :class:`RoutedParamError`, what pymilvus raises for the same mistake."""
    try:
        return query_matrix(data, state.layout.dim, state.layout.collection, one_vector_ok)
    except QueryInputError as exc:
        raise RoutedParamError(str(exc)) from exc


class RoutingTable:
    """The :class:`Routing` of each collection a client routes, read through ``client``
    (layouts, rows outside them) and ``registry`` (published routers).

    ``metrics`` (:func:`.metrics.metrics_recorder`; default: none) records each router load
    (``router_info``: what serves the collection now), each fallback with its reason (a load
    that ended in the layout's training-free router, or a failed re-check that kept the
    previous state: ``milvus_error``) and the rows outside the layout as last counted."""

    def __init__(self, client: MilvusClient, registry: ModelRegistry, reload_interval: float = 10.0,
                 router_threads: int = 1, *, metrics: NullMetrics = NULL_METRICS):
        self.client = client
        self.registry = registry
        self.reload_interval = reload_interval
        self.router_threads = router_threads
        self.metrics = metrics
        self._routing: dict[str, tuple[Routing | None, float]] = {}   # name -> (state, checked)
        self._lock = threading.Lock()
        self._strays: dict[str, tuple[int, float]] = {}   # collection -> (_default rows, checked)
        # the layout behind each name is checked this often (one describe_collection: see
        # :mod:`.switch`), more often than routers are reloaded; a routed write that meets a
        # new layout tells the table at once (:func:`.switch.layout_changed`)
        self.layout_check_interval = min(1.0, reload_interval)
        self._stamped: dict[str, float] = {}               # collection -> last layout check
        self._index_defaults: dict[tuple[str, str], dict] = {}   # (collection, layout id) -> params
        register_table(client, self)

    def state(self, collection: str) -> Routing | None:
        """Current routing of ``collection`` (None: no layout), re-checked every interval.

        A check re-resolves aliases, re-reads the layout id (a rebuilt layout is
        noticed) and stats the router pointer; swaps replace the whole record, so
        in-flight searches keep the router they started with.
        """
        cached = self._routing.get(collection)
        moved = False                   # the layout behind the name is not the cached one
        if cached is not None and time.monotonic() - cached[1] < self.reload_interval:
            if cached[0] is None or self._layout_current(collection, cached[0]):
                return cached[0]
            moved = True
        with self._lock:
            now = self._routing.get(collection)
            moved = moved and now is cached     # else another thread has re-read it
            cached = now
            if moved or cached is None or time.monotonic() - cached[1] >= self.reload_interval:
                try:
                    state = self._refresh(collection, cached[0] if cached else None)
                except Exception as exc:
                    if cached is None:
                        raise           # nothing known yet: the caller sees Milvus's error
                    # Milvus unreachable or a layout being rewritten: keep routing as before
                    # (the search itself reports an outage) and check again next interval.
                    log.warning("re-checking the routing of %r failed (%s: %s); keeping the "
                                "current layout and router", collection, type(exc).__name__, exc)
                    state = cached[0]
                    _record(self.metrics.fallback, collection if state is None
                            else state.layout.collection, "milvus_error")
                cached = (state, time.monotonic())
                self._routing[collection] = cached
            return cached[0]

    def layout_check_due(self, collection: str) -> bool:
        """Whether :meth:`state` would check the layout behind ``collection`` now (for a
        shell that answers from memory between checks, as the async client does)."""
        return time.monotonic() - self._stamped.get(collection, 0.0) >= self.layout_check_interval

    def _layout_current(self, collection: str, state: Routing) -> bool:
        """Whether ``state``'s layout is still the one behind ``collection``: checked at most
        every ``layout_check_interval`` seconds by the collection's stamp (one metadata call;
        an unreadable or unstamped collection counts as unchanged until the full re-check)."""
        now = time.monotonic()
        if now - self._stamped.get(collection, 0.0) < self.layout_check_interval:
            return True
        self._stamped[collection] = now
        try:
            stamp = read_stamp(self.client, collection)
        except Exception:
            return True
        if stamp.name != state.layout.collection:
            return False
        return stamp.layout_id is None or stamp.layout_id == state.layout.layout_id

    def forget(self, collection: str) -> None:
        """Read ``collection``'s routing again at its next use (and every count of rows
        outside a layout)."""
        with self._lock:
            self._routing.pop(collection, None)
            self._strays.clear()
            self._index_defaults.clear()

    def _refresh(self, collection: str, old: Routing | None) -> Routing | None:
        name = laid_out_name(self.client, collection)      # one alias resolution per check
        if name is None:
            return None
        if old is not None and old.layout.collection == name and \
                self._stored_layout_id(name) == old.layout.layout_id:
            layout = old.layout
        else:
            layout = read_layout(self.client, collection)
        self._read_index_defaults(layout)
        try:
            stamp = self.registry.pointer_stamp(layout.collection)
        except Exception as exc:        # model dir is a file, unreadable...: load_router reports it
            stamp = ("unreadable", str(exc))
        if old is not None and old.layout is layout and stamp == old.stamp and \
                (not old.failures or time.monotonic() < old.retry_at):
            return old                  # unchanged; an error state is re-read after its backoff
        return self.load_router(layout, stamp, old)

    def _read_index_defaults(self, layout: Layout) -> None:
        """Read (once per layout) what routed requests need on its vector index
        (:func:`.plan.index_search_defaults`); an unreadable index counts as needing nothing."""
        key = (layout.collection, layout.layout_id)
        if key in self._index_defaults:
            return
        try:
            found = [index_search_defaults(d) for d in
                     vector_indexes(self.client, layout.collection, layout.vector_field)]
        except Exception as exc:        # pragma: no cover - server error: read again next check
            log.warning("cannot read the vector index of %r (routed requests keep the caller's "
                        "search params until it is read): %s", layout.collection, exc)
            return
        self._index_defaults[key] = next((d for d in found if d), {})

    def index_defaults(self, layout: Layout) -> dict:
        """Search params every routed request of ``layout`` needs on its vector index (read
        when the layout is; never I/O here): ``{"nprobe": nlist}`` on an IVF-family index."""
        return self._index_defaults.get((layout.collection, layout.layout_id), {})

    def _stored_layout_id(self, name: str) -> str | None:
        """The id of the layout stored in ``name``: its stamp, else its metadata row."""
        try:
            stamp = read_stamp(self.client, name)
            if stamp.layout_id is not None:
                return stamp.layout_id
        except Exception:
            pass
        return current_layout_id(self.client, name)

    def load_router(self, layout: Layout, stamp, old: Routing | None = None) -> Routing:
        """The published router for ``layout``, or the layout's training-free router
        (:func:`fallback_router`: moments, else centroids) with the reason why not.

        Never raises for a model-dir, pointer or router-file problem: it is logged and
        served by the fallback, and read again after a backoff that doubles per consecutive
        failure (``registry.retry_delay``) even if the pointer did not change, so a fixed
        file (or a transient read error) recovers without a new publish.
        """
        current = None
        same_layout = old is not None and old.layout is layout
        try:
            current = self.registry.current(layout.collection)
            if current is None:
                fallback = old.router if same_layout and _training_free(old.router) \
                    else fallback_router(layout)
                self._record_fallback(layout, fallback, None)
                return Routing(layout, fallback, None, "no router published", stamp)
            router = Router.load(current.path, num_threads=self.router_threads)
            try:
                router.check_layout(layout)
            except RouterError as exc:
                raise _LayoutMismatch(str(exc)) from exc
        except Exception as exc:        # whatever is wrong on disk must not fail searches
            what = f"router {current.version}" if current is not None else "router pointer"
            error = f"{what} of {layout.collection!r} is unusable: {exc}"
            cause = exc
        else:
            log.info("serving router %s for %r", current.version, layout.collection)
            _record(self.metrics.router_info, layout.collection, current.version, router.kind)
            return Routing(layout, router, current.version, "", stamp)
        failures = old.failures + 1 if same_layout else 1
        delay = retry_delay(failures, self.reload_interval)
        fallback = old.router if same_layout and _training_free(old.router) \
            else fallback_router(layout)
        how = "its cluster moments" if fallback.kind == "moments" else "centroids"
        log.warning("%s; routing %r by %s (failure %d, next check in %.0f s)",
                    error, layout.collection, how, failures, delay)
        self._record_fallback(layout, fallback, cause)
        return Routing(layout, fallback, None, error, stamp, failures, time.monotonic() + delay)

    def _record_fallback(self, layout: Layout, fallback: BaseRouter, cause) -> None:
        reason = fallback_reason(cause)
        _record(self.metrics.fallback, layout.collection, reason)
        _record(self.metrics.router_info, layout.collection, None, fallback.kind, reason)

    def stray_partition(self, state: Routing) -> str | None:
        """``_default`` while it holds rows outside the layout's partitions (written around the
        layout, e.g. by a plain MilvusClient): routed searches include it so no row is invisible
        until ``milvus-ltr-router repair-layout`` moves them. Re-checked every reload interval."""
        return DEFAULT_PARTITION if self.stray_count(state) != 0 else None

    def stray_count(self, state: Routing) -> int:
        """Rows outside the layout's partitions (0: none or none possible; -1: unknown)."""
        if not has_stray_partition(state.layout):
            return 0
        name = state.layout.collection
        cached = self._strays.get(name)
        if cached is None or time.monotonic() - cached[1] >= self.reload_interval:
            try:
                count = stray_rows(self.client, state.layout)
            except Exception:           # unknown: search it rather than risk hiding rows
                count = -1
            cached = (count, time.monotonic())
            self._strays[name] = cached
            _record(self.metrics.rows_outside_layout, name, count)
        return cached[0]


def routing_status(state: Routing, *, nprobe: int, balance: dict | None, rows_outside_layout: int,
                   query_log: dict, live_recall: dict | None = None) -> dict:
    """``router_status()`` of a routed collection (see :meth:`.RoutedMilvusClient.router_status`);
    ``live_recall``: :meth:`LiveRecall.status` of the collection (None: not sampled)."""
    router = state.router
    table = router.recall_thresholds
    adaptive = None if not table else {      # what recall_target can ask for
        "stopping_model": router.stopping_model is not None,
        "adaptive_head": router.has_adaptive_head,
        "max_recall": max(recall for _, recall, _ in table),
        "temperature": router.temperature}
    return {"collection": state.layout.collection, "mode": router.kind,
            "version": state.version, "layout_id": state.layout.layout_id,
            "n_partitions": state.layout.n_partitions, "nprobe": nprobe,
            "storage": storage_status(state.layout.storage),
            "adaptive": adaptive, "balance": balance, "error": state.error,
            "failures": state.failures,
            "next_check_s": max(0.0, state.retry_at - time.monotonic()) if state.failures
            else None,
            "rows_outside_layout": rows_outside_layout, "query_log": query_log,
            "live_recall": live_recall}


# ------------------------------------------------------------------------- live recall
class LiveRecall:
    """A client's live recall estimate (``recall_sample=``; :mod:`.live_recall`).

    :meth:`offer` picks a share ``rate`` of a routed search's queries (:class:`.RecallSampler`,
    seeded) and hands each, with the ids it was served, to a :class:`.RecallAuditor`: a
    background worker that re-runs it through ``exact(collection, vector, limit, filter,
    **extra) -> hits`` (the client's unrestricted search of the laid-out collection) and
    keeps a recall@k estimate per collection and ``recall_target``. Nothing here waits on
    Milvus or raises on a search's path. When the router or layout serving a collection
    changes, its estimates start again (old samples describe another router).
    ``rate`` 0: off (no worker thread).
    """

    def __init__(self, rate: float, exact: Callable[..., Sequence], *,
                 metrics: NullMetrics = NULL_METRICS, seed: int | None = None,
                 max_queue: int = 256, **auditor_kwargs):
        self.sampler = RecallSampler(rate, seed)      # checks rate in [0, 1]
        self.rate = self.sampler.rate
        self._search = exact
        self._primary: dict[str, str] = {}            # collection -> primary field
        self._served_by: dict[str, tuple] = {}        # collection -> (layout id, router, version)
        self._lock = threading.Lock()
        self.auditor = RecallAuditor(self._exact_ids, metrics=metrics, max_queue=max_queue,
                                     **auditor_kwargs) if self.rate > 0 else None

    @property
    def enabled(self) -> bool:
        return self.auditor is not None

    def _exact_ids(self, job: RecallJob) -> list:
        hits = self._search(job.collection, job.vector, job.limit, job.filter, **job.extra)
        pk = self._primary.get(job.collection, "id")
        return [_hit_id(h, pk) for h in hits]

    def _served_changed(self, state: Routing) -> None:
        collection = state.layout.collection
        now = (state.layout.layout_id, state.version, state.router.kind)
        with self._lock:
            before = self._served_by.get(collection)
            self._served_by[collection] = now
            self._primary[collection] = state.layout.primary_field
        if before is not None and before != now:
            self.auditor.estimator.reset(collection)

    def offer(self, state: Routing, queries, results, *, limit: int, filter: str = "",
              recall_target: float | None = None, **extra) -> int:
        """Sample queries of a routed search of ``state``'s collection (``queries`` ``[Q, d]``,
        ``results`` its answer, query by query) for an exact re-run; returns how many were
        handed over (0 when off). ``extra``: what else the exact search needs (``anns_field``,
        ``search_params``, a consistency level...)."""
        if self.auditor is None:
            return 0
        try:
            picks = self.sampler.pick(len(queries))
            if not len(picks):
                return 0
            self._served_changed(state)
            pk = state.layout.primary_field
            n = 0
            for i in picks:
                served = [_hit_id(h, pk) for h in results[int(i)]]
                job = RecallJob(state.layout.collection, np.asarray(queries[int(i)], np.float32),
                                served, int(limit), filter or "", recall_target=recall_target,
                                extra=dict(extra))
                n += self.auditor.submit(job)
            return n
        except Exception as exc:        # never fail a search that already succeeded
            log.debug("sampling a search for the live recall failed: %s", exc)
            return 0

    def status(self, collection: str) -> dict | None:
        """``router_status()["live_recall"]``: the auditor's counts and estimates of
        ``collection`` (:meth:`.RecallAuditor.status`; None when off)."""
        if self.auditor is None:
            return None
        return {"sample_rate": self.rate, **self.auditor.status(collection)}

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every sampled query handed over so far is audited."""
        return True if self.auditor is None else self.auditor.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self.auditor is not None:
            self.auditor.close(timeout)


def _hit_id(hit, primary_field: str):
    """A hit's primary key (pymilvus hits are dicts holding it under its field name and,
    in most versions, under ``id``)."""
    if primary_field in hit:
        return hit[primary_field]
    return hit.get("id")
