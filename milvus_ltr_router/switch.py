"""Layout switches that lose nothing: the stamp each laid-out collection carries, and the
write-side protocol a rebuild (:mod:`.rebuild`) relies on.

Every laid-out collection carries collection properties (``describe_collection``: one
metadata call, served from the proxy's cache, that also resolves an alias):

- ``ltr.layout_id``: the id of the layout stored in it (set once the build is verified);
- ``ltr.switch``: ``""`` (serving), ``"rebuilding"`` (a rebuild is reading it: routed
  writers record the keys they write in ``ltr.journal``, a small collection, before
  writing), ``"frozen"`` (a rebuild is catching up and switching: routed writers wait) or
  ``"retired"`` (replaced by ``ltr.successor``; nothing should write here any more);
- ``ltr.upkeep``: a counter :mod:`.maintain` bumps each time it freezes the collection to
  rewrite rows in place, and ``ltr.frozen_until``: the wall-clock time (epoch seconds) a
  freeze lasts at most - a freeze left behind by a killed process expires on its own.

A routed write (:class:`.writes.RoutedWrites`) reads the stamp before it writes (a new
layout behind an alias or a rebuilt name is read at once, and the write goes to the
physical collection of the layout that placed its rows) and once more after: if a switch
began in between, it waits for the switch to end and writes its rows again, as an upsert,
into the layout then serving. So no acknowledged write is lost and none carries the
cluster id of a layout it does not land in. The stamp is also the routing table's cheap
layout check (:mod:`.serving`).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
from pymilvus import DataType, MilvusClient

from .errors import OperationalError

log = logging.getLogger(__name__)

LAYOUT_ID = "ltr.layout_id"
SWITCH = "ltr.switch"
JOURNAL = "ltr.journal"
SUCCESSOR = "ltr.successor"
UPKEEP = "ltr.upkeep"
FROZEN_UNTIL = "ltr.frozen_until"
JOURNAL_SUFFIX = "__ltr_journal"
REBUILDING, FROZEN, RETIRED = "rebuilding", "frozen", "retired"


class SwitchTimeout(OperationalError):
    """A routed write waited longer than its limit for a layout switch to end."""


@dataclass(frozen=True)
class Stamp:
    """What one ``describe_collection`` says about a laid-out collection."""
    name: str                   # the physical collection (aliases resolved)
    layout_id: str | None       # None: not stamped (a layout built before stamps, or none)
    state: str = ""
    journal: str = ""
    successor: str = ""
    upkeep: str = ""            # bumped by each upkeep freeze: a write spanning one is redone
    until: str = ""             # a freeze with a lease: writable again after this epoch time

    @property
    def writable(self) -> bool:
        return self.state != FROZEN or self.expired()

    def expired(self, now: float | None = None) -> bool:
        """A freeze whose lease has run out (its holder died or stalled)."""
        try:
            until = float(self.until) if self.until else 0.0
        except ValueError:
            return False
        return until > 0 and (time.time() if now is None else now) > until


def collection_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says a collection does not exist (dropped, or between the two renames
    of a swap) rather than that Milvus failed."""
    text = str(exc).lower()
    return "not found" in text or "not exist" in text


# Milvus 2.3.5's proxy can miss an alias in its meta cache for a moment while a collection's
# properties are altered (a freeze set or cleared): a search through the alias then fails once
# with "can't find collection name default:<alias>" and succeeds when sent again.
ALIAS_RETRY_PAUSE = 0.05


def alias_cache_miss(exc: BaseException) -> bool:
    """Whether ``exc`` is the transient "can't find collection" of a search through an alias."""
    return "can't find collection" in str(exc).lower()


def retrying_alias_miss(run, pause: float = ALIAS_RETRY_PAUSE):
    """``run`` (a search request) sent once more, after ``pause`` s, when it fails with
    :func:`alias_cache_miss`; any other failure, or a second miss, is raised."""
    def attempt(request):
        try:
            return run(request)
        except Exception as exc:
            if not alias_cache_miss(exc):
                raise
            log.info("search failed with %r; sending it again once", str(exc)[:200])
            time.sleep(pause)
            return run(request)
    return attempt


def retrying_alias_miss_async(run, pause: float = ALIAS_RETRY_PAUSE):
    """:func:`retrying_alias_miss` for a ``run`` that returns a coroutine."""

    async def attempt(request):
        try:
            return await run(request)
        except Exception as exc:
            if not alias_cache_miss(exc):
                raise
            log.info("search failed with %r; sending it again once", str(exc)[:200])
            await asyncio.sleep(pause)
            return await run(request)
    return attempt


