"""The size bound on routed writes: ``clustering.assign_with_room`` (pure) and
``RoutedMilvusClient`` inserts/upserts into a layout built with ``max_cluster_ratio`` on
milvus-lite (the server counterpart is integration_tests/test_balance_server.py)."""
import time

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.clustering import (assign_clusters, assign_with_room, balanced_capacity,
                                          normalize_rows)
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import cluster_of, cluster_sizes
from milvus_ltr_router.milvus_io import count_rows, release_lite
from milvus_ltr_router.writer import create_vector_collection
from milvus_ltr_router.storage import CLUSTER_FIELD


# --------------------------------------------------------------------------- assign_with_room
def _scores(x, centroids, algorithm):
    s = x @ centroids.T
    if algorithm == "kmeans":
        s -= 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    return s


@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
def test_assign_with_room_keeps_the_bound_and_spills_to_the_nearest_with_room(rng, algorithm):
    k, d = 12, 16
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    if algorithm == "spherical":
        centroids = normalize_rows(centroids)
    sizes = rng.integers(0, 40, k).astype(np.int64)
    sizes[3] = 90                                    # already past any bound below: takes nothing
    # rows that mostly want one cluster: its centroid plus noise
    x = (centroids[5] + 0.4 * rng.standard_normal((300, d))).astype(np.float32)
    before = sizes.copy()
    out, cap = assign_with_room(x, centroids, algorithm, sizes, 1.5, block_rows=64)
    np.testing.assert_array_equal(sizes, before)     # pure: sizes untouched
    assert cap == balanced_capacity(int(before.sum()) + 300, k, 1.5) == int(np.ceil(1.5 * (before.sum() + 300) / k))
    after = before + np.bincount(out, minlength=k)
    assert (after[np.arange(k) != 3] <= cap).all() and after[3] == before[3]
    nearest = assign_clusters(x, centroids, algorithm)
    assert (out != nearest).sum() > 50               # the bound did move rows
    assert (out == nearest).sum() > 0
    # every cluster a row prefers to the one it got is full at the end
    s = _scores(x, centroids, algorithm)
    for i in range(len(x)):
        better = np.flatnonzero(s[i] > s[i, out[i]])
        assert (after[better] >= cap).all(), i


def test_assign_with_room_without_a_bound_is_the_layout_rule(rng):
    centroids = normalize_rows(rng.standard_normal((7, 8)).astype(np.float32))
    x = rng.standard_normal((50, 8)).astype(np.float32)
    sizes = np.full(7, 1000, dtype=np.int64)
    out, cap = assign_with_room(x, centroids, "spherical", sizes, None)
    assert cap is None
    np.testing.assert_array_equal(out, assign_clusters(x, centroids, "spherical"))


def test_assign_with_room_gives_contested_room_to_the_best_scoring_rows():
    centroids = np.eye(2, dtype=np.float32)
    # all four rows prefer cluster 0; the two with the largest <x, c0> get its room
    x = np.array([[0.9, 0.1], [0.6, 0.4], [0.99, 0.0], [0.55, 0.5]], dtype=np.float32)
    out, cap = assign_with_room(x, centroids, "spherical", np.zeros(2, dtype=np.int64), 1.0)
    assert cap == 2
    assert out.tolist() == [0, 1, 0, 1]
    # a ratio that leaves room for all of them keeps each in its nearest cluster
    out, cap = assign_with_room(x, centroids, "spherical", np.zeros(2, dtype=np.int64), 2.0)
    assert cap == 4 and out.tolist() == [0, 0, 0, 0]


