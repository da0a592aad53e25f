"""Routed writes with awaited I/O: :mod:`.writes` for :class:`.async_client.AsyncRoutedMilvusClient`.

The decisions are the routing core's (:mod:`.placement`: where each row goes, which old
copies to delete, which questions locate the stored copies); the size bound is kept by the
same :class:`.writes.RoutedWrites` as in the sync client (its reads of the live sizes run on
a worker thread), and so is the layout-switch protocol (:func:`.write_steps.switch_safe_steps`:
stamps and the rebuild journal are read and written on a worker thread). What differs is
only how Milvus is asked: every query, write and delete here is awaited on the async client.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Awaitable, Callable

import numpy as np

from .layout import Layout
from .milvus_io import key_list_literal
from .placement import (KeysQuery, RowInputError, every_partition, guess_partitions,
                        locate_keys_steps, needs_stored_lookup, place_rows, plan_write, prepare_rows,
                        rows_of, stored_partitions_by_cluster)
from .serving import Routing
from .storage import DEFAULT_PARTITION
from .write_steps import (Journal, LogWritten, Peek, Writable, WriteRows, arun_steps,
                          switch_safe_steps, write_steps)
from .writes import RoutedDataError, RoutedWrites, new_tally


class AsyncRoutedWrites:
    """One async client's routed writes.

    ``client`` answers the queries (stored keys; an ``AsyncMilvusClient``); ``writes`` is
    the sync :class:`.writes.RoutedWrites` that keeps the cluster sizes of size-bounded
    layouts; ``in_thread(fn, *args)`` awaits ``fn`` on a worker thread; ``is_lite()`` and
    ``stray_partition(state)`` are coroutines (see :meth:`.writes.RoutedWrites.write`).
    """

    def __init__(self, client, writes: RoutedWrites, *, in_thread: Callable[..., Awaitable],
                 is_lite: Callable[[], Awaitable[bool]],
                 stray_partition: Callable[[Routing], Awaitable[str | None]]):
        self.client = client
        self.writes = writes
        self.in_thread = in_thread
        self.is_lite = is_lite
        self.stray_partition = stray_partition

    async def write(self, kind: str, write, delete, collection_name: str, state: Routing, data,
                    timeout=None, *, upsert=None, **kwargs):
        """:meth:`.writes.RoutedWrites.write` with awaited I/O: the same requests in the same
        order, the same layout-switch protocol (:func:`.write_steps.switch_safe_steps`: the
        stamp reads and the journal run on a worker thread), the same errors, recorded in the
        same metrics. ``write``, ``delete`` and ``upsert`` (a write repeated after a switch
        began) are the async client's own calls."""
        layout = state.layout
        rows = rows_of(data)
        if not rows:
            return await write(collection_name, rows, timeout=timeout, **kwargs)
        tally = new_tally(rows)
        w = self.writes
        last = {"tally": tally}                 # the tally of the latest WriteTo

        async def perform(step):
            if isinstance(step, Writable):
                return await self.in_thread(w.writable, step.name, step.layout)
            if isinstance(step, Journal):
                return await self.in_thread(w.journal, step.stamp, step.layout, rows)
            if isinstance(step, Peek):
                return await self.in_thread(w.peek, step.name, step.before)
            if isinstance(step, LogWritten):
                return await self.in_thread(w.log_written, step.layout, last["tally"])
            target = state if step.layout is state.layout else replace(state, layout=step.layout)
            if step.redo:
                last["tally"] = new_tally([])
                return await self._write("upsert", upsert or write, delete, step.name,
                                         step.layout, rows, target, timeout, last["tally"],
                                         **kwargs)
            last["tally"] = tally
            return await self._write(kind, write, delete, step.name, step.layout, rows, target,
                                     timeout, tally, **kwargs)
        try:
            return await arun_steps(switch_safe_steps(kind, collection_name, layout, len(rows)),
                                    perform)
        finally:
            w.record_write(layout.collection, tally)

    async def _write(self, kind, write, delete, collection_name, layout, rows, state, timeout,
                     tally, **kwargs):
        try:
            rows, vectors = prepare_rows(kind, layout, rows, collection_name)
        except RowInputError as exc:
            raise RoutedDataError(str(exc)) from exc
        tally["rows"] = len(rows)
        old_parts = await self.stored_partitions(state, rows, timeout) \
            if needs_stored_lookup(kind, layout.storage) and not await self.is_lite() else {}
        if self.writes.sizes(layout) is None:
            clusters, sizes = place_rows(layout, vectors), None
        else:       # size bound: the first write reads the live sizes, later ones may schedule a re-read
            clusters, sizes = await self.in_thread(self.writes.place, layout, vectors, tally)
        steps = write_steps(kind, collection_name, layout, plan_write(layout, rows, clusters),
                            clusters, old_parts, tally=tally,
                            landed=sizes.landed if sizes is not None else None)

        async def perform(request):
            if isinstance(request, WriteRows):
                return await write(collection_name, request.rows, timeout=timeout,
                                   partition_name=request.partition_name, **kwargs)
            return await delete(collection_name, filter=request.filter,
                                partition_name=request.partition_name, timeout=timeout)
        return await arun_steps(steps, perform)

    async def stored_partitions(self, state: Routing, rows: list[dict], timeout=None) -> dict:
        """Primary key -> partitions holding a stored row with that key (before an upsert):
        :meth:`.writes.RoutedWrites.stored_partitions` with awaited queries; in partition
        storage located by driving :func:`.placement.locate_keys_steps`."""
        layout = state.layout
        storage, pk = layout.storage, layout.primary_field
        keys = [r[pk] for r in rows if pk in r]
        if not keys:
            return {}
        expr = f"{pk} in {key_list_literal(keys)}"
        if storage.cluster_field is not None:
            found = await self.client.query(layout.collection, filter=expr,
                                            output_fields=[pk, storage.cluster_field],
                                            timeout=timeout, consistency_level="Strong")
            out = stored_partitions_by_cluster(storage, found, pk)
            if found and await self.stray_partition(state):   # _default holds rows written around it
                question = KeysQuery(sorted(out), [DEFAULT_PARTITION])
                for key in await self.keys_in(layout, question, timeout):
                    out[key].add(DEFAULT_PARTITION)
            return out
        found = await self.client.query(layout.collection, filter=expr,
                                        output_fields=[pk, layout.vector_field], timeout=timeout,
                                        consistency_level="Strong")
        if not found:
            return {}
        guesses = guess_partitions(layout, np.asarray([r[layout.vector_field] for r in found],
                                                      dtype=np.float32))
        steps = locate_keys_steps([r[pk] for r in found], guesses, every_partition(storage))
        try:
            question = next(steps)
            while True:
                question = steps.send(await self.keys_in(layout, question, timeout))
        except StopIteration as located:
            return located.value

    async def keys_in(self, layout: Layout, question: KeysQuery, timeout=None) -> set:
        """Which of ``question.keys`` have a row in any of ``question.partitions`` (a Strong query)."""
        pk = layout.primary_field
        rows = await self.client.query(layout.collection,
                                       filter=f"{pk} in {key_list_literal(question.keys)}",
                                       output_fields=[pk], partition_names=list(question.partitions),
                                       timeout=timeout, consistency_level="Strong")
        return {r[pk] for r in rows}