def read_stamp(client: MilvusClient, collection: str) -> Stamp:
    """The stamp of ``collection`` (or of the collection an alias names): one metadata call."""
    desc = client.describe_collection(collection)
    props = desc.get("properties") or {}
    return Stamp(desc["collection_name"], props.get(LAYOUT_ID) or None, props.get(SWITCH, ""),
                 props.get(JOURNAL, ""), props.get(SUCCESSOR, ""), props.get(UPKEEP, ""),
                 props.get(FROZEN_UNTIL, ""))


def set_stamp(client: MilvusClient, name: str, **values: str) -> bool:
    """Set collection properties of ``name`` (keyword ``layout_id``, ``state``, ``journal``,
    ``successor``, ``upkeep``, ``until``); False where the backend has no collection
    properties (milvus-lite)."""
    keys = {"layout_id": LAYOUT_ID, "state": SWITCH, "journal": JOURNAL, "successor": SUCCESSOR,
            "upkeep": UPKEEP, "until": FROZEN_UNTIL}
    try:
        client.alter_collection_properties(name, {keys[k]: str(v) for k, v in values.items()})
        return True
    except Exception as exc:
        log.debug("could not set the properties of %r: %s", name, exc)
        return False


# --------------------------------------------------------------------------- key logs
# Two small collections record written keys: a rebuild's journal (the keys written while it
# reads) and a layout's write log (the keys written since its last upkeep, :mod:`.maintain`).
# One row per recorded key (an auto-id ``seq``, the key, and the 2-d vector Milvus 2.3 needs).

def journal_name(collection: str) -> str:
    return f"{collection}{JOURNAL_SUFFIX}"


def create_key_log(client: MilvusClient, name: str, key_type, clusters: bool = False) -> str:
    """An empty key log ``name`` (replacing any) for keys of ``key_type`` (INT64/VARCHAR),
    with each key's cluster id where ``clusters`` (a layout's write log)."""
    if client.has_collection(name):
        client.drop_collection(name)
    schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    schema.add_field("seq", DataType.INT64, is_primary=True)
    if key_type == DataType.VARCHAR:
        schema.add_field("key", DataType.VARCHAR, max_length=65535)
    else:
        schema.add_field("key", DataType.INT64)
    if clusters:
        schema.add_field("cluster", DataType.INT64)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)         # Milvus 2.3 needs a vector field
    index = client.prepare_index_params()
    index.add_index(field_name="v", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index)
    client.load_collection(name)
    return name


def create_journal(client: MilvusClient, collection: str, key_type) -> str:
    """An empty journal for the keys written into ``collection`` during its rebuild."""
    return create_key_log(client, journal_name(collection), key_type)


def journal_keys(client: MilvusClient, journal: str, keys: list, clusters=None) -> None:
    """Record ``keys`` as written in the key log ``journal`` (a rebuild's journal: before
    they are written, an intent), with their ``clusters`` in a write log."""
    if not len(keys):
        return
    rows = [{"key": k.item() if isinstance(k, np.generic) else k, "v": [0.0, 0.0]} for k in keys]
    if clusters is not None:
        for r, c in zip(rows, clusters):
            r["cluster"] = int(c)
    client.insert(journal, rows)


def read_entries(client: MilvusClient, log_name: str, page: int = 16384,
                 clusters: bool = False) -> tuple:
    """Every entry of a key log, as ``(seqs, keys)`` in seq order, or ``(seqs, keys,
    clusters)`` with ``clusters`` (a write log's) - Strong: every key recorded before the
    call. Pages of ``page`` entries by ascending seq (a query with a limit returns the
    lowest keys); a short page ends the read, so entries that writers keep adding meanwhile
    do not keep it going."""
    seqs: list = []
    keys: list = []
    cids: list = []
    fields = ["seq", "key"] + (["cluster"] if clusters else [])
    last = -1                                   # auto ids are positive
    while True:
        rows = client.query(log_name, filter=f"seq > {last}", output_fields=fields,
                            limit=page, consistency_level="Strong")
        if not rows:
            break
        rows.sort(key=lambda r: r["seq"])
        seqs.extend(r["seq"] for r in rows)
        keys.extend(r["key"] for r in rows)
        if clusters:
            cids.extend(r["cluster"] for r in rows)
        last = rows[-1]["seq"]
        if len(rows) < page:
            break
    return (seqs, keys, cids) if clusters else (seqs, keys)


