"""The routing core without a server: search plans per storage mode (plan.py), merging the
answers of several requests, where written rows go under a size bound, and which stored
copies an upsert locates and deletes (placement.py)."""
import logging
import subprocess
import sys

import numpy as np
import pytest

from milvus_ltr_router.clustering import assign_clusters, balanced_capacity, normalize_rows
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.placement import (ClusterSizes, KeysQuery, RowInputError, every_partition,
                                         guess_partitions, locate_keys, locate_keys_steps,
                                         needs_stored_lookup, place_rows, plan_write, prepare_rows,
                                         rows_of, size_bound_ratio, stale_copies,
                                         stored_partitions_by_cluster)
from milvus_ltr_router.plan import (QueryInputError, SearchPlan, SearchRequest, default_nprobe,
                                    group_by_clusters, merge, plan_search, probe_clusters,
                                    query_matrix, search_is_routable, search_request,
                                    searches_layout_field)
from milvus_ltr_router.router import CentroidRouter
from milvus_ltr_router.storage import CLUSTER_FIELD, DEFAULT_PARTITION, make_storage

L, DIM = 8, 16


def make_layout(mode="partition", metric="IP", ratio=None, n_rows=400, seed=0):
    """A layout of L clusters over ``n_rows`` random unit vectors, and those rows."""
    rng = np.random.default_rng(seed)
    centroids = normalize_rows(rng.standard_normal((L, DIM)).astype(np.float32))
    docs = normalize_rows(rng.standard_normal((n_rows, DIM)).astype(np.float32))
    clusters = assign_clusters(docs, centroids, "spherical")
    names = partition_names_for(L)
    groups = np.arange(L) // 3 if mode == "grouped" else None      # groups {0,1,2} {3,4,5} {6,7}
    layout = Layout("docs", centroids, names, np.bincount(clusters, minlength=L), metric,
                    "spherical", DIM, "lay1", extra={} if ratio is None else {"max_cluster_ratio": ratio},
                    storage=make_storage(mode, names, groups))
    return layout, docs, clusters