def test_assign_with_room_always_fits_and_checks_its_input(rng):
    centroids = normalize_rows(rng.standard_normal((5, 4)).astype(np.float32))
    x = rng.standard_normal((1000, 4)).astype(np.float32)
    sizes = np.array([0, 0, 0, 0, 7], dtype=np.int64)
    out, cap = assign_with_room(x, centroids, "spherical", sizes, 1.0)    # the tightest bound
    after = sizes + np.bincount(out, minlength=5)
    assert after.sum() == 1007 and after.max() <= cap == 202
    with pytest.raises(ValueError, match="shape"):
        assign_with_room(x, centroids, "spherical", np.zeros(4, dtype=np.int64), 2.0)
    with pytest.raises(ValueError, match="non-negative"):
        assign_with_room(x, centroids, "spherical", np.array([0, 0, -1, 0, 0]), 2.0)
    with pytest.raises(ValueError, match="max_cluster_ratio must be >= 1"):
        assign_with_room(x, centroids, "spherical", np.zeros(5, dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="unknown clustering algorithm"):
        assign_with_room(x, centroids, "ivf", np.zeros(5, dtype=np.int64), 2.0)


# --------------------------------------------------------------------------- milvus-lite
RATIO = 1.5
N_BUILD, L = 3000, 24


def _crowd(layout, docs, n):
    """Up to ``n`` fixture rows outside the build that all want the same cluster (the one the
    most of them want), and that cluster."""
    pool = docs[N_BUILD:]
    nearest = cluster_of(layout, pool)
    target = int(np.bincount(nearest).argmax())
    pick = np.flatnonzero(nearest == target)[:n]
    return pool[pick], N_BUILD + pick, target


def _rank_of(router, vectors, clusters):
    """Position of each row's cluster in the ranking ``router`` gives its own vector (0 = the
    router's first cluster): the clusters a routed search of that vector probes first."""
    order = router.rank(vectors, router.n_partitions)
    return np.argmax(order == np.asarray(clusters)[:, None], axis=1)


def _stored_clusters(client, layout, ids):
    """Cluster each row is stored in, by its cluster field or its partition."""
    out = {}
    if layout.storage.cluster_field is not None:
        for r in client.query(layout.collection, filter=f"id in {list(map(int, ids))}",
                              output_fields=[CLUSTER_FIELD]):
            out[r["id"]] = r[CLUSTER_FIELD]
        return out
    for c, part in enumerate(layout.partition_names):
        for r in client.query(layout.collection, filter=f"id in {list(map(int, ids))}",
                              partition_names=[part], output_fields=["id"]):
            out[r["id"]] = c
    return out


@pytest.fixture(params=["partition", "single"])
def bounded(request, tmp_path, fixture_data):
    uri = str(tmp_path / "bal.db")
    client = MilvusClient(uri)
    create_vector_collection(client, "src", fixture_data.docs[:N_BUILD])
    report = build_layout(client, "src", "docs", n_clusters=L, seed=0, storage=request.param,
                          max_cluster_ratio=RATIO)
    client.close()
    release_lite(uri)
    yield uri, report.layout
    release_lite(uri)


def test_routed_inserts_keep_the_size_bound_on_lite(bounded, fixture_data, tmp_path):
    uri, layout = bounded
    assert layout.extra["max_cluster_ratio"] == RATIO
    assert layout.sizes.max() <= balanced_capacity(N_BUILD, L, RATIO)
    vecs, ids, target = _crowd(layout, fixture_data.docs, 400)
    assert len(vecs) == 400
    routed = RoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), log_rate=0,
                                size_refresh_interval=3600)
    try:
        status = routed.router_status("docs")["balance"]
        assert status["max_cluster_ratio"] == RATIO and status["rows"] == N_BUILD
        assert status["capacity"] == balanced_capacity(N_BUILD, L, RATIO)
        assert status["sizes_age_s"] is None                 # build-time sizes, nothing read
        assert routed.reload_router("docs")["balance"]["sizes_age_s"] is not None  # read now
        for start in range(0, 400, 50):          # batches: the client counts what it routed
            res = routed.insert("docs", [{"id": int(i), "vector": v.tolist()}
                                         for i, v in zip(ids[start:start + 50], vecs[start:start + 50])])
            assert res["insert_count"] == 50
        live = cluster_sizes(routed, routed.layout("docs"))
        cap = balanced_capacity(N_BUILD + 400, L, RATIO)
        assert live.sum() == N_BUILD + 400 and live.max() <= cap
        assert live[target] == cap               # the wanted cluster was filled up to the bound
        status = routed.router_status("docs")["balance"]     # one writer: the count is exact
        assert status["rows"] == N_BUILD + 400 and status["largest"] == cap == status["capacity"]
        stored = _stored_clusters(routed, layout, ids)
        clusters = np.array([stored[int(i)] for i in ids])
        assert (clusters != target).sum() > 100  # ... and the rest spilled to other clusters
        # every row is found by a routed search probing its cluster's rank + 1 clusters, not
        # fewer (ranked by the router serving the collection: the layout's training-free one)
        ranks = _rank_of(routed.router("docs"), vecs, clusters)
        assert ranks.max() >= 1
        for j in np.random.default_rng(0).choice(400, 60, replace=False):
            flt = f"id == {int(ids[j])}"
            hit = routed.search("docs", data=[vecs[j].tolist()], limit=3, filter=flt,
                                nprobe=int(ranks[j]) + 1)[0]
            assert [h["id"] for h in hit] == [int(ids[j])]
            if ranks[j] > 0:
                assert not routed.search("docs", data=[vecs[j].tolist()], limit=3, filter=flt,
                                         nprobe=int(ranks[j]))[0]
        status = routed.reload_router("docs")["balance"]
        assert status["rows"] == N_BUILD + 400 and status["largest"] == cap
    finally:
        routed.close()


