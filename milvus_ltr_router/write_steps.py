"""The requests of one routed insert/upsert, and what a failure part-way means: sans I/O.

:func:`switch_safe_steps` is the outer protocol (:mod:`.switch`): which layout to write, when
the keys are journaled for a rebuild that is reading, and when the rows are written again
because a layout switch began meanwhile. Its steps are :class:`Writable`, :class:`Journal`,
:class:`Peek`, :class:`WriteTo` (one whole write, itself the steps of :func:`write_steps`)
and :class:`LogWritten` (the written keys into the layout's write log).

:func:`write_steps` walks a :class:`.placement.WritePlan` as a generator: it yields each
request (:class:`WriteRows`: write these rows into this partition; :class:`DeleteKeys`:
delete these keys' stale copies from this partition), is sent each write's response
(``None`` for a delete) or thrown the exception the request raised, and returns the
pymilvus-shaped result. The sync and async clients only perform the requests
(:func:`run_steps`, :func:`arun_steps`), so the order of requests, the clean-up after a
partial failure and the error a caller sees are decided once, here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator

import numpy as np
from pymilvus.client.types import OmitZeroDict

from .errors import OperationalError
from .layout import Layout
from .milvus_io import key_list_literal
from .placement import stale_copies
from .storage import DEFAULT_PARTITION
from .switch import REBUILDING, Stamp

log = logging.getLogger(__name__)


class WriteError(OperationalError):
    """A routed insert/upsert that failed part-way: ``written`` rows landed, in
    ``partitions_done``; the rest did not."""

    def __init__(self, message: str, written: int = 0, partitions_done: list | None = None):
        super().__init__(message)
        self.written = written
        self.partitions_done = list(partitions_done or [])


@dataclass(frozen=True)
class WriteRows:
    """Write ``rows`` (row dicts) into ``partition_name`` (None: the collection's default)."""
    partition_name: str | None
    rows: list


@dataclass(frozen=True)
class DeleteKeys:
    """Delete the rows matching ``filter`` (keys whose new copy lives elsewhere) from
    ``partition_name``."""
    partition_name: str
    filter: str


Steps = Generator["WriteRows | DeleteKeys", Any, Any]


def delete_steps(layout: Layout, rows: list, clusters: np.ndarray, old_parts: dict) -> Steps:
    """Delete the stale copy of every upserted key from partitions other than its new one
    (:func:`.placement.stale_copies`); returns how many keys had one."""
    pk = layout.primary_field
    moved: set = set()
    for part, keys in stale_copies(layout, rows, clusters, old_parts).items():
        yield DeleteKeys(part, f"{pk} in {key_list_literal(keys)}")
        moved.update(keys)
    return len(moved)


def write_steps(kind: str, collection_name: str, layout: Layout, plan, clusters: np.ndarray,
                old_parts: dict, *, tally: dict | None = None,
                landed: Callable[[np.ndarray, list], None] | None = None) -> Steps:
    """The requests of a routed ``kind`` ("insert"/"upsert") of ``plan`` into ``collection_name``.

    One :class:`WriteRows` per partition in turn, then the :class:`DeleteKeys` of keys that
    moved (``old_parts``: key -> partitions holding its stored copy, found before anything
    was written). A failed first write re-raises what pymilvus raised (nothing was written);
    a later one deletes the stale copies of the keys already written (they keep one row) and
    raises :class:`WriteError` saying how many rows landed where. ``tally`` gets "written"
    and "moved" as they happen (for the metrics); ``landed(clusters, written_rows)`` is
    called once, however the writes end (the size bound counts what landed).
    """
    tally = {} if tally is None else tally
    total, cost, ids, done = 0, 0, [None] * len(plan.rows), []
    written: list[int] = []                 # rows of the batches that were written
    try:
        for batch in plan.batches:
            part = batch.partition_name
            try:
                res = yield WriteRows(part, plan.batch_rows(batch))
            except Exception as exc:
                if not done:                # nothing written: the caller sees what pymilvus raised
                    raise
                cleaned = ""
                try:                        # keys that did move keep one row: drop their old copy
                    yield from delete_steps(layout, [plan.rows[i] for i in written],
                                            clusters[written], old_parts)
                except Exception as clean_exc:
                    cleaned = (f"; deleting the old copies of the written keys failed too "
                               f"({clean_exc}): repeat the upsert to remove them")
                raise WriteError(f"{kind} into {collection_name!r} failed at partition "
                                 f"{part or DEFAULT_PARTITION!r} after {len(written)} of "
                                 f"{len(plan.rows)} rows were written (into {done or 'none'}): "
                                 f"{exc}{cleaned}",
                                 written=len(written), partitions_done=done) from exc
            res = res or {}
            total += res.get("insert_count", res.get("upsert_count", len(batch.rows)))
            cost += res.get("cost", 0) or 0
            for i, pk in zip(batch.rows, res.get("ids", []) or []):
                ids[i] = pk
            done.append(part)
            written.extend(batch.rows)
            tally["written"] = len(written)
    finally:
        if landed is not None:
            landed(clusters, written)
        if layout.write_log:                # what the write log records (LogWritten)
            pk = layout.primary_field
            tally["logged"] = ([plan.rows[i].get(pk) for i in written], clusters[written])
    try:
        tally["moved"] = yield from delete_steps(layout, plan.rows, clusters, old_parts)
    except Exception as exc:
        raise WriteError(f"{kind} into {collection_name!r} wrote all {len(plan.rows)} rows, but "
                         f"deleting the old copies of keys that moved to another partition "
                         f"failed; repeat the upsert to remove them: {exc}",
                         written=len(plan.rows), partitions_done=done) from exc
    key = "upsert_count" if kind == "upsert" else "insert_count"
    return OmitZeroDict({key: total, "ids": ids, "cost": cost})


@dataclass(frozen=True)
class Writable:
    """Wait until ``name`` can be written; answer ``(stamp, layout)``: its stamp (None where
    none can be read) and the layout stored in it (``layout`` if it is still the one)."""
    name: str
    layout: Layout


@dataclass(frozen=True)
class Journal:
    """Journal the write's keys if ``stamp`` says a rebuild is reading (else nothing)."""
    stamp: Stamp
    layout: Layout


@dataclass(frozen=True)
class Peek:
    """The stamp of ``name`` now (None: missing for a moment, as mid-swap; ``before`` where
    it cannot be read for another reason)."""
    name: str
    before: Stamp


@dataclass(frozen=True)
class WriteTo:
    """Write the rows into the physical collection ``name`` of ``layout``; ``redo``: again,
    as an upsert (a switch began during the first write), counted apart."""
    name: str
    layout: Layout
    redo: bool = False


@dataclass(frozen=True)
class LogWritten:
    """Record the keys just written, with their clusters (the ``tally["logged"]`` of the
    last :class:`WriteTo`), in ``layout``'s write log, for its upkeep (:mod:`.maintain`).
    Never fails the write: a key not recorded only keeps its row where it landed."""
    layout: Layout


def _write_to(name: str, layout: Layout, redo: bool = False) -> Steps:
    """One :class:`WriteTo`, then :class:`LogWritten` where the layout keeps a write log;
    returns the write's result."""
    out = yield WriteTo(name, layout, redo)
    if layout.write_log:
        yield LogWritten(layout)
    return out


def switch_safe_steps(kind: str, collection_name: str, layout: Layout, n_rows: int) -> Steps:
    """A routed write into the physical collection of the layout stored behind
    ``collection_name`` now, safe across a layout switch (:mod:`.switch`): while a rebuild
    reads the collection the keys are journaled before they are written; if a switch began
    before the stamp is read again after the write, the rows are written again, as an
    upsert, into the layout serving once the switch has ended. Returns the first write's
    result."""
    stamp, layout = yield Writable(collection_name, layout)
    if stamp is None:
        return (yield from _write_to(collection_name, layout))
    for _ in range(3):
        try:
            yield Journal(stamp, layout)
            break
        except Exception:               # the journal went with a finished switch: look again
            stamp, layout = yield Writable(collection_name, layout)
    out = yield from _write_to(stamp.name, layout)
    for _ in range(10):
        after = yield Peek(collection_name, stamp)
        if after == stamp:
            return out
        if after is not None and after.state == REBUILDING and \
                (after.name, after.layout_id) == (stamp.name, stamp.layout_id):
            # a rebuild began reading while the rows were written: journal them now
            # (then look once more: they count if the journal has them before it freezes)
            try:
                yield Journal(after, layout)
                stamp = after
                continue
            except Exception as exc:
                log.debug("journaling after the write failed: %s", exc)
        # a switch began: once it has ended, write the rows again into what serves then
        log.info("a layout switch of %r began during a routed %s; writing its %d rows again "
                 "once it has ended", collection_name, kind, n_rows)
        stamp, layout = yield Writable(collection_name, layout)
        if stamp is None:
            raise WriteError(f"a layout switch of {collection_name!r} began during a routed "
                             f"{kind} and its layout cannot be read now: repeat the {kind}",
                             written=n_rows)
        yield Journal(stamp, layout)
        yield from _write_to(stamp.name, layout, redo=True)
    return out


def _advance(steps: Steps, outcome, failed: bool):
    """The next request (``(True, request)``) or the generator's result (``(False, value)``)."""
    try:
        return True, (steps.throw(outcome) if failed else steps.send(outcome))
    except StopIteration as stop:
        return False, stop.value


def run_steps(steps: Steps, perform: Callable[[Any], Any]):
    """Drive ``steps`` with ``perform(request)`` (synchronous I/O); returns their result."""
    more, request = _advance(steps, None, False)
    while more:
        try:
            outcome, failed = perform(request), False
        except Exception as exc:
            outcome, failed = exc, True
        more, request = _advance(steps, outcome, failed)
    return request


async def arun_steps(steps: Steps, perform: Callable[[Any], Awaitable[Any]]):
    """:func:`run_steps` with an awaited ``perform``."""
    more, request = _advance(steps, None, False)
    while more:
        try:
            outcome, failed = await perform(request), False
        except Exception as exc:
            outcome, failed = exc, True
        more, request = _advance(steps, outcome, failed)
    return request
