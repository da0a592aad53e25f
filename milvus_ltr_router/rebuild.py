"""Rebuilding a layout that serves, losing nothing and failing nothing.

:func:`.build.build_layout` comes here when it replaces a laid-out collection that
applications use: ``--overwrite`` of the target, or a new target whose ``--alias`` names a
laid-out collection now. The design:

1. **What is read.** The live laid-out collection, not the source: it holds the build's
   rows plus everything applications wrote through the routed client since (inserts,
   upserts, deletes). ``from_source=True`` (``--from-source``) reads the source instead.
2. **Nothing written meanwhile is lost.** The live collection is stamped ``rebuilding``
   (:mod:`.switch`) with a write journal: routed writers record the keys they write
   there before writing. The new collection is built under another name from a snapshot
   read, and verified (row counts, every row assigned once).
3. **Catch-up under a short freeze.** The live collection is stamped ``frozen`` (routed
   writers wait, searches go on), then the new collection is brought level with it: keys
   only in the live one and journaled keys are copied (read from the live collection
   again, placed in the new clusters), keys only in the new one are deleted. The key sets
   and counts must then be equal (no loss, no duplicate key) or nothing is switched.
4. **An atomic switch.** Aliases move with ``alter_alias`` (atomic in Milvus). With
   ``--overwrite`` of a collection that applications name directly, the new collection
   takes its name by two renames (and its companions'): the only gap in this design, a few
   tens of ms in which a search by that physical name finds no collection (searches
   through an alias never see it). The replaced collection is then dropped (overwrite) or
   stamped ``retired`` and kept (a new target plus alias).
5. Any failure before the switch leaves the live collection serving as it was: its stamp
   is cleared, the journal and the half-built collection dropped.

Routed writers re-read the stamp after each write and write again into the new layout if a
switch began in between (:class:`.writes.RoutedWrites`); searchers notice a new layout
within ``RoutingTable.layout_check_interval`` (1 s) or at once after a routed write met it.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

import numpy as np
from pymilvus import MilvusClient

from .layout import (Layout, LayoutError, drop_layout, laid_out_name, layout_collection_name,
                     moments_collection_name, point_alias, write_log_name)
from .milvus_io import key_list_literal
from .placement import place_rows, plan_write
from .scan import iter_columns
from .storage import CLUSTER_FIELD
from .switch import (REBUILDING, RETIRED, FreezeLease, create_journal, journal_keys,
                     journal_name, read_journal, set_stamp)

log = logging.getLogger(__name__)

KEY_CHUNK = 1000


def live_collection(client: MilvusClient, target: str, alias: str | None,
                    overwrite: bool) -> str | None:
    """The laid-out collection a build of ``target`` replaces (its physical name), or None:
    ``target`` itself with ``overwrite``, else the one ``alias`` names now."""
    if overwrite and client.has_collection(target):
        name = laid_out_name(client, target)
        if name is not None:
            return name
    if alias:
        name = laid_out_name(client, alias)
        if name is not None and name != target:
            return name
    return None


def staging_name(client: MilvusClient, target: str) -> str:
    """Where the new collection is built when ``target`` exists: ``<target>__ltr_next``
    when ``target`` is a collection (renamed to it at the switch), a new generation name
    when ``target`` is an alias (moved to it)."""
    desc = client.describe_collection(target)
    if desc["collection_name"] == target:
        return f"{target}__ltr_next"
    return f"{target}__ltr_g{uuid.uuid4().hex[:8]}"


def aliases_of(client: MilvusClient, name: str) -> list[str]:
    try:
        return list(client.list_aliases(name).get("aliases") or [])
    except Exception as exc:
        log.debug("could not list the aliases of %r: %s", name, exc)
        return []


def replace_layout(client: MilvusClient, *, target: str, build_name: str, live: str | None,
                   alias: str | None, overwrite: bool, build: Callable, key_type,
                   grace: float = 0.5, lease: float = 60.0):
    """Run ``build()`` (a :class:`.build.BuildReport` of a layout written into
    ``build_name``, read from ``live`` when given) and switch applications to it as the
    module docstring says; returns the report with ``report.switch`` (what was done)."""
    journal = None
    if live is not None:
        journal = create_journal(client, live, key_type)
        if not set_stamp(client, live, state=REBUILDING, journal=journal):
            log.warning("%r takes no collection properties: writes during the rebuild are "
                        "caught up by key only", live)
        time.sleep(grace)           # writers that read the stamp just before: their keys too
    switched = False
    freeze = FreezeLease(client, lease)     # a killed rebuild holds writers <= lease seconds
    try:
        report = build()
        layout = report.layout
        freeze.freeze(build_name, layout_id=layout.layout_id)
        caught = {}
        frozen_at = time.perf_counter()
        if live is not None:
            freeze.freeze(live)
            time.sleep(grace)
            caught = catch_up(client, live, layout, journal)
        freeze.check()                      # writers were held all along: safe to switch
        moved = _switch(client, target, build_name, live, alias, overwrite, layout, grace,
                        freeze)
        switched = True
        unfrozen_at = moved.pop("unfrozen_at", frozen_at)
        report.switch = {"live": live, "built_as": build_name, **caught, **moved,
                         "writes_waited_s": unfrozen_at - frozen_at}
    except BaseException as exc:
        if not switched:
            freeze.stop()
            if live is not None:
                set_stamp(client, live, state="", journal="", until="")
            drop_layout(client, build_name)             # new: never a collection in use
            if isinstance(exc, Exception):
                kept = f"{live!r} serves on, untouched" if live else f"{target!r} is untouched"
                raise LayoutError(f"rebuilding {target!r} failed before the switch ({exc}); "
                                  f"{kept}") from exc
        raise
    finally:
        freeze.stop()
        if journal is not None and client.has_collection(journal):
            client.drop_collection(journal)
    return report


def catch_up(client: MilvusClient, live: str, layout: Layout, journal: str | None) -> dict:
    """Bring ``layout``'s collection level with the frozen ``live`` one: copy keys it lacks
    and journaled keys (their rows read from ``live`` now), delete keys ``live`` no longer
    has; then check that both hold the same keys, once each."""
    pk, new = layout.primary_field, layout.collection
    live_keys, new_keys = _keys(client, live, pk), _keys(client, new, pk)
    journaled = read_journal(client, journal) if journal else set()
    copy = (set(live_keys) - set(new_keys)) | (journaled & set(live_keys))
    stale = (set(new_keys) - set(live_keys)) | (journaled & set(new_keys))
    for chunk in _chunks(sorted(stale)):
        client.delete(new, filter=f"{pk} in {key_list_literal(chunk)}")
    for chunk in _chunks(sorted(copy)):
        rows = client.query(live, filter=f"{pk} in {key_list_literal(chunk)}", output_fields=["*"],
                            consistency_level="Strong")
        rows = [{k: v for k, v in r.items() if k != CLUSTER_FIELD} for r in rows]
        if not rows:
            continue
        vectors = np.asarray([r[layout.vector_field] for r in rows], dtype=np.float32)
        plan = plan_write(layout, rows, place_rows(layout, vectors))
        for batch in plan.batches:
            client.insert(new, plan.batch_rows(batch), partition_name=batch.partition_name)
        if layout.write_log:                # written out of cluster order: for the next upkeep
            journal_keys(client, layout.write_log, [r[pk] for r in plan.rows], plan.clusters)
    got = _keys(client, new, pk)
    want = _keys(client, live, pk)
    if len(got) != len(set(got)) or set(got) != set(want):
        raise LayoutError(f"after catching up, {new!r} holds {len(got)} rows "
                          f"({len(got) - len(set(got))} duplicate keys) and {live!r} "
                          f"{len(want)}; {len(set(want) - set(got))} keys missing")
    log.info("caught up %r with %r: %d rows copied (%d journaled keys), %d deleted", new, live,
             len(copy), len(journaled), len(stale))
    return {"copied": len(copy), "journaled": len(journaled), "deleted": len(stale),
            "rows": len(got)}


def _keys(client: MilvusClient, name: str, pk: str) -> list:
    keys: list = []
    for cols in iter_columns(client, name, [pk]):
        keys.extend(np.asarray(cols[pk]).tolist())
    return keys


def _chunks(items: list, size: int = KEY_CHUNK):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _drop_later(client: MilvusClient, name: str, grace: float) -> None:
    """Drop the replaced collection once searches that resolved its name (or an alias)
    before the switch have finished: the proxy may still send them there for a moment."""
    time.sleep(max(3.0, 6 * grace))
    drop_layout(client, name)


def _switch(client: MilvusClient, target: str, build_name: str, live: str | None,
            alias: str | None, overwrite: bool, layout: Layout, grace: float,
            freeze: FreezeLease) -> dict:
    """Applications to ``build_name``: aliases moved, names swapped; the replaced collection
    dropped (overwrite) or retired."""
    moved = []
    old = live if live is not None else (
        client.describe_collection(target)["collection_name"] if build_name != target else None)
    if old is not None and overwrite:                   # every alias of the target follows
        for a in aliases_of(client, old):
            point_alias(client, a, build_name)
            moved.append(a)
    if build_name != target and old == target:          # target is a collection: two renames
        prev = f"{target}__ltr_prev"
        drop_layout(client, prev)
        t0 = time.perf_counter()
        for suffix in _companions(target):
            if client.has_collection(target + suffix):
                client.rename_collection(target + suffix, prev + suffix)
            if client.has_collection(build_name + suffix):
                client.rename_collection(build_name + suffix, target + suffix)
        gap = time.perf_counter() - t0
        layout.collection = target
        freeze.stop()
        set_stamp(client, target, state="", until="")
        unfrozen_at = time.perf_counter()
        _drop_later(client, prev, grace)
        return {"aliases_moved": moved, "renamed": True, "rename_seconds": gap,
                "replaced": "dropped", "unfrozen_at": unfrozen_at}
    if build_name != target:                              # target is an alias: moved above
        if target not in moved:
            point_alias(client, target, build_name)
            moved.append(target)
    if alias and alias not in moved:
        point_alias(client, alias, build_name)
        moved.append(alias)
    freeze.stop()
    set_stamp(client, build_name, state="", until="")
    done = {"aliases_moved": moved, "renamed": False, "unfrozen_at": time.perf_counter()}
    if old is not None and old != build_name:
        if overwrite:
            _drop_later(client, old, grace)
            return {**done, "replaced": "dropped"}
        set_stamp(client, old, state=RETIRED, journal="", successor=build_name, until="")
        return {**done, "replaced": "retired"}
    return {**done, "replaced": None}


def _companions(target: str) -> list[str]:
    """Suffixes of a laid-out collection and its companions, main collection first."""
    return ["", layout_collection_name(target)[len(target):],
            moments_collection_name(target)[len(target):], write_log_name(target)[len(target):]]


__all__ = ["live_collection", "staging_name", "replace_layout", "catch_up", "journal_name"]