def test_reads_follow_deletes_and_upserts_keep_one_row_per_key(bounded, fixture_data, tmp_path):
    uri, layout = bounded
    vecs, ids, target = _crowd(layout, fixture_data.docs, 300)
    routed = RoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), log_rate=0,
                                size_refresh_interval=3600)
    try:
        assert routed.router_status("docs")["balance"]["sizes_age_s"] is None
        routed.insert("docs", [{"id": int(i), "vector": v.tolist()} for i, v in zip(ids, vecs)])
        # the first routed write read the live sizes before routing: one writer, exact count
        status = routed.router_status("docs")["balance"]
        assert status["sizes_age_s"] is not None and status["rows"] == N_BUILD + 300
        assert status["largest"] == cluster_sizes(routed, layout).max() == \
            balanced_capacity(N_BUILD + 300, L, RATIO)
        routed.delete("docs", filter=f"id in {list(map(int, ids[:100]))}")
        assert routed.router_status("docs")["balance"]["rows"] == N_BUILD + 300  # not read yet
        assert routed.reload_router("docs")["balance"]["rows"] == N_BUILD + 200
        # upsert the remaining keys with vectors that all want the crowded cluster again:
        # one row per key; until the next read each counts as one more row (documented)
        routed.upsert("docs", [{"id": int(i), "vector": v.tolist()} for i, v in zip(ids[100:], vecs[:200])])
        assert count_rows(routed, "docs") == N_BUILD + 200
        got = routed.query("docs", filter=f"id in {list(map(int, ids[100:]))}", output_fields=["id"])
        assert sorted(r["id"] for r in got) == sorted(map(int, ids[100:]))
        live = cluster_sizes(routed, routed.layout("docs"))
        assert live.sum() == N_BUILD + 200
        assert routed.router_status("docs")["balance"]["rows"] == N_BUILD + 400
        assert live.max() <= balanced_capacity(N_BUILD + 400, L, RATIO)
        assert routed.reload_router("docs")["balance"]["rows"] == N_BUILD + 200
    finally:
        routed.close()


