"""AsyncRoutedMilvusClient on milvus-lite: the sync client's answers, under one event loop.

pymilvus's ``AsyncMilvusClient`` works against milvus-lite files (it reaches the same
in-process server as the sync client), so every test here runs the async client and the
sync ``RoutedMilvusClient`` side by side on one file and compares them.
"""
import asyncio
import time

import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import DataNotMatchException, ParamError

from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.milvus_io import release_lite
from milvus_ltr_router.placement import place_rows
from milvus_ltr_router.serving import RoutingTable
from milvus_ltr_router.writer import create_vector_collection

NPROBE = 3


@pytest.fixture(scope="module")
def lite_docs(tmp_path_factory, fixture_data):
    """A milvus-lite file with 'src' (3,000 MiniLM documents, a title each) laid out as 'docs'
    (24 clusters, partition storage), as 'docs_single' (12 clusters, single storage) and as
    'docs_bounded' (8 clusters, partition storage, max_cluster_ratio 1.1)."""
    uri = str(tmp_path_factory.mktemp("async_lite") / "a.db")
    client = MilvusClient(uri)
    docs = fixture_data.docs[:3000]
    create_vector_collection(client, "src", docs, scalars={"title": [f"doc {i}" for i in range(3000)]})
    report = build_layout(client, "src", "docs", n_clusters=24, seed=0)
    build_layout(client, "src", "docs_single", n_clusters=12, seed=0, storage="single")
    build_layout(client, "src", "docs_bounded", n_clusters=8, seed=0, max_cluster_ratio=1.1)
    client.close()
    release_lite(uri)
    yield uri, report.layout
    release_lite(uri)


def clients(uri, tmp_path, **kwargs):
    options = dict(model_dir=str(tmp_path / "models"), nprobe=NPROBE, log_rate=0, **kwargs)
    return RoutedMilvusClient(uri, **options), AsyncRoutedMilvusClient(uri, **options)


def ids(result):
    return [[h["id"] for h in hits] for hits in result]


def comparable(status):
    """router_status without what depends on the client's own traffic or the clock."""
    return {k: v for k, v in status.items() if k not in ("query_log", "batches", "next_check_s")}


@pytest.mark.parametrize("collection", ["docs", "docs_single"])
@pytest.mark.parametrize("batch_planning", [False, True])
def test_async_search_route_and_status_equal_the_sync_clients(lite_docs, fixture_data, tmp_path,
                                                              collection, batch_planning):
    uri, _ = lite_docs
    queries = fixture_data.queries[:40]
    sync, client = clients(uri, tmp_path, batch_planning=batch_planning)

    async def main():
        try:
            status = await client.router_status(collection)
            assert comparable(status) == comparable(sync.router_status(collection))
            assert status["batches"]["searches"] == 0 and "extra_clusters" not in status["batches"]
            assert await client.route(collection, queries) == sync.route(collection, queries)
            # a batch (one routed search, several requests sent concurrently), numpy input too
            got = await client.search(collection, data=queries, limit=5, output_fields=["title"],
                                      filter="id >= 0")
            want = sync.search(collection, data=queries.tolist(), limit=5, output_fields=["title"],
                               filter="id >= 0")
            assert ids(got) == ids(want)
            assert got[3][0]["entity"]["title"] == want[3][0]["entity"]["title"]
            assert client.last_plan == sync.last_plan
            # single queries, nprobe and an uncalibrated recall_target served at the fixed nprobe
            for q in queries[:5]:
                for kw in ({}, {"nprobe": 1}, {"recall_target": 0.9}):
                    a = await client.search(collection, data=[q.tolist()], limit=10, **kw)
                    assert ids(a) == ids(sync.search(collection, data=[q.tolist()], limit=10, **kw))
            status = await client.router_status(collection)
            assert status["batches"]["searches"] == 16 and status["batches"]["queries"] == 55
            assert status["batches"]["batch_planning"] is batch_planning
            assert (await client.layout(collection)).layout_id == sync.layout(collection).layout_id
            assert (await client.router(collection)).kind == sync.router(collection).kind
        finally:
            await client.close()
            sync.close()
    asyncio.run(main())