def delete_entries(client: MilvusClient, log_name: str, seqs: list, chunk: int = 4096) -> None:
    """Delete the entries ``seqs`` of a key log (those an upkeep has dealt with)."""
    for i in range(0, len(seqs), chunk):
        client.delete(log_name, filter=f"seq in {list(map(int, seqs[i:i + chunk]))}")


def read_journal(client: MilvusClient, journal: str) -> set:
    """Every key recorded in ``journal`` (Strong: every recorded key)."""
    return set(read_entries(client, journal)[1])


# --------------------------------------------------------------------------- freezes with a lease
class LeaseLapsed(OperationalError):
    """A freeze's lease ran out before its holder finished: writers may have written."""


class FreezeLease:
    """Freezes that end on their own if their holder dies: each frozen collection's
    ``ltr.frozen_until`` is set ``lease`` seconds ahead and renewed by a background thread
    every quarter lease while held. Routed writers treat a freeze past its time as over
    (:attr:`Stamp.writable`), so a killed rebuild or upkeep holds them at most ``lease``
    seconds. :meth:`check` before acting on the freeze (a switch): it raises if a renewal
    failed long enough for the lease to have lapsed. Clocks of the hosts involved must agree
    to well within ``lease`` (NTP)."""

    def __init__(self, client: MilvusClient, lease: float = 60.0):
        self.client, self.lease = client, float(lease)
        self._names: list[str] = []
        self._ok_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def until(self) -> str:
        return f"{time.time() + self.lease:.3f}"

    def freeze(self, name: str, **values: str) -> bool:
        """Stamp ``name`` frozen (plus ``values``) under this lease and keep renewing it."""
        if not self._names:
            self._ok_at = time.time()
        ok = set_stamp(self.client, name, state=FROZEN, until=self.until(), **values)
        if ok and name not in self._names:
            self._names.append(name)
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew, daemon=True,
                                                name="ltr-freeze-lease")
                self._thread.start()
        return ok

    def release(self, name: str) -> None:
        """Stop renewing ``name`` (its stamp is the caller's to clear)."""
        if name in self._names:
            self._names.remove(name)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 4):
            ok = True
            for name in list(self._names):
                try:
                    self.client.alter_collection_properties(name, {FROZEN_UNTIL: self.until()})
                except Exception as exc:        # renamed or dropped by the switch: fine
                    if not collection_missing(exc):
                        ok = False
                        log.warning("renewing the freeze of %r failed: %s", name, exc)
            if ok:
                self._ok_at = time.time()

    def check(self) -> None:
        """Raise :class:`LeaseLapsed` if the lease may have run out since the last renewal."""
        if time.time() > self._ok_at + self.lease * 0.8:
            raise LeaseLapsed(f"the freeze's lease ({self.lease:.0f} s) was not renewed since "
                              f"{time.time() - self._ok_at:.0f} s: writers may have written; "
                              f"nothing was switched")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._names.clear()


# --------------------------------------------------------------------------- waiting for a switch
def wait_writable(client: MilvusClient, collection: str, timeout: float = 300.0,
                  poll: float = 0.05) -> Stamp:
    """The stamp of ``collection`` once it can be written (no switch under way). Between
    the two renames of a swap the name may not exist for a moment: that is waited out too."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            stamp = read_stamp(client, collection)
            if stamp.writable:
                return stamp
            last = f"{stamp.name!r} is {stamp.state}"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise SwitchTimeout(f"{collection!r} was not writable within {timeout:.0f} s (a layout "
                                f"switch under way? last: {last})")
        time.sleep(poll)
        poll = min(poll * 1.5, 0.25)


# --------------------------------------------------------------------------- telling searchers
_TABLES: dict[int, "weakref.ref"] = {}
_TABLES_LOCK = threading.Lock()


def register_table(client, table) -> None:
    """Tie a routing table to its client, so that a writer sharing that client can tell
    the table at once when it meets a new layout (:func:`layout_changed`)."""
    with _TABLES_LOCK:
        _TABLES[id(client)] = weakref.ref(table)


def layout_changed(client, collection: str) -> None:
    """The layout behind ``collection`` changed: the routing table of ``client`` (if any)
    reads it again at its next use."""
    with _TABLES_LOCK:
        ref = _TABLES.get(id(client))
    table = ref() if ref is not None else None
    if table is not None:
        try:
            table.forget(collection)
        except Exception as exc:        # never fail a write on it
            log.debug("telling the routing table failed: %s", exc)
