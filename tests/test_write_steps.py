"""write_steps (sans I/O): the requests of one routed insert/upsert and what a failure
part-way leaves - decided once for the sync and the async client."""
import asyncio

import numpy as np
import pytest

from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.placement import plan_write
from milvus_ltr_router.write_steps import (DeleteKeys, WriteError, WriteRows, arun_steps,
                                           run_steps, write_steps)

N, DIM = 6, 8


def layout():
    centroids = np.eye(N, DIM, dtype=np.float32)
    return Layout(collection="docs", centroids=centroids, partition_names=partition_names_for(N),
                  sizes=np.full(N, 10, np.int64), metric="IP", algorithm="spherical", dim=DIM,
                  layout_id="L1")


def upsert_case():
    """Keys 0..5, key k into cluster k % 3; keys 0 and 4 have a stored copy in partition 5."""
    lay = layout()
    rows = [{"id": k, "vector": lay.centroids[k % 3].tolist()} for k in range(6)]
    clusters = np.array([k % 3 for k in range(6)])
    old = {0: {lay.partition_names[5]}, 4: {lay.partition_names[5]}}
    return lay, rows, clusters, plan_write(lay, rows, clusters), old


class Server:
    """Performs the requests; ``fail_at`` (index of a request) raises there."""

    def __init__(self, fail_at=(), error=ConnectionError("Milvus unreachable")):
        self.requests, self.fail_at, self.error = [], set(fail_at), error

    def __call__(self, request):
        self.requests.append(request)
        if len(self.requests) - 1 in self.fail_at:
            raise self.error
        if isinstance(request, WriteRows):
            return {"upsert_count": len(request.rows), "ids": [r["id"] for r in request.rows],
                    "cost": 1}
        return None


def test_writes_every_partition_then_deletes_the_moved_keys_old_copies():
    lay, rows, clusters, plan, old = upsert_case()
    server, tally, landed = Server(), {}, []
    out = run_steps(write_steps("upsert", "docs", lay, plan, clusters, old, tally=tally,
                                landed=lambda c, w: landed.append(sorted(w))), server)
    writes = [r for r in server.requests if isinstance(r, WriteRows)]
    deletes = [r for r in server.requests if isinstance(r, DeleteKeys)]
    assert [r.partition_name for r in writes] == [lay.partition_names[c] for c in range(3)]
    assert server.requests[:3] == writes                    # deletes only after every write
    assert deletes == [DeleteKeys(lay.partition_names[5], "id in [0, 4]")]
    assert out["upsert_count"] == 6 and out["ids"] == list(range(6)) and out["cost"] == 3
    assert tally == {"written": 6, "moved": 2} and landed == [list(range(6))]


def test_a_failed_first_write_raises_what_pymilvus_raised_and_writes_nothing():
    lay, rows, clusters, plan, old = upsert_case()
    server, landed = Server(fail_at={0}), []
    with pytest.raises(ConnectionError):
        run_steps(write_steps("upsert", "docs", lay, plan, clusters, old,
                              landed=lambda c, w: landed.append(list(w))), server)
    assert len(server.requests) == 1 and landed == [[]]


def test_a_later_failure_cleans_the_written_keys_and_says_what_landed():
    lay, rows, clusters, plan, old = upsert_case()
    server, tally = Server(fail_at={1}), {}
    with pytest.raises(WriteError) as err:
        run_steps(write_steps("upsert", "docs", lay, plan, clusters, old, tally=tally), server)
    # the first partition (cluster 0: keys 0, 3) landed; key 0's old copy is deleted
    assert server.requests[2] == DeleteKeys(lay.partition_names[5], "id in [0]")
    assert len(server.requests) == 3
    assert err.value.written == 2 and err.value.partitions_done == [lay.partition_names[0]]
    assert "after 2 of 6 rows were written" in str(err.value) and tally["written"] == 2
    assert isinstance(err.value.__cause__, ConnectionError)


def test_a_failed_clean_up_is_named_in_the_error():
    lay, rows, clusters, plan, old = upsert_case()
    with pytest.raises(WriteError, match="deleting the old copies of the written keys failed too"):
        run_steps(write_steps("upsert", "docs", lay, plan, clusters, old), Server(fail_at={1, 2}))
    with pytest.raises(WriteError, match="wrote all 6 rows, but deleting the old copies"):
        run_steps(write_steps("upsert", "docs", lay, plan, clusters, old), Server(fail_at={3}))


def test_the_async_driver_performs_the_same_requests():
    lay, rows, clusters, plan, old = upsert_case()
    for fail_at in ((), (1,), (3,)):
        sync_server, async_server = Server(fail_at), Server(fail_at)

        async def perform(request):
            await asyncio.sleep(0)
            return async_server(request)
        outcomes = []
        for run in (lambda: run_steps(write_steps("upsert", "docs", lay, plan, clusters, old),
                                      sync_server),
                    lambda: asyncio.run(arun_steps(write_steps("upsert", "docs", lay, plan,
                                                               clusters, old), perform))):
            try:
                outcomes.append(("ok", dict(run())))
            except WriteError as exc:
                outcomes.append(("error", str(exc)))
        assert outcomes[0] == outcomes[1] and sync_server.requests == async_server.requests