def test_two_hundred_concurrent_searches_under_one_event_loop(lite_docs, fixture_data, tmp_path):
    uri, _ = lite_docs
    many = fixture_data.queries[:300]
    queries = many[:200]
    sync, client = clients(uri, tmp_path)
    want_large = ids(sync.search("docs", data=many.tolist(), limit=10))
    want = [ids(sync.search("docs", data=[q.tolist()], limit=10))[0] for q in queries]
    want_batch = ids(sync.search("docs", data=queries[:64].tolist(), limit=10))

    async def main():
        try:
            singles = [client.search("docs", data=[q.tolist()], limit=10) for q in queries]
            batches = [client.search("docs", data=queries[:64], limit=10) for _ in range(4)]
            large = client.search("docs", data=many, limit=10)  # > INLINE_ROUTE_QUERIES: on a thread
            results = await asyncio.gather(*singles, *batches, large)
            assert [ids(r)[0] for r in results[:200]] == want
            assert all(ids(r) == want_batch for r in results[200:204])
            assert ids(results[204]) == want_large
            totals = (await client.router_status("docs"))["batches"]
            assert totals["searches"] == 205 and totals["queries"] == 200 + 4 * 64 + 300
        finally:
            await client.close()
            sync.close()
    asyncio.run(main())


def test_the_loop_never_waits_for_layout_router_or_metadata_reads(lite_docs, fixture_data, tmp_path,
                                                                  monkeypatch):
    """Reading a collection's layout and router (slowed to 0.5 s here) runs on a worker thread,
    once for all the searches that wait for it, while the event loop keeps serving."""
    uri, _ = lite_docs
    reads = []
    refresh = RoutingTable._refresh

    def slow_refresh(self, collection, old):
        reads.append(collection)
        time.sleep(0.5)
        return refresh(self, collection, old)
    monkeypatch.setattr(RoutingTable, "_refresh", slow_refresh)
    queries = fixture_data.queries[:50]
    client = AsyncRoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), nprobe=NPROBE, log_rate=0)

    async def main():
        gaps, stop = [], asyncio.Event()

        async def heartbeat():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        beat = asyncio.create_task(heartbeat())
        try:
            await asyncio.sleep(0.05)
            results = await asyncio.gather(*[client.search("docs", data=[q.tolist()], limit=5)
                                             for q in queries])
            assert all(len(r[0]) == 5 for r in results)
        finally:
            stop.set()
            await beat
            await client.close()
        return gaps
    gaps = asyncio.run(main())
    assert reads == ["docs"]                  # one read, shared by the 50 searches
    assert max(gaps) < 0.3, max(gaps)         # the loop ran on while the 0.5 s read went on


def test_routed_writes_land_where_the_sync_client_puts_them(lite_docs, fixture_data, tmp_path):
    uri, layout = lite_docs
    new = fixture_data.docs[5000:5020]
    sync, client = clients(uri, tmp_path)
    want = [layout.partition_names[c] for c in place_rows(layout, new)]   # the sync path's decision

    async def main():
        try:
            rows = [{"id": 200_000 + i, "vector": v.tolist(), "title": "async"} for i, v in enumerate(new)]
            out = await client.insert("docs", rows[:10])
            assert out["insert_count"] == 10 and out["ids"] == list(range(200_000, 200_010))
            out = await client.upsert("docs", rows[10:])
            assert out["upsert_count"] == 10
            # a key upserted with another cluster's vector moves and keeps one row
            elsewhere = next(j for j, p in enumerate(want) if p != want[0])
            moved = {"id": 200_000, "vector": new[elsewhere].tolist(), "title": "moved"}
            await client.upsert("docs", moved)
            return await client.query("docs", filter="id >= 200000", output_fields=["title"],
                                      consistency_level="Strong")
        finally:
            await client.close()
    try:
        rows = asyncio.run(main())
        assert len(rows) == 20 and {r["id"]: r["title"] for r in rows}[200_000] == "moved"
        for i, part in enumerate(want[1:], start=1):
            got = sync.query("docs", filter=f"id == {200_000 + i}", output_fields=["id"],
                             partition_names=[part])
            assert len(got) == 1, (i, part)
        # what the sync client writes goes to the same partitions
        sync.insert("docs", [{"id": 300_000 + i, "vector": v.tolist(), "title": "sync"}
                             for i, v in enumerate(new[1:4])])
        for i, part in enumerate(want[1:4]):
            assert len(sync.query("docs", filter=f"id == {300_000 + i}", output_fields=["id"],
                                  partition_names=[part])) == 1
    finally:
        sync.delete("docs", filter="id >= 200000")
        sync.close()


