"""Issue 23 items 0 and 4 without a server: the keyed k-means sample, and on milvus-lite
the rebuild's read-out, the layout stamp and the routed writer's switch protocol."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.build import build_layout
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.keyed_sampling import key_hashes, keyed_sample
from milvus_ltr_router.layout import cluster_of, point_alias, read_layout
from milvus_ltr_router.switch import FROZEN, RETIRED, read_stamp, set_stamp
from milvus_ltr_router.writer import create_vector_collection


# --------------------------------------------------------------------------- keyed sample
def test_keyed_sample_does_not_depend_on_read_order():
    rng = np.random.default_rng(0)
    keys = np.arange(5000, dtype=np.int64) * 7 + 3
    vecs = rng.normal(size=(5000, 8)).astype(np.float32)

    def blocks(order, size):
        return ((keys[order[i:i + size]], vecs[order[i:i + size]]) for i in range(0, 5000, size))

    a = keyed_sample(blocks(np.arange(5000), 333), 700, seed=4)
    b = keyed_sample(blocks(rng.permutation(5000), 1000), 700, seed=4)
    assert a.shape == (700, 8) and np.array_equal(a, b)
    assert not np.array_equal(a, keyed_sample(blocks(np.arange(5000), 333), 700, seed=5))
    assert len(keyed_sample(blocks(np.arange(5000), 500), 9000)) == 5000     # all rows


def test_key_hashes_are_spread_for_int_and_string_keys():
    h = key_hashes(np.arange(20000), seed=1)
    top = (h >> np.uint64(60)).astype(int)          # 16 buckets by the top 4 bits
    counts = np.bincount(top, minlength=16)
    assert counts.min() > 20000 / 16 * 0.8
    s = key_hashes([f"doc-{i}" for i in range(100)], seed=1)
    assert len(set(s.tolist())) == 100
    assert np.array_equal(s, key_hashes([f"doc-{i}" for i in range(100)], seed=1))


# --------------------------------------------------------------------------- on milvus-lite
@pytest.fixture
def lite_app(lite_uri, fixture_data):
    """``src`` (1,500 rows) laid out into ``a`` (partition storage) behind alias ``app``."""
    client = MilvusClient(lite_uri)
    docs = fixture_data.docs[:1500]
    create_vector_collection(client, "src", docs, scalars={"title": [f"d{i}" for i in range(1500)]})
    build_layout(client, "src", "a", n_clusters=8, seed=0, alias="app")
    yield client, fixture_data.docs
    client.close()


def _row(key, vec):
    return {"id": key, "vector": np.asarray(vec).tolist(), "title": f"k{key}"}


def _partition_of(client, collection, key, layout):
    for name in layout.partition_names:
        if client.query(collection, filter=f"id == {key}", output_fields=["id"],
                        partition_names=[name]):
            return name
    return None


def test_rebuild_reads_the_live_layout_and_moves_the_alias(lite_app, lite_uri, tmp_path):
    client, docs = lite_app
    assert read_stamp(client, "app").layout_id == read_layout(client, "a").layout_id
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0)
    try:
        routed.insert("app", [_row(90_000 + i, docs[5000 + i]) for i in range(30)])
        routed.upsert("app", [_row(0, docs[6000])])                   # a source key, moved
    finally:
        routed.close()
    report = build_layout(client, "src", "b", n_clusters=10, seed=1, alias="app")
    assert report.switch["live"] == "a" and report.switch["aliases_moved"] == ["app"]
    assert report.switch["replaced"] == RETIRED and read_stamp(client, "a").state == RETIRED
    assert client.describe_alias("app")["collection_name"] == "b"
    lb = read_layout(client, "app")
    got = client.query("b", filter="id >= 90000", output_fields=["id"])
    assert len(got) == 30                           # the routed inserts came along
    row = client.query("b", filter="id == 0", output_fields=["vector"])[0]
    assert np.allclose(row["vector"], docs[6000], atol=1e-6)     # the upsert, not the source row
    assert client.query("b", filter="", output_fields=["count(*)"])[0]["count(*)"] == 1530
    name = _partition_of(client, "b", 0, lb)
    assert name == lb.partition_names[int(cluster_of(lb, docs[6000][None])[0])]
    # rerunning with --alias onto another new target moves it again (no "alias already exist")
    again = build_layout(client, "src", "c", n_clusters=6, seed=2, alias="app")
    assert again.switch["live"] == "b" and client.describe_alias("app")["collection_name"] == "c"


def test_overwrite_keeps_the_alias_and_renames(lite_app):
    client, _ = lite_app
    old = read_layout(client, "a").layout_id
    report = build_layout(client, "src", "a", n_clusters=8, seed=3, overwrite=True)
    assert report.switch["renamed"] and report.switch["aliases_moved"] == ["app"]
    assert client.describe_alias("app")["collection_name"] == "a"
    lay = read_layout(client, "app")
    assert lay.collection == "a" and lay.layout_id == report.layout.layout_id != old
    assert read_stamp(client, "a").layout_id == lay.layout_id and read_stamp(client, "a").state == ""
    assert not client.has_collection("a__ltr_next") and not client.has_collection("a__ltr_prev")


def test_routed_write_waits_for_a_frozen_layout(lite_app, lite_uri, tmp_path):
    client, docs = lite_app
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0)
    try:
        routed.search("app", data=[docs[0].tolist()], limit=3)
        set_stamp(client, "a", state=FROZEN)
        threading.Timer(0.6, lambda: set_stamp(client, "a", state="")).start()
        t0 = time.monotonic()
        routed.insert("app", [_row(70_000, docs[7000])])
        assert time.monotonic() - t0 >= 0.5
        assert client.query("a", filter="id == 70000", output_fields=["id"])
    finally:
        routed.close()


def test_write_meeting_a_switch_lands_in_the_new_layout(lite_app, lite_uri, tmp_path,
                                                        monkeypatch):
    """The alias moves to another layout while a routed insert is being written: the insert
    is written again into the new layout, in its cluster there; a later write goes straight
    to it (the layout id is checked before each write)."""
    client, docs = lite_app
    lb = build_layout(client, "src", "b", n_clusters=5, seed=9).layout
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0,
                                reload_interval=600)
    real_insert = MilvusClient.insert
    moved = []

    def insert_then_switch(self, collection_name, data, *args, **kwargs):
        out = real_insert(self, collection_name, data, *args, **kwargs)
        if not moved and self is routed:
            point_alias(client, "app", "b")         # the switch, right after the write landed
            moved.append(collection_name)
        return out

    try:
        routed.search("app", data=[docs[0].tolist()], limit=3)      # serving layout a
        monkeypatch.setattr(MilvusClient, "insert", insert_then_switch)
        routed.insert("app", [_row(80_000, docs[8000])])
        assert moved == ["a"]                        # written into a's physical collection first
        assert _partition_of(client, "b", 80_000, lb) == \
            lb.partition_names[int(cluster_of(lb, docs[8000][None])[0])]
        routed.insert("app", [_row(80_001, docs[8001])])
        assert not client.query("a", filter="id == 80001", output_fields=["id"])
        assert _partition_of(client, "b", 80_001, lb) == \
            lb.partition_names[int(cluster_of(lb, docs[8001][None])[0])]
        assert routed.router_status("app")["layout_id"] == lb.layout_id
    finally:
        routed.close()


def test_overwrite_keeping_the_clusters_keeps_the_routers_binding(lite_app):
    """``--keep-clusters``: the rows are rewritten in cluster order under the same clusters,
    so a router published for the old layout (bound to its clustering id) still applies."""
    client, _ = lite_app
    old = read_layout(client, "a")
    report = build_layout(client, "src", "a", overwrite=True, clusters_from=old)
    new = read_layout(client, "app")
    assert new.layout_id != old.layout_id and new.clustering_id == old.clustering_id
    assert np.array_equal(new.centroids, old.centroids)
    assert report.switch["live"] == "a"



# --------------------------------------------------------------------------- the async client
def test_async_routed_write_waits_for_a_frozen_layout(lite_app, lite_uri, tmp_path):
    """AsyncRoutedMilvusClient's writes follow the same switch protocol: a frozen layout is
    waited for (on a worker thread: the loop keeps serving)."""
    import asyncio
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    client, docs = lite_app

    async def main():
        routed = AsyncRoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2,
                                         log_rate=0.0)
        try:
            await routed.search("app", data=[docs[0].tolist()], limit=3)
            set_stamp(client, "a", state=FROZEN)
            threading.Timer(0.6, lambda: set_stamp(client, "a", state="")).start()
            ticks = []

            async def ticker():             # the event loop is not blocked by the wait
                for _ in range(5):
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.05)
            t0 = time.monotonic()
            await asyncio.gather(routed.insert("app", [_row(71_000, docs[7100])]), ticker())
            return time.monotonic() - t0, ticks
        finally:
            await routed.close()
    waited, ticks = asyncio.run(main())
    assert waited >= 0.5 and len(ticks) == 5 and ticks[-1] - ticks[0] < 0.5
    assert client.query("a", filter="id == 71000", output_fields=["id"])


def test_async_write_meeting_a_switch_lands_in_the_new_layout(lite_app, lite_uri, tmp_path,
                                                              monkeypatch):
    """The alias moves to another layout while an async routed insert is being written: the
    insert is written again into the new layout, in its cluster there (before, the async
    client wrote into the layout it had read and nothing repeated it); a later write goes
    straight to the new layout."""
    import asyncio
    from pymilvus import AsyncMilvusClient
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    client, docs = lite_app
    lb = build_layout(client, "src", "b", n_clusters=5, seed=9).layout
    real_insert = AsyncMilvusClient.insert
    moved = []

    async def main():
        routed = AsyncRoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2,
                                         log_rate=0.0, reload_interval=600)

        async def insert_then_switch(self, collection_name, data, *args, **kwargs):
            out = await real_insert(self, collection_name, data, *args, **kwargs)
            if not moved and self is routed:
                point_alias(client, "app", "b")     # the switch, right after the write landed
                moved.append(collection_name)
            return out
        try:
            await routed.search("app", data=[docs[0].tolist()], limit=3)     # serving layout a
            monkeypatch.setattr(AsyncMilvusClient, "insert", insert_then_switch)
            await routed.insert("app", [_row(81_000, docs[8100])])
            await routed.insert("app", [_row(81_001, docs[8101])])
        finally:
            await routed.close()
    asyncio.run(main())
    assert moved == ["a"]                            # written into a's physical collection first
    for key, vec in ((81_000, docs[8100]), (81_001, docs[8101])):
        assert _partition_of(client, "b", key, lb) == \
            lb.partition_names[int(cluster_of(lb, vec[None])[0])]
    assert not client.query("a", filter="id == 81001", output_fields=["id"])


def test_a_rebuild_does_not_warn_about_its_own_cluster_index(lite_app, caplog):
    """Rebuilding a `single` layout reads the laid-out collection, whose cluster-id field has
    the layout's own index: the new layout indexes its cluster ids itself, so nothing is
    reported as not kept (a warning here used to send users looking for a lost index)."""
    import logging
    client, _ = lite_app
    old = build_layout(client, "src", "s", n_clusters=6, seed=0, storage="single").layout
    with caplog.at_level(logging.WARNING):
        build_layout(client, "src", "s", overwrite=True, clusters_from=old, storage="single")
    assert "does not keep" not in caplog.text
    assert read_layout(client, "s").clustering_id == old.clustering_id
