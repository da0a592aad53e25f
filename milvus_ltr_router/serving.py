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
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pymilvus import MilvusClient
from pymilvus.exceptions import ParamError

from .errors import InputError
from .layout import Layout, current_layout_id, has_stray_partition, laid_out_name, read_layout
from .plan import QueryInputError, query_matrix
from .registry import ModelRegistry, retry_delay
from .repair import stray_rows
from .router import BaseRouter, CentroidRouter, MomentRouter, Router
from .storage import DEFAULT_PARTITION, storage_status

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
    (layouts, rows outside them) and ``registry`` (published routers)."""

    def __init__(self, client: MilvusClient, registry: ModelRegistry, reload_interval: float = 10.0,
                 router_threads: int = 1):
        self.client = client
        self.registry = registry
        self.reload_interval = reload_interval
        self.router_threads = router_threads
        self._routing: dict[str, tuple[Routing | None, float]] = {}   # name -> (state, checked)
        self._lock = threading.Lock()
        self._strays: dict[str, tuple[int, float]] = {}   # collection -> (_default rows, checked)

    def state(self, collection: str) -> Routing | None:
        """Current routing of ``collection`` (None: no layout), re-checked every interval.

        A check re-resolves aliases, re-reads the layout id (a rebuilt layout is
        noticed) and stats the router pointer; swaps replace the whole record, so
        in-flight searches keep the router they started with.
        """
        cached = self._routing.get(collection)
        if cached is not None and time.monotonic() - cached[1] < self.reload_interval:
            return cached[0]
        with self._lock:
            cached = self._routing.get(collection)
            if cached is None or time.monotonic() - cached[1] >= self.reload_interval:
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
                cached = (state, time.monotonic())
                self._routing[collection] = cached
            return cached[0]

    def forget(self, collection: str) -> None:
        """Read ``collection``'s routing again at its next use (and every count of rows
        outside a layout)."""
        with self._lock:
            self._routing.pop(collection, None)
            self._strays.clear()

    def _refresh(self, collection: str, old: Routing | None) -> Routing | None:
        name = laid_out_name(self.client, collection)      # one alias resolution per check
        if name is None:
            return None
        if old is not None and old.layout.collection == name and \
                current_layout_id(self.client, name) == old.layout.layout_id:
            layout = old.layout
        else:
            layout = read_layout(self.client, collection)
        try:
            stamp = self.registry.pointer_stamp(layout.collection)
        except Exception as exc:        # model dir is a file, unreadable...: load_router reports it
            stamp = ("unreadable", str(exc))
        if old is not None and old.layout is layout and stamp == old.stamp and \
                (not old.failures or time.monotonic() < old.retry_at):
            return old                  # unchanged; an error state is re-read after its backoff
        return self.load_router(layout, stamp, old)

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
                return Routing(layout, fallback, None, "no router published", stamp)
            router = Router.load(current.path, layout=layout, num_threads=self.router_threads)
        except Exception as exc:        # whatever is wrong on disk must not fail searches
            what = f"router {current.version}" if current is not None else "router pointer"
            error = f"{what} of {layout.collection!r} is unusable: {exc}"
        else:
            log.info("serving router %s for %r", current.version, layout.collection)
            return Routing(layout, router, current.version, "", stamp)
        failures = old.failures + 1 if same_layout else 1
        delay = retry_delay(failures, self.reload_interval)
        fallback = old.router if same_layout and _training_free(old.router) \
            else fallback_router(layout)
        how = "its cluster moments" if fallback.kind == "moments" else "centroids"
        log.warning("%s; routing %r by %s (failure %d, next check in %.0f s)",
                    error, layout.collection, how, failures, delay)
        return Routing(layout, fallback, None, error, stamp, failures, time.monotonic() + delay)

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
        return cached[0]


def routing_status(state: Routing, *, nprobe: int, balance: dict | None, rows_outside_layout: int,
                   query_log: dict) -> dict:
    """``router_status()`` of a routed collection (see :meth:`.RoutedMilvusClient.router_status`)."""
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
            "rows_outside_layout": rows_outside_layout, "query_log": query_log}
