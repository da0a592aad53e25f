"""The routing core for writes: where each written row goes, and which old copies to delete.

Sans-I/O like :mod:`.plan`: plain decisions over rows and arrays; :mod:`.writes` asks
Milvus what they need to know and performs the writes and deletes they name::

    rows, vectors = prepare_rows("upsert", layout, rows_of(data), name)
    clusters = place_rows(layout, vectors, sizes)      # nearest cluster (with room)
    plan = plan_write(layout, rows, clusters)          # one batch per partition
    stale = stale_copies(layout, rows, clusters, old)  # partition -> keys to delete after

Where the stored copies of upserted keys are (``old`` above) is asked of Milvus by the
shell; :func:`locate_keys_steps` says which questions to ask in partition storage.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import numpy as np

from .blas import serial_blas
from .clustering import as_vector_batch, assign_clusters, assign_with_room, balanced_capacity
from .errors import InputError
from .storage import DEFAULT_PARTITION, Storage


class RowInputError(InputError):
    """Written rows that do not fit a laid-out collection (re-raised by the shells as
    pymilvus's ``DataNotMatchException``: :class:`.writes.RoutedDataError`)."""


# --------------------------------------------------------------------------- where rows go
def rows_of(data) -> list:
    """A write's rows as a list (one dict is one row)."""
    return [data] if isinstance(data, dict) else list(data)


def prepare_rows(kind: str, layout, rows: list, collection: str) -> tuple[list, np.ndarray]:
    """The rows a routed ``insert``/``upsert`` writes and their vectors (float32 ``[n, dim]``).

    Every row needs the layout's vector field (it picks the row's cluster); in an upsert
    the last row of a key wins, as within one Milvus request. :class:`RowInputError` for
    rows that do not fit."""
    field, pk = layout.vector_field, layout.primary_field
    missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or r.get(field) is None]
    if missing:
        raise RowInputError(f"rows {missing[:5]} have no vector field {field!r}; a laid-out "
                            f"collection needs it to pick each row's cluster")
    if kind == "upsert":        # the last row of a key wins, and lands in one partition only
        last = {r[pk]: i for i, r in enumerate(rows) if pk in r}
        rows = [r for i, r in enumerate(rows) if pk not in r or last[r[pk]] == i]
    try:
        vectors = as_vector_batch([r[field] for r in rows], layout.dim, f"layout {layout.layout_id}")
    except ValueError as exc:
        raise RowInputError(f"rows for {collection!r}: {exc}") from exc
    return rows, vectors


def nearest_clusters(layout, vectors) -> np.ndarray:
    """Cluster of each vector under the layout's own rule (no size bound)."""
    vecs = as_vector_batch(vectors, layout.dim, f"layout {layout.layout_id}")
    with serial_blas():                 # concurrent writers' products take turns: :mod:`.blas`
        return assign_clusters(vecs, layout.centroids, layout.algorithm)


def size_bound_ratio(layout) -> float | None:
    """The layout's ``max_cluster_ratio`` (None: routed writes are unbounded)."""
    return layout.extra.get("max_cluster_ratio")


