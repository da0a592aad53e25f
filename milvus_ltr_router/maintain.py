"""Layout upkeep: the rows written since the last upkeep, rewritten in place in cluster order.

A build writes every row in cluster order, so a cluster's rows sit together in a few
segments and a routed search scans them as contiguous runs. Rows that routed clients write
afterwards land in arrival order: each cluster's new rows scatter over the newest segments,
and searches at a fixed recall get slower (``benchmarks/bench_wear.py``: 1.18x after +40%
rows), while recall holds. A rebuild restores the order but reads and writes every row.

Upkeep rewrites only the rows written since the last upkeep. Routed writers record the keys
they write, with the cluster each row went to, in the layout's write log
(``<collection>__ltr_writes``, :attr:`.layout.Layout.write_log`); :func:`maintain_layout`
reads the log, orders the keys by cluster, and upserts those rows again - same key, same vector, same
cluster - in cluster order, so they land as one contiguous run per cluster in new
segments (Milvus marks their old copies deleted). Clusters do not change, so routers stay
valid and searches are never routed on clusters they were not trained on.

Writers and upkeep. Rewriting a row from a copy read a moment earlier would undo an
application's write of that key in between. So each chunk is rewritten under a short
freeze (:mod:`.switch`: the stamp ``frozen``, the counter ``ltr.upkeep`` bumped, a lease in
``ltr.frozen_until``): routed writers wait while it lasts, and a write that spanned its
start sees the counter change and is written again once it ends. Searches go on
throughout. A freeze left by a killed upkeep expires with its lease; the log entries are
deleted only after their rows are rewritten (acknowledged upserts are durable), so a killed
upkeep is finished by the next run (rewriting a row as itself is harmless).

A backend without collection properties runs the upkeep without freezes (do not write
while it runs there).

The decisions - whether upkeep is worth running, which rows in which order and in which
chunks - are pure (:func:`plan_rewrite`, :func:`worth_running`); :func:`maintain_layout`
performs the I/O they ask for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from pymilvus import MilvusClient

from .errors import OperationalError
from .layout import LayoutError, read_layout
from .milvus_io import count_rows, key_list_literal
from .placement import plan_write
from .progress import ProgressCounter
from .switch import (FROZEN, REBUILDING, RETIRED, FreezeLease, delete_entries, read_entries,
                     read_stamp, set_stamp)

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20          # vector bytes per rewrite request (under gRPC's 64 MB)


class UpkeepBusy(OperationalError):
    """Another switch (a rebuild, another upkeep) holds the layout."""


# --------------------------------------------------------------------------- decisions (pure)
@dataclass(frozen=True)
class RewritePlan:
    """What one upkeep rewrites: ``keys`` (distinct, stored now) in cluster order, their
    ``clusters``, the ``chunks`` (slices of ``keys``) rewritten under one freeze each, and
    the log entries (``seqs``) dealt with once they are."""
    keys: list
    clusters: np.ndarray
    chunks: list
    seqs: list
    logged: int = 0                 # log entries read
    missing: int = 0                # logged keys no longer stored (counted as rows are read)
    outside: int = 0                # logged keys whose cluster id is not one of the layout's

    @property
    def rows(self) -> int:
        return len(self.keys)


def chunk_rows_for(dim: int, chunk_rows: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per rewrite request: ``chunk_rows``, fewer where the vectors would outgrow
    ``chunk_bytes``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return max(1, min(chunk_rows, chunk_bytes // max(1, 4 * int(dim))))


def plan_rewrite(seqs: Sequence, logged_keys: Sequence, logged_clusters: Sequence,
                 n_clusters: int, chunk_rows: int) -> RewritePlan:
    """The rewrite of the logged keys: each distinct key once, at the cluster its latest
    entry names (``seqs`` ascending), ordered by (cluster, key), in chunks of ``chunk_rows``.
    A cluster id outside ``range(n_clusters)`` was not placed by a routed writer of this
    layout (stray rows: ``repair-layout``); those keys are left where they are. Which keys
    were deleted since is known only when their rows are read (:func:`maintain_layout`)."""
    if not len(seqs) == len(logged_keys) == len(logged_clusters):
        raise ValueError(f"{len(seqs)} log entries but {len(logged_keys)} keys and "
                         f"{len(logged_clusters)} cluster ids")
    latest: dict = {}
    for key, cluster in zip(logged_keys, logged_clusters):
        latest.pop(key, None)
        latest[key] = int(cluster)
    inside = [(c, k) for k, c in latest.items() if 0 <= c < n_clusters]
    outside = len(latest) - len(inside)
    inside.sort(key=lambda ck: (ck[0], _sort_key(ck[1])))
    keys = [k for _, k in inside]
    clusters = np.asarray([c for c, _ in inside], dtype=np.int64)
    chunks = [slice(i, min(i + chunk_rows, len(keys))) for i in range(0, len(keys), chunk_rows)]
    return RewritePlan(keys, clusters, chunks, list(seqs), len(seqs), 0, outside)


def _sort_key(key):
    return (0, key, "") if isinstance(key, (int, np.integer)) else (1, 0, str(key))


def worth_running(logged_rows: int, total_rows: int, min_share: float) -> bool:
    """Whether an upkeep is worth its cost: the logged rows are at least ``min_share`` of
    the collection (the wear grows with the share of rows out of order; bench_wear)."""
    if logged_rows <= 0:
        return False
    return total_rows <= 0 or logged_rows / total_rows >= min_share


# --------------------------------------------------------------------------- the I/O
@dataclass
class MaintainReport:
    collection: str
    layout_id: str
    logged: int = 0
    rewritten: int = 0
    missing: int = 0
    outside: int = 0
    chunks: int = 0
    skipped: str = ""               # why nothing was rewritten ("" where rows were)
    frozen_seconds: float = 0.0     # routed writers' wait, all freezes together
    longest_freeze: float = 0.0
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def maintain_layout(client: MilvusClient, collection: str, *, chunk_rows: int = 8192,
                    min_share: float = 0.0, lease: float = 60.0, pause: float = 0.1,
                    grace: float = 0.05, flush: bool = True, dry_run: bool = False,
                    show_progress: bool | None = None,
                    after_chunk: Callable[[int], None] | None = None) -> MaintainReport:
    """Rewrite the rows written into ``collection`` (a laid-out collection or an alias) since
    its last upkeep in cluster order, as the module docstring says; returns what was done.

    ``chunk_rows`` rows are rewritten under each freeze (fewer for wide vectors), ``pause``
    seconds apart so waiting writers get their turn; a freeze's lease (``lease`` seconds,
    renewed while the upkeep lives, :class:`.switch.FreezeLease`) ends it if the upkeep
    dies; a chunk whose lease may have lapsed is not written and the upkeep fails (nothing
    lost, the log kept). ``min_share``: do nothing unless the
    logged rows are at least that share of the collection. ``dry_run``: plan only.
    ``flush``: seal the rewritten rows at the end. The upkeep needs no flush to be safe
    (acknowledged upserts survive a restart), but searches do: on 2.3.5, 42k rewritten rows
    left in a growing segment made routed searches ~4x slower until Milvus sealed it
    (bench_wear ``--maintain-no-flush``), so only benchmarks turn it off.
    ``after_chunk(i)`` is called after chunk ``i`` is written (tests kill the process there).
    """
    t_start = time.perf_counter()
    seconds: dict = {}
    layout = read_layout(client, collection, moments=False)
    name = layout.collection
    report = MaintainReport(collection=name, layout_id=layout.layout_id, seconds=seconds)
    if not layout.write_log:
        raise LayoutError(f"{name!r} keeps no write log (its layout was built before write logs, "
                          f"or stores each cluster in a partition of its own, which needs no "
                          f"upkeep); rebuild it once with build-layout --overwrite "
                          f"--keep-clusters to start one")
    _check_free(read_stamp(client, name))

    log.info("upkeep of %r: reading the write log %r", name, layout.write_log)
    t0 = time.perf_counter()
    seqs, logged, logged_clusters = read_entries(client, layout.write_log, clusters=True)
    seconds["read_log"] = time.perf_counter() - t0
    report.logged = len(seqs)
    total = count_rows(client, name)
    if not worth_running(len(set(logged)), total, min_share):
        report.skipped = "nothing logged" if not seqs else \
            f"{len(set(logged))} logged rows are under {min_share:.0%} of {total}"
        seconds["total"] = time.perf_counter() - t_start
        return report

    plan = plan_rewrite(seqs, logged, logged_clusters, layout.n_clusters,
                        chunk_rows_for(layout.dim, chunk_rows))
    report.outside, report.chunks = plan.outside, len(plan.chunks)
    if dry_run:
        report.skipped = "dry run"
        seconds["total"] = time.perf_counter() - t_start
        return report

    log.info("upkeep of %r: rewriting %d rows in %d chunks", name, plan.rows, len(plan.chunks))
    t0 = time.perf_counter()
    freeze = FreezeLease(client, lease)
    with ProgressCounter(plan.rows, f"rewriting {name}", enabled=show_progress) as bar:
        try:
            for i, chunk in enumerate(plan.chunks):
                held, written = _rewrite_chunk(client, layout, plan.keys[chunk], freeze,
                                               grace=grace)
                report.frozen_seconds += held
                report.longest_freeze = max(report.longest_freeze, held)
                report.rewritten += written
                report.missing += chunk.stop - chunk.start - written
                bar.update(chunk.stop - chunk.start)
                if after_chunk is not None:
                    after_chunk(i)
                if pause > 0 and i + 1 < len(plan.chunks):
                    time.sleep(pause)
        finally:
            freeze.stop()
    seconds["rewrite"] = time.perf_counter() - t0
    if flush:
        log.info("upkeep of %r: flushing", name)
        t0 = time.perf_counter()
        client.flush(name)
        seconds["flush"] = time.perf_counter() - t0
    log.info("upkeep of %r: trimming the write log", name)
    t0 = time.perf_counter()
    delete_entries(client, layout.write_log, plan.seqs)     # only now: a killed run redoes them
    seconds["trim_log"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    log.info("upkeep of %r: %d rows rewritten in cluster order in %d chunks (%d logged keys "
             "deleted since, %d outside the layout); writers waited %.2f s in all, %.2f s at most",
             name, report.rewritten, report.chunks, report.missing, report.outside,
             report.frozen_seconds, report.longest_freeze)
    return report


def _check_free(stamp) -> None:
    """Refuse to start while a rebuild or another upkeep holds the layout."""
    if stamp.state == REBUILDING:
        raise UpkeepBusy(f"{stamp.name!r} is being rebuilt; run the upkeep after the rebuild")
    if stamp.state == RETIRED:
        raise UpkeepBusy(f"{stamp.name!r} is retired (replaced by {stamp.successor!r}); "
                         f"maintain that one")
    if stamp.state == FROZEN and not stamp.expired():
        raise UpkeepBusy(f"{stamp.name!r} is frozen by another switch or upkeep (until "
                         f"{stamp.until or 'its end'}); try again later")


def _rewrite_chunk(client: MilvusClient, layout, keys: list, freeze: FreezeLease, *,
                   grace: float) -> tuple[float, int]:
    """Upsert the stored rows of ``keys`` again, in the given (cluster) order, under a
    freeze; returns the seconds writers were held and the rows rewritten."""
    name, pk, cfield = layout.collection, layout.primary_field, layout.storage.cluster_field
    t0 = time.perf_counter()
    stamp = read_stamp(client, name)
    _check_free(stamp)
    frozen = freeze.freeze(name, upkeep=str(int(stamp.upkeep or 0) + 1))
    if frozen:
        time.sleep(grace)           # a stamp read by a writer just before: its write lands now
    try:
        rows = client.query(name, filter=f"{pk} in {key_list_literal(keys)}",
                            output_fields=["*"], consistency_level="Strong")
        by_key = {r[pk]: r for r in rows}
        # each row keeps the cluster it is stored in now (a writer may have moved the key
        # since it was logged): same key, vector and cluster, only its place changes
        ordered = [by_key[k] for k in keys if k in by_key
                   and 0 <= int(by_key[k][cfield]) < layout.n_clusters]
        now = np.asarray([int(r[cfield]) for r in ordered], dtype=np.int64)
        rows = [{k: v for k, v in r.items() if k != cfield} for r in ordered]
        if frozen:
            freeze.check()          # writers were held since the rows were read
        plan = plan_write(layout, rows, now)
        for batch in plan.batches:
            client.upsert(name, plan.batch_rows(batch), partition_name=batch.partition_name)
    finally:
        if frozen:
            freeze.release(name)
            set_stamp(client, name, state="", until="")
    return time.perf_counter() - t0, len(rows)


__all__ = ["RewritePlan", "MaintainReport", "UpkeepBusy", "plan_rewrite", "worth_running",
           "chunk_rows_for", "maintain_layout"]