# --------------------------------------------------------------------------- search plans
def test_the_core_imports_no_pymilvus():
    code = ("import sys, milvus_ltr_router.plan, milvus_ltr_router.placement; "
            "assert 'pymilvus' not in sys.modules, 'pymilvus imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_queries_that_probe_the_same_clusters_share_one_request():
    probed = [np.array([3, 1]), np.array([5, 0]), np.array([1, 3]), np.array([0, 5])]
    assert group_by_clusters(probed) == [((1, 3), [0, 2]), ((0, 5), [1, 3])]


def test_partition_storage_names_partitions_and_keeps_the_callers_filter():
    layout, _, _ = make_layout("partition")
    probed = [np.array([3, 1]), np.array([5, 0]), np.array([1, 3])]
    plan = plan_search(layout, probed, "year > 2000", limit=5)
    assert plan == SearchPlan(3, (
        SearchRequest((0, 2), (1, 3), ["c0001", "c0003"], "year > 2000"),
        SearchRequest((1,), (0, 5), ["c0000", "c0005"], "year > 2000")), 5, "IP", "id")
    # _default holding rows written around the layout is searched with every request
    plan = plan_search(layout, probed, stray_partition=DEFAULT_PARTITION)
    assert [r.partition_names for r in plan.requests] == [["c0001", "c0003", "_default"],
                                                          ["c0000", "c0005", "_default"]]
    assert all(r.filter == "" for r in plan.requests)


def test_single_storage_filters_by_cluster_id_and_names_no_partition():
    layout, _, _ = make_layout("single")
    plan = plan_search(layout, [np.array([6, 2])], "year > 2000",
                       stray_partition=DEFAULT_PARTITION)       # nothing lies outside: ignored
    assert plan.requests == (SearchRequest((0,), (2, 6), None,
                                           f"(year > 2000) and {CLUSTER_FIELD} in [2, 6]"),)
    assert plan_search(layout, [np.array([4])]).requests[0].filter == f"{CLUSTER_FIELD} in [4]"


def test_grouped_storage_names_the_groups_and_filters_by_cluster_id():
    layout, _, _ = make_layout("grouped")
    request = plan_search(layout, [np.array([7, 0, 1])]).requests[0]
    assert request.partition_names == ["g000", "g002"]
    assert request.filter == f"{CLUSTER_FIELD} in [0, 1, 7]"


@pytest.mark.parametrize("mode", ["single", "partition", "grouped"])
@pytest.mark.parametrize("request_ms", [0.0, 2.3, 1e6])
def test_a_batch_plan_puts_every_query_in_one_request_naming_a_superset_of_its_clusters(
        mode, request_ms):
    """plan_search with the batch planner as its group hook (what the routed client does for
    a batch): each query in exactly one request, whose clusters (and the partitions and filter
    Milvus is told) cover the query's own; queries of a request without extra clusters are
    searched over exactly their own clusters."""
    from milvus_ltr_router.batching import CostModel, StorageFacts, plan_batches
    layout, docs, _ = make_layout(mode)
    rng = np.random.default_rng(1)
    queries = normalize_rows(docs[rng.integers(0, len(docs), 32)]
                             + 0.3 * rng.standard_normal((32, DIM)).astype(np.float32))
    probed = CentroidRouter(layout).rank(queries, 3)
    facts = StorageFacts.from_storage(layout.storage, layout.sizes)
    model = CostModel(request_ms=request_ms) if request_ms else \
        CostModel(request_ms=0.0, cluster_ms=0.0, segment_ms=0.0, row_walked_ms=0.0)
    batch = plan_batches(probed, facts, model, chunk=12)
    plan = plan_search(layout, probed, "year > 2000", limit=10, group=lambda p: batch.groups())
    assert len(plan.requests) == len(batch)
    carried = sorted(r for request in plan.requests for r in request.rows)
    assert carried == list(range(32))                               # every query exactly once
    for request in plan.requests:
        target = layout.storage.search_target(request.clusters, "year > 2000")
        assert (request.partition_names, request.filter) == target
        for r in request.rows:
            own = set(probed[r].tolist())
            assert own <= set(request.clusters)
            assert len(request.clusters) - len(own) == batch.extra_clusters[r]
    if request_ms == 0.0:                       # a request costs nothing: one per query
        assert all(batch.extra_clusters == 0) and len(plan.requests) == 32
    if request_ms == 1e6:                       # requests dominate: the whole chunk shares one
        assert len(plan.requests) == 3


def test_a_request_takes_its_rows_of_the_batch():
    queries = np.arange(12, dtype=np.float32).reshape(4, 3)
    request = SearchRequest((3, 1), (0,), None, "")
    np.testing.assert_array_equal(request.take(queries), queries[[3, 1]])


def test_which_searches_are_routed():
    layout, _, _ = make_layout()
    assert search_is_routable([[0.0] * DIM], None, None)
    assert not search_is_routable([[0.0] * DIM], ["c0000"], None)       # caller's partitions
    assert not search_is_routable(None, None, [1, 2])                    # search by ids
    assert not search_is_routable([[0.0] * DIM], None, None, ("ranker",))
    assert searches_layout_field(None, layout) and searches_layout_field("", layout)
    assert searches_layout_field("vector", layout) and not searches_layout_field("other", layout)


def test_query_matrix_and_default_nprobe():
    assert query_matrix([[1.0] * DIM] * 2, DIM, "docs").shape == (2, DIM)
    assert query_matrix([1.0] * DIM, DIM, "docs", one_vector_ok=True).shape == (1, DIM)
    for bad in ([1.0] * DIM, [[1.0] * (DIM + 1)], [], [["a"] * DIM]):
        with pytest.raises(QueryInputError):
            query_matrix(bad, DIM, "docs")
    layout, _, _ = make_layout()
    router = CentroidRouter(layout)
    assert default_nprobe(None, router, L) == L          # 8 (the fallback), at most L
    assert default_nprobe(3, router, L) == 3 and default_nprobe(20, router, L) == L


def test_probe_clusters_fixed_and_uncalibrated_recall_target(caplog):
    layout, docs, _ = make_layout()
    router = CentroidRouter(layout)
    queries = docs[:5]
    np.testing.assert_array_equal(probe_clusters(router, queries, 3), router.rank(queries, 3))
    np.testing.assert_array_equal(probe_clusters(router, queries, 3, nprobe=2),
                                  router.rank(queries, 2))
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.plan"):
        got = probe_clusters(router, queries, 3, recall_target=0.9, collection="docs")
    np.testing.assert_array_equal(got, router.rank(queries, 3))
    assert "no recall calibration" in caplog.text and "nprobe=3" in caplog.text


# --------------------------------------------------------------------------- merging answers
class FakeResult(list):
    """Stands in for pymilvus's SearchResult: a list of per-query hits with ``extra``."""

    extra: dict


def exact_search(docs, clusters, metric):
    """A stand-in for Milvus: exact top-``limit`` over the rows of a request's clusters."""
    def search(queries, request, limit):
        rows = np.flatnonzero(np.isin(clusters, request.clusters))
        if metric == "L2":
            dist = ((queries[:, None, :] - docs[None, rows]) ** 2).sum(-1)
            order = np.argsort(dist, axis=1)[:, :limit]
        else:
            dist = queries @ docs[rows].T
            order = np.argsort(-dist, axis=1)[:, :limit]
        res = FakeResult([{"id": int(rows[j]), "distance": float(dist[i, j])} for j in o]
                         for i, o in enumerate(order))
        res.extra = {"cost": len(rows)}
        return res
    return search


@pytest.mark.parametrize("metric", ["IP", "L2"])
def test_merge_of_several_requests_is_each_querys_top_k_of_its_clusters(metric):
    layout, docs, clusters = make_layout(metric=metric, n_rows=600)
    rng = np.random.default_rng(1)
    queries = normalize_rows(rng.standard_normal((20, DIM)).astype(np.float32))
    probed = CentroidRouter(layout).rank(queries, 3)
    search, k = exact_search(docs, clusters, metric), 7

    def expected(i, probe):
        return [h["id"] for h in search(queries[[i]], SearchRequest((0,), tuple(probe), None, ""), k)[0]]

    plan = plan_search(layout, probed, limit=k)
    assert len(plan.requests) > 1
    merged = merge(plan, [search(r.take(queries), r, k) for r in plan.requests])
    assert isinstance(merged, FakeResult) and len(merged) == len(queries)
    assert merged.extra["cost"] == sum(search(r.take(queries), r, k).extra["cost"]
                                       for r in plan.requests)
    for i in range(len(queries)):
        assert [h["id"] for h in merged[i]] == expected(i, probed[i])

    # each query split over one request per cluster (as a planner may split a query): the
    # merged answer is still its exact top-k over all its clusters
    def one_per_cluster(probed):
        return [((int(c),), [i]) for i, row in enumerate(probed) for c in row]
    split = plan_search(layout, probed, limit=k, group=one_per_cluster)
    assert len(split.requests) == 3 * len(queries)
    merged = merge(split, [search(r.take(queries), r, k) for r in split.requests])
    for i in range(len(queries)):
        assert [h["id"] for h in merged[i]] == expected(i, probed[i])


def test_merge_keeps_one_hit_per_key_and_checks_the_answers():
    plan = SearchPlan(1, (SearchRequest((0,), (0,), None, ""), SearchRequest((0,), (1,), None, "")),
                      limit=3, metric="COSINE")
    a = FakeResult([[{"id": 1, "distance": 0.9}, {"id": 2, "distance": 0.5}]])
    b = FakeResult([[{"id": 1, "distance": 0.9}, {"id": 3, "distance": 0.7}, {"id": 4, "distance": 0.1}]])
    merged = merge(plan, [a, b])
    assert [(h["id"], h["distance"]) for h in merged[0]] == [(1, 0.9), (3, 0.7), (2, 0.5)]
    assert not hasattr(merged, "extra")
    with pytest.raises(ValueError, match="1 answers for 2 requests"):
        merge(plan, [a])
    # one request carrying the whole batch in order (every single-query search): its answer
    one = SearchPlan(2, (SearchRequest((0, 1), (0,), None, ""),), limit=3)
    ab = FakeResult([a[0], b[0]])
    assert merge(one, [ab]) is ab
    swapped = merge(SearchPlan(2, (SearchRequest((1, 0), (0,), None, ""),), limit=3), [ab])
    assert swapped is not ab and list(swapped) == [b[0], a[0]]


# --------------------------------------------------------------------------- where rows go
def test_prepare_rows_needs_vectors_and_keeps_the_last_row_of_a_key():
    layout, docs, _ = make_layout()
    rows = [{"id": 1, "vector": docs[0]}, {"id": 2, "vector": docs[1]}, {"id": 1, "vector": docs[2]}]
    kept, vectors = prepare_rows("upsert", layout, rows, "docs")
    assert [r["id"] for r in kept] == [2, 1] and np.array_equal(vectors[1], docs[2])
    kept, vectors = prepare_rows("insert", layout, rows, "docs")
    assert len(kept) == 3 and vectors.shape == (3, DIM) and vectors.dtype == np.float32
    with pytest.raises(RowInputError, match=r"rows \[1\] have no vector field 'vector'"):
        prepare_rows("insert", layout, [rows[0], {"id": 5}], "docs")
    with pytest.raises(RowInputError, match="rows for 'docs'"):
        prepare_rows("insert", layout, [{"id": 5, "vector": [1.0, 2.0]}], "docs")
    assert rows_of(rows[0]) == [rows[0]] and rows_of(iter(rows)) == rows


def test_plan_write_by_storage_mode():
    layout, docs, _ = make_layout("partition")
    rows = [{"id": i, "vector": docs[i]} for i in range(4)]
    clusters = np.array([2, 5, 2, 0])
    plan = plan_write(layout, rows, clusters)
    assert [(b.partition_name, b.rows) for b in plan.batches] == \
        [("c0002", (0, 2)), ("c0005", (1,)), ("c0000", (3,))]
    assert plan.rows == rows and plan.batch_rows(plan.batches[0]) == [rows[0], rows[2]]
    single, _, _ = make_layout("single")
    plan = plan_write(single, rows, clusters)
    assert [(b.partition_name, b.rows) for b in plan.batches] == [("", (0, 1, 2, 3))]
    assert [r[CLUSTER_FIELD] for r in plan.rows] == [2, 5, 2, 0] and CLUSTER_FIELD not in rows[0]
    grouped, _, _ = make_layout("grouped")
    assert [(b.partition_name, b.rows) for b in plan_write(grouped, rows, clusters).batches] == \
        [("g000", (0, 2, 3)), ("g001", (1,))]


def test_rows_go_to_their_nearest_cluster_with_room_under_the_bound():
    layout, docs, clusters = make_layout(ratio=1.2)
    assert size_bound_ratio(layout) == 1.2 and size_bound_ratio(make_layout()[0]) is None
    np.testing.assert_array_equal(place_rows(layout, docs[:50]), clusters[:50])   # unbounded
    sizes = ClusterSizes(layout, size_bound_ratio(layout))
    target = int(np.argmax(layout.sizes))
    crowd = docs[clusters == target][:1].repeat(60, axis=0)         # 60 rows that all want it
    before = sizes.estimate().copy()
    got = place_rows(layout, crowd, sizes)
    cap = balanced_capacity(int(before.sum()) + 60, L, 1.2)
    after = before + np.bincount(got, minlength=L)
    assert (after <= np.maximum(cap, before)).all() and (got != target).any()
    assert after[target] == max(cap, before[target])                # filled up to the bound
    np.testing.assert_array_equal(sizes.estimate(), after)          # counted as routed ...
    assert sizes.inflight.sum() == 60                               # ... and in flight
    # the request for half of them failed: only the written half stays counted
    sizes.landed(got, list(range(30)))
    assert sizes.inflight.sum() == 0
    np.testing.assert_array_equal(sizes.estimate(), before + np.bincount(got[:30], minlength=L))


def test_a_read_of_the_live_sizes_replaces_what_it_saw():
    layout, docs, _ = make_layout(ratio=2.0)
    sizes = ClusterSizes(layout, 2.0)
    assert sizes.due(0.0, 10.0)                                     # never read
    first = place_rows(layout, docs[:10], sizes)
    sizes.landed(first, range(10))                                  # written before the read
    second = place_rows(layout, docs[10:14], sizes)                 # still in flight
    done = sizes.begin_read()
    assert done.sum() == 10
    live = layout.sizes + np.bincount(first, minlength=L)           # what Milvus holds
    sizes.finish_read(live, done, started=100.0)
    np.testing.assert_array_equal(sizes.estimate(), live + np.bincount(second, minlength=L))
    assert not sizes.due(105.0, 10.0) and sizes.due(110.0, 10.0)
    status = sizes.status(now=103.0)
    assert status["sizes_age_s"] == 3.0 and status["rows"] == int(live.sum()) + 4
    assert status["capacity"] == balanced_capacity(status["rows"], L, 2.0)
    assert status["largest"] == int(sizes.estimate().max()) and status["max_cluster_ratio"] == 2.0


# --------------------------------------------------------------------------- stored copies
def test_which_upserts_look_up_stored_copies():
    assert needs_stored_lookup("upsert", make_layout("partition")[0].storage)
    assert needs_stored_lookup("upsert", make_layout("grouped")[0].storage)
    assert not needs_stored_lookup("upsert", make_layout("single")[0].storage)
    assert not needs_stored_lookup("insert", make_layout("partition")[0].storage)


def test_stored_partitions_from_cluster_ids():
    layout, _, _ = make_layout("grouped")
    found = [{"id": 1, CLUSTER_FIELD: 4}, {"id": 2, CLUSTER_FIELD: 99}, {"id": 1, CLUSTER_FIELD: 0}]
    assert stored_partitions_by_cluster(layout.storage, found, "id") == \
        {1: {"g001", "g000"}, 2: {DEFAULT_PARTITION}}             # 99: not a routed row


def test_locate_keys_asks_its_questions_one_at_a_time():
    parts = ["p0", "p1", "p2", "p3"]
    where = {"a": {"p0"}, "b": {"p3"}, "c": {"p1", "p2"}}
    steps = locate_keys_steps(["a", "b", "c"], ["p0", "p0", "p1"], parts)
    asked = []
    answer = None
    try:
        while True:
            query = steps.send(answer)
            assert isinstance(query, KeysQuery)
            asked.append((tuple(query.keys), tuple(query.partitions)))
            answer = {k for k in query.keys if where[k] & set(query.partitions)}
    except StopIteration as done:
        assert done.value == where
    assert asked[:2] == [(("a", "b"), ("p0",)), (("a", "b"), ("p1", "p2", "p3"))]
    assert locate_keys(lambda keys, ps: {k for k in keys if where[k] & set(ps)},
                       ["a", "b", "c"], ["p0", "p0", "p1"], parts) == where


def test_guesses_and_stale_copies_of_a_moving_upsert():
    layout, docs, clusters = make_layout("partition")
    assert guess_partitions(layout, docs[:3]) == [layout.partition_names[c] for c in clusters[:3]]
    assert every_partition(layout.storage) == sorted(layout.partition_names + [DEFAULT_PARTITION])
    rows = [{"id": 1, "vector": docs[0]}, {"id": 2, "vector": docs[1]}, {"id": 3, "vector": docs[2]}]
    new = np.array([2, 5, 1])
    stored = {1: {"c0002"}, 2: {"c0000", DEFAULT_PARTITION}, 3: {"c0004"}}
    assert stale_copies(layout, rows, new, stored) == \
        {"c0000": [2], DEFAULT_PARTITION: [2], "c0004": [3]}      # key 1 stayed where it was
    assert stale_copies(layout, rows, new, {}) == {}
    single, _, _ = make_layout("single")                          # one partition: nothing moves
    assert stale_copies(single, rows, new, {1: {""}, 2: {DEFAULT_PARTITION}}) == {}


def test_search_request_adds_extra_partitions_only_where_partitions_are_named():
    layout, _, _ = make_layout("single")
    assert search_request(layout.storage, [1], [0], extra_partitions=["_default"]).partition_names is None
    layout, _, _ = make_layout("partition")
    assert search_request(layout.storage, [1, 1], [0], extra_partitions=["_default"]) == \
        SearchRequest((0,), (1,), ["c0001", "_default"], "")


def test_locate_keys_moved_from_client_with_a_warning():
    import milvus_ltr_router.placement as placement
    with pytest.warns(DeprecationWarning, match="import it from milvus_ltr_router.placement"):
        from milvus_ltr_router.client import locate_keys as old
    assert old is placement.locate_keys


def test_ivf_indexes_get_every_list_and_the_callers_params_win():
    from milvus_ltr_router.plan import index_search_defaults, with_search_defaults
    assert index_search_defaults({"index_type": "IVF_FLAT", "nlist": "343"}) == {"nprobe": 343}
    assert index_search_defaults({"index_type": "IVF_SQ8", "params": {"nlist": 64}}) == {"nprobe": 64}
    for other in ({"index_type": "FLAT"}, {"index_type": "HNSW", "M": 16}, None, {},
                  {"index_type": "IVF_FLAT"}, {"index_type": "IVF_FLAT", "nlist": "x"}):
        assert index_search_defaults(other) == {}
    assert with_search_defaults(None, {"nprobe": 8}) == {"params": {"nprobe": 8}}
    caller = {"metric_type": "IP", "params": {"radius": 0.5}}
    assert with_search_defaults(caller, {"nprobe": 8}) == \
        {"metric_type": "IP", "params": {"radius": 0.5, "nprobe": 8}}
    assert caller == {"metric_type": "IP", "params": {"radius": 0.5}}        # not modified
    assert with_search_defaults({"params": {"nprobe": 2}}, {"nprobe": 8}) == {"params": {"nprobe": 2}}
    assert with_search_defaults({"nprobe": 2}, {"nprobe": 8}) == {"nprobe": 2, "params": {}}
    assert with_search_defaults(caller, {}) is caller
