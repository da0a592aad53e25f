"""AsyncRoutedMilvusClient on a real Milvus server (the embedded Milvus 2.3.5 by default).

pymilvus's ``AsyncMilvusClient`` works against Milvus 2.3.5; the async routed client is
compared with the sync ``RoutedMilvusClient`` on the same collections: the session's
WordNet layout (64 clusters, ``single`` storage with a cluster-id filter on servers) for
searches, and small partition / grouped layouts for routed writes, where an upsert that
moves a key must find and delete its old copy (servers upsert within one partition).
"""
import asyncio
import uuid

import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.layout import cluster_of, drop_layout
from milvus_ltr_router.writer import create_vector_collection

NPROBE = 2


def ids(result):
    return [[h["id"] for h in hits] for hits in result]


def comparable(status):
    return {k: v for k, v in status.items() if k not in ("query_log", "batches", "next_check_s")}


def test_async_searches_equal_the_sync_clients_under_200_concurrent_requests(
        milvus_server, wordnet_layout, fixture_data, tmp_path):
    collection = wordnet_layout.layout.collection
    queries = fixture_data.queries[:200]
    options = dict(model_dir=str(tmp_path / "models"), nprobe=NPROBE, log_rate=0)
    sync = RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token, **options)
    want = [ids(sync.search(collection, data=[q.tolist()], limit=10))[0] for q in queries]
    want_batch = ids(sync.search(collection, data=queries[:50].tolist(), limit=10, filter="grp != 3",
                                 output_fields=["title"]))

    async def main():
        async with AsyncRoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                                           **options) as client:
            status = await client.router_status(collection)
            assert comparable(status) == comparable(sync.router_status(collection))
            assert status["storage"]["mode"] == wordnet_layout.layout.storage.mode
            assert await client.route(collection, queries) == sync.route(collection, queries)
            results = await asyncio.gather(
                *[client.search(collection, data=[q.tolist()], limit=10) for q in queries],
                *[client.search(collection, data=queries[:50], limit=10, filter="grp != 3",
                                output_fields=["title"]) for _ in range(4)])
            assert [ids(r)[0] for r in results[:200]] == want
            for r in results[200:]:
                assert ids(r) == want_batch
                assert all(h["entity"]["title"].startswith("gloss ") for h in r[0])
            totals = (await client.router_status(collection))["batches"]
            assert totals["searches"] == 204 and totals["queries"] == 400
    try:
        asyncio.run(main())
    finally:
        sync.close()


@pytest.mark.parametrize("storage", ["partition", "grouped"])
def test_async_routed_writes_on_a_server(milvus_uri, fixture_data, tmp_path, storage):
    """Inserts land in the cluster the sync client picks; an upsert moving keys to other
    clusters (its stored copies located with awaited queries) leaves one row per key, and
    the lookup finds what the sync client's finds."""
    docs = fixture_data.docs[:800]
    plain = MilvusClient(uri=milvus_uri)
    tag = uuid.uuid4().hex[:6]
    src, target = f"async_src_{tag}", f"async_ivf_{tag}"
    create_vector_collection(plain, src, docs)
    plain.load_collection(src)
    layout = build_layout(plain, src, target, n_clusters=6, storage=storage, groups=3, seed=0).layout
    options = dict(model_dir=str(tmp_path / "m"), log_rate=0)
    sync = RoutedMilvusClient(uri=milvus_uri, **options)
    new = fixture_data.docs[9000:9030]
    clusters = cluster_of(layout, new)
    storage_of = layout.storage

    def where(key: int) -> set:
        """The partitions holding a row of ``key``."""
        return {p for p in sorted(set(storage_of.partitions) | {"_default"})
                if plain.query(target, filter=f"id == {key}", output_fields=["id"],
                               partition_names=[p], consistency_level="Strong")}

    async def main():
        async with AsyncRoutedMilvusClient(uri=milvus_uri, **options) as client:
            out = await client.insert(target, [{"id": 1_000_000 + i, "vector": v.tolist()}
                                               for i, v in enumerate(new)])
            assert out["insert_count"] == 30
            # move the first 10 keys into the clusters of keys 10..19 (several partitions)
            moved = [{"id": 1_000_000 + i, "vector": new[10 + i].tolist()} for i in range(10)]
            state = await client._state(target)
            lookup = await client._async_writes.stored_partitions(state, moved)
            sync_state = sync._routing.state(target)
            assert lookup == sync._writes.stored_partitions(
                sync_state.layout, moved, None, lambda: sync._routing.stray_partition(sync_state))
            out = await client.upsert(target, moved)
            assert out["upsert_count"] == 10
            return await client.router_status(target)
    try:
        status = asyncio.run(main())
        assert comparable(status) == comparable(sync.router_status(target))
        for i in range(30):
            c = clusters[10 + i] if i < 10 else clusters[i]
            assert where(1_000_000 + i) == {storage_of.write_partition(int(c))}, i
        rows = plain.query(target, filter="id >= 1000000", output_fields=["id"],
                           consistency_level="Strong")
        assert sorted(r["id"] for r in rows) == list(range(1_000_000, 1_000_030))
        if storage == "grouped":
            got = plain.query(target, filter="id >= 1000000",
                              output_fields=[storage_of.cluster_field], consistency_level="Strong")
            want = {1_000_000 + i: int(clusters[10 + i] if i < 10 else clusters[i]) for i in range(30)}
            assert {r["id"]: r[storage_of.cluster_field] for r in got} == want
    finally:
        sync.close()
        drop_layout(plain, target)
        plain.drop_collection(src)
        plain.close()