class ClusterSizes:
    """Rows per cluster of one size-bounded layout as one client knows them (routed writes).

    ``read`` is the last count read from Milvus (the layout's build-time sizes until the
    first read); ``routed`` the rows this client sent to each cluster since that read's
    snapshot; ``inflight`` those of them whose write has not returned yet. The estimate is
    ``read + writers x routed``: with ``writers`` = W processes writing at once, each
    assumed to route like this one between reads, and each placing its rows in 1/W of the
    room (:func:`.clustering.assign_with_room`'s ``share``), so together they keep the
    bound. Every method is atomic (``lock``); reading the live sizes is the shell's
    (``begin_read`` before it starts, ``finish_read`` with what it read).
    """

    def __init__(self, layout, ratio: float, writers: int = 1):
        if int(writers) < 1:
            raise ValueError(f"writers must be a positive number of processes, got {writers}")
        self.layout_id = layout.layout_id
        self.ratio = float(ratio)
        self.writers = int(writers)
        self.read = np.asarray(layout.sizes, dtype=np.int64).copy()
        self.routed = np.zeros(layout.n_clusters, dtype=np.int64)
        self.inflight = np.zeros(layout.n_clusters, dtype=np.int64)
        self.read_at: float | None = None     # time.monotonic() of the last read's start
        self.checked_at: float | None = None  # ... of the last read or failed attempt
        self.lock = threading.Lock()

    def estimate(self) -> np.ndarray:
        return self.read + self.writers * self.routed

    def place(self, layout, vectors: np.ndarray) -> np.ndarray:
        """Cluster of each new row: its nearest with room under the bound
        (:func:`.clustering.assign_with_room`); the rows count as routed and in flight
        until :meth:`landed`."""
        with self.lock, serial_blas():      # concurrent writers' products: :mod:`.blas`
            clusters, _ = assign_with_room(vectors, layout.centroids, layout.algorithm,
                                           self.estimate(), self.ratio, share=self.writers)
            counts = np.bincount(clusters, minlength=len(self.routed))
            self.routed += counts
            self.inflight += counts
        return clusters

    def landed(self, clusters: np.ndarray, written: Sequence[int]) -> None:
        """A routed write returned: its rows are no longer in flight, and rows it did not
        write (``clusters`` rows not in ``written``: a failed request) no longer count."""
        k = len(self.routed)
        sent = np.bincount(clusters, minlength=k)
        landed = np.bincount(clusters[np.asarray(written, dtype=np.int64)], minlength=k)
        with self.lock:
            self.inflight -= sent
            self.routed -= sent - landed

    def due(self, now: float, interval: float) -> bool:
        """Whether the live sizes should be read again (never read, or ``interval`` old)."""
        checked = self.checked_at
        return checked is None or now - checked >= interval

    def begin_read(self) -> np.ndarray:
        """Before a read of the live sizes starts: the rows already written (they will be
        in what it reads)."""
        with self.lock:
            return self.routed - self.inflight

    def finish_read(self, live: np.ndarray, done: np.ndarray, started: float) -> None:
        """Replace the estimate's base by ``live`` (read from ``started`` on). Rows written
        before the read began (``done``) are in it and leave ``routed``; rows in flight then,
        or routed later, stay counted (one may count twice until the next read: the bound
        errs on the strict side)."""
        with self.lock:
            self.read = np.asarray(live, dtype=np.int64)
            self.routed -= done
            self.read_at = self.checked_at = started

    def status(self, now: float) -> dict:
        """The bound as this client counts it: ``capacity`` for its ``rows``, the
        ``largest`` cluster and the age of its last read (None: build-time sizes)."""
        with self.lock:
            est, read_at = self.estimate(), self.read_at
        rows = int(est.sum())
        return {"max_cluster_ratio": self.ratio, "writers": self.writers,
                "capacity": balanced_capacity(rows, len(est), self.ratio), "rows": rows,
                "largest": int(est.max()),
                "sizes_age_s": None if read_at is None else now - read_at}


def place_rows(layout, vectors: np.ndarray, sizes: ClusterSizes | None = None) -> np.ndarray:
    """Cluster of each written row: its nearest, or under a size bound its nearest with room."""
    return nearest_clusters(layout, vectors) if sizes is None else sizes.place(layout, vectors)


@dataclass(frozen=True)
class WriteBatch:
    """One write request: ``rows`` (indices into :attr:`WritePlan.rows`) into
    ``partition_name`` (``""``: the collection's default partition)."""

    partition_name: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class WritePlan:
    """The rows to write (with their cluster id in the cluster field, where the storage has
    one), each row's cluster, and one batch per partition in order of first use."""

    rows: list
    clusters: np.ndarray
    batches: tuple[WriteBatch, ...]

    def batch_rows(self, batch: WriteBatch) -> list:
        return [self.rows[i] for i in batch.rows]


def plan_write(layout, rows: list, clusters: np.ndarray) -> WritePlan:
    """Each row to its cluster: the cluster's partition, and its id in the cluster field."""
    storage = layout.storage
    if storage.cluster_field is not None:
        rows = [{**r, storage.cluster_field: int(c)} for r, c in zip(rows, clusters)]
    by_partition: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        by_partition.setdefault(storage.write_partition(c), []).append(i)
    return WritePlan(rows, clusters, tuple(WriteBatch(p, tuple(ix)) for p, ix in by_partition.items()))