def test_routed_writes_keep_the_size_bound_as_the_sync_client(lite_docs, fixture_data, tmp_path):
    """In a size-bounded layout the first routed write reads the live sizes (on a worker
    thread) and places rows as placement.ClusterSizes decides from them; router_status's
    balance then agrees with a sync client that reads the same sizes."""
    from milvus_ltr_router.placement import ClusterSizes
    uri, _ = lite_docs
    sync, client = clients(uri, tmp_path)
    layout = sync.layout("docs_bounded")
    new = fixture_data.docs[6000:6300]
    sizes = ClusterSizes(layout, layout.extra["max_cluster_ratio"])
    sizes.read = np.asarray(layout.sizes)          # what the first read finds: nothing written yet
    want = [layout.partition_names[c] for c in sizes.place(layout, new)]
    assert want != [layout.partition_names[c] for c in place_rows(layout, new)]   # the bound acts

    async def main():
        try:
            await client.insert("docs_bounded", [{"id": 500_000 + i, "vector": v.tolist(), "title": "b"}
                                                 for i, v in enumerate(new)])
            return (await client.router_status("docs_bounded"))["balance"]
        finally:
            await client.close()
    try:
        balance = asyncio.run(main())
        assert balance["rows"] == 3300 and balance["sizes_age_s"] is not None
        for part in sorted(set(want)):
            got = sync.query("docs_bounded", filter="id >= 500000", output_fields=["id"],
                             partition_names=[part], consistency_level="Strong")
            assert sorted(r["id"] - 500_000 for r in got) == [i for i, p in enumerate(want) if p == part]
        theirs = sync.reload_router("docs_bounded")["balance"]
        assert {k: theirs[k] for k in ("max_cluster_ratio", "capacity", "rows")} == \
            {k: balance[k] for k in ("max_cluster_ratio", "capacity", "rows")}
    finally:
        sync.delete("docs_bounded", filter="id >= 500000")
        sync.close()


def test_routed_writes_are_recorded_in_the_metrics_as_the_sync_clients(lite_docs, fixture_data,
                                                                      tmp_path):
    """The async client's routed writes count rows written, spilled by the size bound and
    moved keys in the same metrics as the sync client's (:meth:`.writes.RoutedWrites.record_write`);
    a write that fails counts its rows as failed."""
    prom = pytest.importorskip("prometheus_client")
    from milvus_ltr_router.placement import ClusterSizes
    uri, _ = lite_docs
    registry = prom.CollectorRegistry()
    sync, client = clients(uri, tmp_path, metrics=registry)
    layout = sync.layout("docs_bounded")
    new = fixture_data.docs[6400:6600]
    sizes = ClusterSizes(layout, layout.extra["max_cluster_ratio"])
    sizes.read = np.asarray(layout.sizes)
    spilled = int((sizes.place(layout, new) != place_rows(layout, new)).sum())
    assert spilled > 0

    def get(name):
        return registry.get_sample_value(f"milvus_ltr_router_{name}", {"collection": "docs_bounded"})

    async def main():
        try:
            await client.insert("docs_bounded", [{"id": 600_000 + i, "vector": v.tolist(),
                                                  "title": "m"} for i, v in enumerate(new)])
            with pytest.raises(DataNotMatchException):      # a row without a vector: nothing written
                await client.insert("docs_bounded", [{"id": 700_000, "title": "no vector"}])
        finally:
            await client.close()
    try:
        asyncio.run(main())
        assert get("write_rows_total") == 200
        assert get("write_spilled_rows_total") == spilled
        assert get("write_failed_rows_total") == 1     # (milvus-lite's upsert moves keys itself)
    finally:
        sync.delete("docs_bounded", filter="id >= 600000")
        sync.close()


def test_stored_copy_lookup_asks_what_the_sync_client_asks(lite_docs, fixture_data, tmp_path):
    """The upsert's lookup of stored copies (locate_keys_steps driven with awaits) finds what
    the sync RoutedWrites finds, rows outside their cluster and duplicates included."""
    uri, layout = lite_docs
    sync, client = clients(uri, tmp_path)
    docs = fixture_data.docs
    parts = layout.partition_names
    stray = [{"id": 400_000 + i, "vector": docs[7000 + i].tolist(), "title": "x"} for i in range(6)]
    for i, row in enumerate(stray):                 # written around the routing, anywhere
        MilvusClient.insert(sync, "docs", [row], partition_name=parts[(5 * i) % len(parts)])
    rows = [{"id": k, "vector": docs[k % 20000].tolist()} for k in (3, 17, 2999, 123_456)] + \
           [{"id": r["id"], "vector": docs[0].tolist()} for r in stray]
    state = sync._routing.state("docs")
    want = sync._writes.stored_partitions(state.layout, rows, None,
                                          lambda: sync._routing.stray_partition(state))

    async def main():
        try:
            return await client._async_writes.stored_partitions(await client._state("docs"), rows)
        finally:
            await client.close()
    try:
        got = asyncio.run(main())
        assert got == want
        assert got[400_001] == {parts[5]} and 123_456 not in got
    finally:
        sync.delete("docs", filter="id >= 400000")
        sync.close()