def test_a_writer_sees_another_writers_rows_from_its_next_read(bounded, fixture_data, tmp_path):
    uri, layout = bounded
    vecs, ids, target = _crowd(layout, fixture_data.docs, 301)
    rows = [{"id": int(i), "vector": v.tolist()} for i, v in zip(ids, vecs)]
    a = RoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), log_rate=0, size_refresh_interval=0.5)
    b = RoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), log_rate=0, size_refresh_interval=3600)
    try:
        a.insert("docs", rows[:100])
        b.insert("docs", rows[100:300])          # b's first read saw a's rows: exact for b
        assert b.router_status("docs")["balance"]["rows"] == N_BUILD + 300
        assert a.router_status("docs")["balance"]["rows"] == N_BUILD + 100   # a has not read since
        time.sleep(0.6)
        t0 = time.monotonic()
        a.insert("docs", rows[300:])             # due: a re-reads in the background
        deadline = t0 + 30

        def read_since_t0():
            age = a.router_status("docs")["balance"]["sizes_age_s"]
            return time.monotonic() - age >= t0
        while not read_since_t0():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # b's rows are counted now; the row a wrote while reading may count twice until the
        # next read (the strict side)
        assert N_BUILD + 301 <= a.router_status("docs")["balance"]["rows"] <= N_BUILD + 302
        status = a.reload_router("docs")["balance"]
        assert status["rows"] == N_BUILD + 301 and status["largest"] == cluster_sizes(a, layout).max()
    finally:
        a.close()
        b.close()


def test_layout_without_a_bound_routes_every_row_to_its_nearest(lite_uri, fixture_data, tmp_path):
    client = MilvusClient(lite_uri)
    create_vector_collection(client, "src", fixture_data.docs[:N_BUILD])
    layout = build_layout(client, "src", "docs", n_clusters=L, seed=0, storage="single").layout
    client.close()
    release_lite(lite_uri)
    assert "max_cluster_ratio" not in layout.extra
    vecs, ids, target = _crowd(layout, fixture_data.docs, 400)
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "models"), log_rate=0)
    try:
        assert routed.router_status("docs")["balance"] is None
        routed.insert("docs", [{"id": int(i), "vector": v.tolist()} for i, v in zip(ids, vecs)])
        stored = _stored_clusters(routed, layout, ids)
        assert {stored[int(i)] for i in ids} == {target}
        assert cluster_sizes(routed, layout)[target] == layout.sizes[target] + 400
    finally:
        routed.close()


# --------------------------------------------------------------------------- several writers
def _two_writers(rng, writers, rounds=12, batch=60):
    """Two ClusterSizes (one per writing process) routing batches that all want the same few
    clusters, never reading each other's rows: the true sizes at the end, and the bound."""
    from types import SimpleNamespace
    from milvus_ltr_router.placement import ClusterSizes
    k, d = 10, 16
    centroids = normalize_rows(rng.standard_normal((k, d)).astype(np.float32))
    layout = SimpleNamespace(layout_id="l1", sizes=np.full(k, 100, dtype=np.int64),
                             n_clusters=k, centroids=centroids, algorithm="spherical")
    a, b = ClusterSizes(layout, 1.5, writers), ClusterSizes(layout, 1.5, writers)
    for _ in range(rounds):
        for w in (a, b):
            x = normalize_rows((centroids[2] + 0.3 * rng.standard_normal((batch, d))).astype(np.float32))
            w.place(layout, x)
    true = layout.sizes + a.routed + b.routed
    return true, balanced_capacity(int(true.sum()), k, 1.5)


def test_two_writers_keep_the_bound_when_each_knows_there_are_two(rng):
    true, cap = _two_writers(rng, writers=1)
    assert true.max() > cap * 1.1                 # each took the whole room: the bound is broken
    true, cap = _two_writers(rng, writers=2)
    assert true.max() <= cap                      # each took half of it: the bound holds
    assert true.sum() == 10 * 100 + 2 * 12 * 60   # every row placed


def test_assign_with_room_share_gives_a_writer_its_part_of_the_room(rng):
    centroids = normalize_rows(rng.standard_normal((4, 8)).astype(np.float32))
    x = normalize_rows((centroids[0] + 0.05 * rng.standard_normal((40, 8))).astype(np.float32))
    sizes = np.asarray([10, 10, 10, 10], dtype=np.int64)
    out, cap = assign_with_room(x, centroids, "spherical", sizes, 1.5, share=2)
    assert cap == balanced_capacity(40 + 2 * 40, 4, 1.5)          # as if both wrote 40 rows
    assert np.bincount(out, minlength=4)[0] == -(-(cap - 10) // 2)  # half the room, rounded up
    with pytest.raises(ValueError, match="share"):
        assign_with_room(x, centroids, "spherical", sizes, 1.5, share=0)
