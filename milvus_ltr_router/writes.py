"""Routed writes: each row into its cluster, one row per key, clusters kept under their bound.

The decisions are the routing core's (:mod:`.placement`: where each row goes, which old
copies to delete); this module asks Milvus what they need to know (the live cluster
sizes, where stored copies of upserted keys are) and performs the writes and deletes.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
from pymilvus import MilvusClient
from pymilvus.exceptions import DataNotMatchException

from .errors import InputError, OperationalError
from .layout import Layout, cluster_sizes, read_layout
from .metrics import NULL_METRICS, NullMetrics
from .milvus_io import key_list_literal
from .placement import (ClusterSizes, RowInputError, every_partition, guess_partitions, locate_keys,
                        nearest_clusters, needs_stored_lookup, place_rows, plan_write,
                        prepare_rows, rows_of, size_bound_ratio,
                        stored_partitions_by_cluster)
from .storage import DEFAULT_PARTITION
from .write_steps import (Journal, LogWritten, Peek, Writable, WriteError, WriteRows, run_steps,
                          switch_safe_steps, write_steps)
from .switch import (REBUILDING, Stamp, collection_missing, journal_keys, layout_changed,
                     read_stamp, wait_writable)

log = logging.getLogger(__name__)


def new_tally(rows: list) -> dict:
    """What one routed write counts for the metrics (:meth:`RoutedWrites.record_write`)."""
    return {"rows": len(rows), "written": 0, "spilled": 0, "moved": 0}


class RoutedDataError(InputError, DataNotMatchException):
    """A written row that does not fit a laid-out collection (pymilvus: DataNotMatchException)."""

    def __init__(self, message: str):
        DataNotMatchException.__init__(self, message=message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


class RoutedWrites:
    """One client's routed writes, and the cluster sizes they go by in size-bounded layouts.

    ``client`` answers the queries (sizes, stored keys); ``submit(fn)`` runs a background
    re-read of the sizes (a thread pool's ``submit``); ``is_lite()`` says whether the
    backend is milvus-lite, whose upsert already replaces a key in every partition.
    ``metrics`` (:func:`.metrics.metrics_recorder`; default: none) records each routed write
    (``routed_write``: rows written, spilled by the size bound, keys moved, rows not written).
    ``writers``: how many processes write into the same layouts at once; each then takes
    only its share of a cluster's room under the size bound (:class:`.placement.ClusterSizes`).
    """

    def __init__(self, client: MilvusClient, *, submit: Callable, is_lite: Callable[[], bool],
                 refresh_interval: float = 10.0, metrics: NullMetrics = NULL_METRICS,
                 writers: int = 1):
        if int(writers) < 1:
            raise InputError(f"concurrent_writers must be a positive number of processes, "
                             f"got {writers}")
        self.writers = int(writers)
        self.client = client
        self.submit = submit
        self.is_lite = is_lite
        self.refresh_interval = refresh_interval
        self.metrics = metrics
        self._sizes: dict[str, tuple[ClusterSizes, threading.Lock]] = {}  # collection -> (sizes, reading)
        self._lock = threading.Lock()
        self._layouts: dict[tuple, Layout] = {}     # (collection, layout id) -> layout met by a write
        self.switch_timeout = 300.0                 # seconds a write waits for a layout switch
        self._log_warned = -1e9                     # when a failed write-log append was last logged
        self._log_missing: dict[str, float] = {}    # write log -> when it was found missing

    # ------------------------------------------------------------------ size bound
    def _bound(self, layout: Layout) -> tuple[ClusterSizes, threading.Lock] | None:
        """This client's sizes of a layout built with a size bound, and the lock held while
        they are read (None: no bound)."""
        ratio = size_bound_ratio(layout)
        if ratio is None:
            return None
        with self._lock:
            entry = self._sizes.get(layout.collection)
            if entry is None or entry[0].layout_id != layout.layout_id:   # new or rebuilt
                entry = self._sizes[layout.collection] = (ClusterSizes(layout, ratio, self.writers),
                                                          threading.Lock())
        return entry

    def sizes(self, layout: Layout) -> ClusterSizes | None:
        """The cluster sizes routed writes into ``layout`` go by (None: no size bound)."""
        entry = self._bound(layout)
        return None if entry is None else entry[0]

    def balance_status(self, layout: Layout) -> dict | None:
        """The size bound routed writes keep (:meth:`.placement.ClusterSizes.status`); reads nothing."""
        sizes = self.sizes(layout)
        return None if sizes is None else sizes.status(time.monotonic())

    def read_sizes(self, layout: Layout) -> None:
        """Read the live cluster sizes of a size-bounded ``layout`` now."""
        entry = self._bound(layout)
        if entry is not None:
            with entry[1]:
                self._read_sizes(layout, entry[0])

    def place(self, layout: Layout, vectors: np.ndarray,
              tally: dict | None = None) -> tuple[np.ndarray, ClusterSizes | None]:
        """Cluster of each written row (:func:`.placement.place_rows`) and the sizes that
        counted them. Before this client's first routed write the live sizes are read. With
        metrics on, ``tally["spilled"]`` counts the rows the size bound sent elsewhere."""
        clusters, sizes = self._place(layout, vectors)
        if sizes is not None and tally is not None and self.metrics.enabled:
            tally["spilled"] = int((clusters != nearest_clusters(layout, vectors)).sum())
        return clusters, sizes

    def _place(self, layout: Layout, vectors: np.ndarray) -> tuple[np.ndarray, ClusterSizes | None]:
        entry = self._bound(layout)
        if entry is None:
            return place_rows(layout, vectors), None
        sizes, reading = entry
        if sizes.checked_at is None:        # this client's first routed write: read sizes first
            with reading:
                if sizes.checked_at is None:
                    try:
                        self._read_sizes(layout, sizes)
                    except Exception as exc:
                        sizes.checked_at = time.monotonic()
                        log.warning("reading the cluster sizes of %r failed (%s: %s); routed "
                                    "writes go by its build-time sizes for now", layout.collection,
                                    type(exc).__name__, exc)
        clusters = place_rows(layout, vectors, sizes)
        self._refresh_sizes_when_due(layout, sizes, reading)
        return clusters, sizes

    def _refresh_sizes_when_due(self, layout: Layout, sizes: ClusterSizes,
                                reading: threading.Lock) -> None:
        """Re-read the live sizes in the background when the last read (or failed attempt)
        is ``refresh_interval`` old. Writes do not wait for it: they go by the estimate."""
        if not sizes.due(time.monotonic(), self.refresh_interval):
            return
        if not reading.acquire(blocking=False):
            return                              # a read is under way
        sizes.checked_at = time.monotonic()

        def read():
            try:
                self._read_sizes(layout, sizes)
            except Exception as exc:            # keep the estimate; try again next interval
                log.warning("reading the cluster sizes of %r failed (%s: %s); routed writes go "
                            "by this client's estimate", layout.collection, type(exc).__name__, exc)
            finally:
                reading.release()
        try:
            self.submit(read)
        except RuntimeError:                    # the client is closing: no read
            reading.release()

    def _read_sizes(self, layout: Layout, sizes: ClusterSizes) -> None:
        """Replace the estimate's base by the live sizes (the caller holds the reading lock)."""
        done = sizes.begin_read()
        started = time.monotonic()
        sizes.finish_read(self.live_cluster_sizes(layout), done, started)

    def live_cluster_sizes(self, layout: Layout) -> np.ndarray:
        """Rows in each cluster now, including rows not flushed yet
        (:func:`.layout.cluster_sizes`: one snapshot ``count(*)`` per partition, or the
        cluster-id column)."""
        return cluster_sizes(self.client, layout)

    # ------------------------------------------------------------------ writes
    def write(self, kind: str, write: Callable, delete: Callable, collection_name: str,
              layout: Layout, data, timeout=None, *, stray_partition: Callable[[], str | None],
              **kwargs):
        """A routed ``insert`` or ``upsert`` of ``data`` into ``layout``'s collection.

        Each row goes to its cluster: the cluster's partition, and its id in the cluster-id
        field. An upsert keeps one row per primary key: where a key's new vector belongs to
        another partition than its stored row, the new row is written first and the old copy
        is then deleted from its old partition (Milvus servers upsert within one partition
        only; milvus-lite's upsert already replaces the key in every partition). A key given
        twice in one upsert keeps its last row, as within one Milvus request. ``write`` and
        ``delete`` are pymilvus's calls; ``stray_partition()`` names ``_default`` while it
        holds rows written around the layout.

        With metrics on, each call that had rows is recorded (``routed_write``), also one that
        raised: its rows not written count as ``failed``.
        """
        rows = rows_of(data)
        if not rows:
            return write(collection_name, rows, timeout=timeout, **kwargs)
        tally = new_tally(rows)
        try:
            return self._switch_safe(kind, write, delete, collection_name, layout, rows, timeout,
                                     stray_partition, tally, **kwargs)
        finally:
            self.record_write(layout.collection, tally)

    # ------------------------------------------------------------------ layout switches
    def writable(self, collection_name: str, layout: Layout) -> tuple[Stamp | None, Layout]:
        """The stamp of ``collection_name`` once it can be written (:mod:`.switch`; waits
        while a switch is under way) and the layout stored in it: ``layout`` when it is
        still the one there, else the new one, read now (and the routing table told).
        ``(None, layout)`` where no stamp can be read (a backend without
        ``describe_collection``, Milvus unreachable: the write itself says so)."""
        for attempt in range(20):
            try:
                stamp = read_stamp(self.client, collection_name)
            except Exception as exc:
                if not collection_missing(exc):
                    return None, layout     # no stamp to read here: the write reports errors
                # missing for a moment, e.g. between the two renames of a swap
                stamp = wait_writable(self.client, collection_name, self.switch_timeout)
            if not stamp.writable:
                stamp = wait_writable(self.client, collection_name, self.switch_timeout)
            if stamp.name == layout.collection and stamp.layout_id in (None, layout.layout_id):
                return stamp, layout
            new = self._layouts.get((stamp.name, stamp.layout_id))
            if new is None:
                new = read_layout(self.client, stamp.name)
                if stamp.layout_id is not None and new.layout_id != stamp.layout_id:
                    time.sleep(0.05 * (attempt + 1))   # its metadata not there yet: look again
                    continue
                with self._lock:
                    self._layouts = {k: v for k, v in self._layouts.items() if k[0] != stamp.name}
                    self._layouts[(stamp.name, new.layout_id)] = new
                log.info("routed writes into %r: layout %s of %r replaces %s of %r",
                         collection_name, new.layout_id, new.collection, layout.layout_id,
                         layout.collection)
            layout_changed(self.client, collection_name)
            return stamp, new
        raise OperationalError(f"the layout behind {collection_name!r} kept changing while a "
                               f"routed write read it; try again")

    def journal(self, stamp: Stamp | None, layout: Layout, rows: list) -> None:
        """Journal the keys of ``rows`` if ``stamp`` says a rebuild is reading."""
        if stamp is not None and stamp.state == REBUILDING and stamp.journal:
            pk = layout.primary_field
            journal_keys(self.client, stamp.journal, [r[pk] for r in rows if pk in r])

    def log_written(self, layout: Layout, tally: dict) -> None:
        """Record the keys a write just wrote into ``layout``, with their clusters
        (``tally["logged"]``, :func:`.write_steps.write_steps`), in its write log
        (:attr:`.layout.Layout.write_log`), for its upkeep. A failure is logged, never
        raised: the rows were written. A log that does not exist (dropped to stop recording)
        is not tried again for a minute."""
        name = layout.write_log
        now = time.monotonic()
        keys, clusters = tally.get("logged") or ([], [])
        if not name or not keys or now - self._log_missing.get(name, -1e9) < 60:
            return
        try:
            journal_keys(self.client, name, keys, clusters)
        except Exception as exc:
            if collection_missing(exc):
                self._log_missing[name] = now
            if now - self._log_warned > 60:
                self._log_warned = now
                log.warning("recording written keys in %r failed (%s: %s); those rows stay "
                            "where they landed until a rebuild", name, type(exc).__name__, exc)

    def peek(self, collection_name: str, before: Stamp) -> Stamp | None:
        """The stamp now (None: the name is missing for a moment, as mid-swap); ``before``
        where it cannot be read for another reason (nothing says a switch began)."""
        try:
            return read_stamp(self.client, collection_name)
        except Exception as exc:
            if collection_missing(exc):
                return None
            log.debug("re-reading the stamp of %r failed: %s", collection_name, exc)
            return before

    def _switch_safe(self, kind, write, delete, collection_name, layout, rows, timeout,
                     stray_partition, tally, **kwargs):
        """:meth:`_write` performed as :func:`.write_steps.switch_safe_steps` asks: into the
        physical collection of the layout stored behind ``collection_name`` now, safe across
        a layout switch (:mod:`.switch`)."""
        client = self.client
        last = {"tally": tally}                 # the tally of the latest WriteTo

        def perform(step):
            if isinstance(step, Writable):
                return self.writable(step.name, step.layout)
            if isinstance(step, Journal):
                return self.journal(step.stamp, step.layout, rows)
            if isinstance(step, Peek):
                return self.peek(step.name, step.before)
            if isinstance(step, LogWritten):
                return self.log_written(step.layout, last["tally"])
            if step.redo:
                last["tally"] = new_tally([])
                return self._write("upsert", lambda *a, **k: MilvusClient.upsert(client, *a, **k),
                                   lambda *a, **k: MilvusClient.delete(client, *a, **k), step.name,
                                   step.layout, rows, timeout, stray_partition, last["tally"],
                                   **kwargs)
            last["tally"] = tally
            return self._write(kind, write, delete, step.name, step.layout, rows, timeout,
                               stray_partition, tally, **kwargs)
        return run_steps(switch_safe_steps(kind, collection_name, layout, len(rows)), perform)

    def record_write(self, collection: str, tally: dict) -> None:
        if not self.metrics.enabled:
            return
        try:                            # rows: after a key given twice kept its last row
            self.metrics.routed_write(collection, tally["written"], tally["spilled"],
                                      tally["moved"], tally["rows"] - tally["written"])
        except Exception as exc:        # metrics never fail a write
            log.debug("recording a routed write failed: %s", exc)

    def _write(self, kind, write, delete, collection_name, layout, rows, timeout,
               stray_partition, tally, **kwargs):
        try:
            rows, vectors = prepare_rows(kind, layout, rows, collection_name)
        except RowInputError as exc:
            raise RoutedDataError(str(exc)) from exc
        tally["rows"] = len(rows)
        # where stored copies of the keys are, found before anything is written (a failure
        # here writes nothing and counts nothing against the size bound)
        old_parts = self.stored_partitions(layout, rows, timeout, stray_partition) \
            if needs_stored_lookup(kind, layout.storage) and not self.is_lite() else {}
        clusters, sizes = self.place(layout, vectors, tally)
        plan = plan_write(layout, rows, clusters)
        steps = write_steps(kind, collection_name, layout, plan, clusters, old_parts, tally=tally,
                            landed=sizes.landed if sizes is not None else None)

        def perform(request):
            if isinstance(request, WriteRows):
                return write(collection_name, request.rows, timeout=timeout,
                             partition_name=request.partition_name, **kwargs)
            return delete(collection_name, filter=request.filter,
                          partition_name=request.partition_name, timeout=timeout)
        return run_steps(steps, perform)

    # ------------------------------------------------------------------ stored copies
    def stored_partitions(self, layout: Layout, rows: list[dict], timeout,
                          stray_partition: Callable[[], str | None]) -> dict:
        """Primary key -> partitions holding a stored row with that key (before an upsert)."""
        storage, pk = layout.storage, layout.primary_field
        keys = [r[pk] for r in rows if pk in r]
        if not keys:
            return {}
        expr = f"{pk} in {key_list_literal(keys)}"
        if storage.cluster_field is not None:
            found = self.client.query(layout.collection, filter=expr,
                                      output_fields=[pk, storage.cluster_field], timeout=timeout,
                                      consistency_level="Strong")
            out = stored_partitions_by_cluster(storage, found, pk)
            if found and stray_partition():     # _default holds rows written around it
                for key in self.keys_in(layout, sorted(out), [DEFAULT_PARTITION], timeout):
                    out[key].add(DEFAULT_PARTITION)
            return out
        # partition storage: Milvus does not say which partition a row is in. Only partitions
        # where the key is found now may be cleaned after the write: deleting it from every
        # other partition would also delete a concurrent writer's new copy (two upserts of one
        # key to two clusters would leave none). Each stored row is looked for first in the
        # partition of its stored vector's nearest cluster, the rest by halving the partitions.
        found = self.client.query(layout.collection, filter=expr,
                                  output_fields=[pk, layout.vector_field], timeout=timeout,
                                  consistency_level="Strong")
        if not found:
            return {}
        guesses = guess_partitions(layout, np.asarray([r[layout.vector_field] for r in found],
                                                      dtype=np.float32))
        return locate_keys(lambda keys, parts: self.keys_in(layout, keys, parts, timeout),
                           [r[pk] for r in found], guesses, every_partition(storage))

    def keys_in(self, layout: Layout, keys: list, partitions: list[str], timeout=None) -> set:
        """Which of ``keys`` have a row in any of ``partitions`` (a Strong query)."""
        pk = layout.primary_field
        rows = self.client.query(layout.collection, filter=f"{pk} in {key_list_literal(keys)}",
                                 output_fields=[pk], partition_names=list(partitions),
                                 timeout=timeout, consistency_level="Strong")
        return {r[pk] for r in rows}