def test_errors_and_pass_through_as_the_sync_client(lite_docs, fixture_data, tmp_path):
    uri, _ = lite_docs
    sync, client = clients(uri, tmp_path)
    q = fixture_data.queries[0]

    async def main():
        try:
            with pytest.raises(ParamError, match=r"shape \(1, 7\) does not match"):
                await client.search("docs", data=[[0.0] * 7], limit=1)
            with pytest.raises(DataNotMatchException, match="no vector field 'vector'"):
                await client.insert("docs", [{"id": 1, "title": "no vector"}])
            with pytest.raises(ValueError, match="has no layout"):
                await client.route("src", [q.tolist()])
            assert (await client.router_status("src"))["mode"] == "none"
            assert await client.layout("src") is None
            # no layout, named partitions, search by another field: pymilvus's own search
            await client.load_collection("src")
            plain = await client.search("src", data=[q.tolist()], limit=3)
            assert ids(plain) == ids(MilvusClient.search(sync, "src", data=[q.tolist()], limit=3))
            part = (await client.layout("docs")).partition_names[0]
            named = await client.search("docs", data=[q.tolist()], limit=3, partition_names=[part])
            assert ids(named) == ids(MilvusClient.search(sync, "docs", data=[q.tolist()], limit=3,
                                                         partition_names=[part]))
            status = await client.reload_router("docs")
            assert comparable(status) == comparable(sync.reload_router("docs"))
        finally:
            await client.close()
            sync.close()
    asyncio.run(main())
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        AsyncRoutedMilvusClient(uri, nprobe=0)
    with pytest.raises(ValueError, match="log_rate"):
        AsyncRoutedMilvusClient(uri, log_rate=2)


def test_query_log_and_context_manager(lite_docs, fixture_data, tmp_path):
    uri, _ = lite_docs
    queries = fixture_data.queries[:30]

    async def main():
        async with AsyncRoutedMilvusClient(uri, model_dir=str(tmp_path / "m"), log_rate=1.0,
                                           nprobe=NPROBE) as client:
            await asyncio.gather(*[client.search("docs", data=[q.tolist()], limit=3) for q in queries])
            await client.search("docs", data=queries[:5], limit=3)
            assert await client.flush_query_log()
            return (await client.router_status("docs"))["query_log"]
    log = asyncio.run(main())
    assert log["written"] == 35 and log["failed"] == 0
    plain = MilvusClient(uri)
    try:
        from milvus_ltr_router.querylog import log_size
        assert log_size(plain, "docs") == 35
        plain.drop_collection("docs__ltr_querylog")
    finally:
        plain.close()


def _failing_once(original, message):
    """``original`` (a client class's search) failing its first call with ``message``."""
    from pymilvus.exceptions import MilvusException
    calls = []

    def search(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MilvusException(message=message)
        return original(self, *args, **kwargs)

    async def asearch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MilvusException(message=message)
        return await original(self, *args, **kwargs)

    return (asearch if asyncio.iscoroutinefunction(original) else search), calls


ALIAS_MISS = "can't find collection name default:docs_app"


def test_the_alias_cache_transient_of_a_freeze_is_sent_again_once(lite_docs, fixture_data, tmp_path,
                                                                    monkeypatch):
    """Milvus 2.3.5 can fail one search through an alias while a freeze alters the collection's
    properties: both clients send that request again once; other failures are raised at once."""
    from pymilvus import AsyncMilvusClient
    from pymilvus.exceptions import MilvusException
    uri, _ = lite_docs
    queries = fixture_data.queries[:1]
    sync, aclient = clients(uri, tmp_path)
    try:
        expect = ids(sync.search("docs", data=queries, limit=5))
        fake, calls = _failing_once(MilvusClient.search, ALIAS_MISS)
        monkeypatch.setattr(MilvusClient, "search", fake)
        assert ids(sync.search("docs", data=queries, limit=5)) == expect and len(calls) == 2
        monkeypatch.undo()
        fake, calls = _failing_once(MilvusClient.search, "collection not loaded")
        monkeypatch.setattr(MilvusClient, "search", fake)
        with pytest.raises(MilvusException, match="not loaded"):
            sync.search("docs", data=queries, limit=5)
        assert len(calls) == 1
        monkeypatch.undo()

        async def run():
            fake, calls = _failing_once(AsyncMilvusClient.search, ALIAS_MISS)
            monkeypatch.setattr(AsyncMilvusClient, "search", fake)
            got = ids(await aclient.search("docs", data=queries, limit=5))
            assert got == expect and len(calls) == 2
            monkeypatch.undo()
            fake, calls = _failing_once(AsyncMilvusClient.search, "collection not loaded")
            monkeypatch.setattr(AsyncMilvusClient, "search", fake)
            with pytest.raises(MilvusException, match="not loaded"):
                await aclient.search("docs", data=queries, limit=5)
            assert len(calls) == 1
            monkeypatch.undo()
            await aclient.close()
        asyncio.run(run())
    finally:
        sync.close()