# --------------------------------------------------------------------------- stored copies
def needs_stored_lookup(kind: str, storage: Storage) -> bool:
    """Whether an upsert must first find where its keys are stored: a key whose row moves
    to another partition leaves its old copy behind (servers upsert within one partition),
    except in ``single`` storage (one partition). milvus-lite's upsert replaces a key in
    every partition: shells skip the lookup there."""
    return kind == "upsert" and storage.mode != "single"


def stored_partitions_by_cluster(storage: Storage, found: list[dict], primary_field: str
                                 ) -> dict:
    """Key -> partitions of its stored rows, from their cluster ids (the field storage
    modes). A cluster id outside the layout was not written by a routed client: such a row
    is looked for in ``_default``."""
    out: dict = {}
    n = storage.n_clusters
    for r in found:
        c = r[storage.cluster_field]
        part = storage.write_partition(c) if isinstance(c, int) and 0 <= c < n else DEFAULT_PARTITION
        out.setdefault(r[primary_field], set()).add(part)
    return out


def guess_partitions(layout, vectors) -> list[str]:
    """The partition each stored row most likely sits in: its vector's nearest cluster's."""
    storage = layout.storage
    return [storage.write_partition(int(c)) or DEFAULT_PARTITION
            for c in nearest_clusters(layout, vectors)]


def every_partition(storage: Storage) -> list[str]:
    """Every partition a stored row can be in: the layout's and ``_default``."""
    return sorted(set(storage.partitions) | {DEFAULT_PARTITION})


@dataclass(frozen=True)
class KeysQuery:
    """A question for Milvus: which of ``keys`` have a row in any of ``partitions``?
    (Answered with the set of those keys.)"""

    keys: list
    partitions: list[str]


def locate_keys_steps(keys: list, guesses: list[str], partitions: list[str]
                      ) -> Generator[KeysQuery, set, dict]:
    """Key -> the partitions that hold a row with that key, found with few queries.

    A generator of :class:`KeysQuery`; send each one's answer back, and its return value
    is the result (:func:`locate_keys` drives it). Keys are grouped by their guessed
    partition; per group one query checks the guess and one the other partitions, and
    keys found elsewhere (rows not in their nearest cluster, stale copies) are located by
    halving those partitions (about ``log2(len(partitions))`` queries per such key,
    batched per half). A key found nowhere maps to no partition.
    """
    out: dict = {}

    def halve(group: list, parts: list[str]):
        if len(parts) == 1:
            for key in group:
                out.setdefault(key, set()).add(parts[0])
            return
        for half in (parts[:len(parts) // 2], parts[len(parts) // 2:]):
            hit = yield KeysQuery(group, half)
            if hit:
                yield from halve([k for k in group if k in hit], half)

    by_guess: dict[str, list] = {}
    for key, part in zip(keys, guesses):
        by_guess.setdefault(part, []).append(key)
    for guess, group in by_guess.items():
        hit = (yield KeysQuery(group, [guess])) if guess in partitions else set()
        for key in group:
            if key in hit:
                out.setdefault(key, set()).add(guess)
        rest = [p for p in partitions if p != guess]
        elsewhere = (yield KeysQuery(group, rest)) if rest else set()
        if elsewhere:
            yield from halve([k for k in group if k in elsewhere], rest)
    return out


def locate_keys(keys_in: Callable[[list, list[str]], set], keys: list, guesses: list[str],
                partitions: list[str]) -> dict:
    """:func:`locate_keys_steps` answered by ``keys_in(keys, partitions)`` (which of
    ``keys`` have a row in any of ``partitions``)."""
    steps = locate_keys_steps(keys, guesses, partitions)
    try:
        query = next(steps)
        while True:
            query = steps.send(keys_in(query.keys, query.partitions))
    except StopIteration as done:
        return done.value


def stale_copies(layout, rows: list, clusters: np.ndarray, stored: dict) -> dict[str, list]:
    """Partition -> keys whose old copy to delete there after an upsert: every partition
    a written key was stored in (``stored``: key -> partitions) other than its new one."""
    if not stored:
        return {}
    pk, storage = layout.primary_field, layout.storage
    stale: dict[str, list] = {}
    for r, c in zip(rows, clusters):
        new = storage.write_partition(c)
        for part in stored.get(r.get(pk), ()):
            if (part or DEFAULT_PARTITION) != (new or DEFAULT_PARTITION):
                stale.setdefault(part or DEFAULT_PARTITION, []).append(r[pk])
    return stale
