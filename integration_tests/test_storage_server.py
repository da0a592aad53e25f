"""Storage modes on a real Milvus server: one partition per cluster, grouped partitions plus a
cluster-id filter, one collection plus the filter. Same clusters in every mode (clusters_from)."""
import numpy as np
import pytest

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import LayoutError, cluster_of, cluster_sizes, drop_layout, read_layout
from milvus_ltr_router.milvus_io import count_rows
from milvus_ltr_router.storage import CLUSTER_FIELD

MODES = ("partition", "grouped", "single")


@pytest.fixture(scope="module")
def layouts(milvus_server, wordnet_source, wordnet_layout):
    """The session layout's clusters in each storage mode (built once per module)."""
    from pymilvus import MilvusClient
    client = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    base = wordnet_layout.layout
    out = {}
    for mode in MODES:
        target = f"{base.collection}_{mode}"
        out[mode] = build_layout(client, wordnet_source, target, storage=mode, groups=6,
                                 clusters_from=base).layout
    yield out
    for lay in out.values():
        drop_layout(client, lay.collection)
    client.close()


def test_auto_storage_on_a_server_is_single_and_read_back(client, wordnet_layout):
    built = wordnet_layout.layout
    assert built.storage.mode == "single"
    back = read_layout(client, built.collection)
    assert back.storage == built.storage
    assert client.list_partitions(built.collection) == ["_default"]
    fields = {f["name"] for f in client.describe_collection(built.collection)["fields"]}
    assert CLUSTER_FIELD in fields


def test_each_mode_stores_every_row_in_its_cluster(client, layouts, fixture_data):
    for mode, lay in layouts.items():
        back = read_layout(client, lay.collection, check_sizes=True)
        assert back.storage.mode == mode and back.clustering_id == layouts["single"].clustering_id
        np.testing.assert_array_equal(cluster_sizes(client, back), lay.sizes)
        assert count_rows(client, lay.collection) == 20_000
    grouped = layouts["grouped"].storage
    assert grouped.n_groups == 6
    assert sorted(client.list_partitions(layouts["grouped"].collection)) == \
        sorted(["_default"] + grouped.partitions)
    # each group partition holds exactly the rows of its clusters
    lay = layouts["grouped"]
    for g in grouped.partitions:
        members = [c for c, p in enumerate(grouped.cluster_partitions) if p == g]
        rows = client.query(lay.collection, filter="id >= 0", output_fields=[CLUSTER_FIELD],
                            partition_names=[g], limit=16384)
        assert len(rows) == int(lay.sizes[members].sum())
        assert {r[CLUSTER_FIELD] for r in rows} <= set(members)


def test_same_hits_in_every_mode_for_the_same_clusters(milvus_uri, layouts, fixture_data, tmp_path):
    """The routed search answers from the probed clusters only, whatever the storage: same ids
    and scores in every mode, also with a caller filter on a scalar field."""
    queries = fixture_data.queries[:40]
    clients = {m: RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "none"), log_rate=0,
                                     batch_planning=False)   # each query: exactly its clusters
               for m in MODES}
    try:
        probed = [clients["single"].route(layouts["single"].collection, queries, nprobe=3)]
        for mode, c in clients.items():     # same (centroid) router, same clusters in every mode
            assert c.route(layouts[mode].collection, queries, nprobe=3) == probed[0]
        for flt in ("", "grp in [1, 2, 3] or weight > 6000"):
            hits = {}
            for mode, c in clients.items():
                res = c.search(layouts[mode].collection, data=queries.tolist(), limit=10, nprobe=3,
                               filter=flt, output_fields=["grp", "weight"])
                hits[mode] = [[(h["id"], round(h["distance"], 4)) for h in row] for row in res]
                for row in res:
                    for h in row:
                        assert not flt or h["entity"]["grp"] in (1, 2, 3) or h["entity"]["weight"] > 6000
            assert hits["partition"] == hits["grouped"] == hits["single"]
            # and every hit lies in one of its query's probed clusters
            for q, row in enumerate(hits["single"]):
                ids = np.array([i for i, _ in row])
                clusters = cluster_of(layouts["single"], fixture_data.docs[(ids - 3) // 7])
                assert set(clusters.tolist()) <= set(probed[0][q])
    finally:
        for c in clients.values():
            c.close()


@pytest.mark.parametrize("mode", MODES)
def test_upsert_that_changes_cluster_keeps_one_row(milvus_uri, layouts, fixture_data, tmp_path, mode):
    """Milvus 2.3.5 upserts within one partition: the old copy must not survive elsewhere."""
    lay = layouts[mode]
    routed = RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "none"), log_rate=0)
    try:
        parts = cluster_of(lay, fixture_data.docs)
        a = int(parts[0])
        # b: a cluster in another partition where there are several (the case servers get wrong)
        b = next(int(p) for p in parts if p != a and (lay.storage.n_groups == 1 or
                 lay.storage.write_partition(p) != lay.storage.write_partition(a)))
        va = fixture_data.docs[np.flatnonzero(parts == a)[0]]
        vb = fixture_data.docs[np.flatnonzero(parts == b)[0]]
        keys = [10_000_001, 10_000_002, 10_000_003]
        before = count_rows(routed, lay.collection)
        routed.insert(lay.collection, [{"id": k, "vector": va.tolist(), "title": "new", "grp": 99,
                                        "weight": 0.0} for k in keys])
        assert count_rows(routed, lay.collection) == before + 3
        # one key alone, then a batch, move to cluster b
        routed.upsert(lay.collection, {"id": keys[0], "vector": vb.tolist(), "title": "moved",
                                       "grp": 99, "weight": 1.0})
        routed.upsert(lay.collection, [{"id": k, "vector": vb.tolist(), "title": "moved", "grp": 99,
                                        "weight": 1.0} for k in keys[1:]])
        assert count_rows(routed, lay.collection) == before + 3
        for k in keys:
            got = routed.query(lay.collection, filter=f"id == {k}", output_fields=["title"],
                               consistency_level="Strong")
            assert [r["title"] for r in got] == ["moved"]
        if lay.storage.cluster_field is not None:
            got = routed.query(lay.collection, filter=f"id in {keys}", output_fields=[CLUSTER_FIELD],
                               consistency_level="Strong")
            assert {r[CLUSTER_FIELD] for r in got} == {b}
        else:
            got = routed.query(lay.collection, filter=f"id in {keys}", output_fields=["id"],
                               partition_names=[lay.partition_names[a]], consistency_level="Strong")
            assert got == []
        # a plain search with the old vector no longer finds the stale rows
        hits = routed.search(lay.collection, data=[va.tolist()], limit=20, nprobe=lay.n_clusters,
                             output_fields=["title"], consistency_level="Strong")[0]
        assert not [h for h in hits if h["id"] in keys and h["entity"]["title"] != "moved"]
        # inserted and moved at once (nothing in between makes the insert visible), and one key
        # twice in one batch going to two partitions: still one row per key, the last one
        fresh = [10_000_011, 10_000_012]
        routed.insert(lay.collection, [{"id": k, "vector": va.tolist(), "title": "old", "grp": 99,
                                        "weight": 0.0} for k in fresh])
        routed.upsert(lay.collection, [{"id": k, "vector": vb.tolist(), "title": "new", "grp": 99,
                                        "weight": 0.0} for k in fresh])
        routed.upsert(lay.collection, [{"id": 10_000_013, "vector": va.tolist(), "title": "first",
                                        "grp": 99, "weight": 0.0},
                                       {"id": 10_000_013, "vector": vb.tolist(), "title": "last",
                                        "grp": 99, "weight": 0.0}])
        for k, title in ((fresh[0], "new"), (fresh[1], "new"), (10_000_013, "last")):
            per_partition = [r["title"] for p in (lay.storage.partitions if lay.storage.n_groups > 1
                                                  else [None])
                             for r in routed.query(lay.collection, filter=f"id == {k}",
                                                   output_fields=["title"], consistency_level="Strong",
                                                   partition_names=[p] if p else None)]
            assert per_partition == [title], (k, per_partition)
        keys += fresh + [10_000_013]
        routed.delete(lay.collection, ids=keys)
        assert count_rows(routed, lay.collection) == before
    finally:
        routed.close()


def test_router_status_and_filter_composition(milvus_uri, layouts, tmp_path):
    lay = layouts["grouped"]
    storage = lay.storage
    parts, expr = storage.search_target([5, 1, 5], "grp == 3 or grp == 4")
    assert expr == f"(grp == 3 or grp == 4) and {CLUSTER_FIELD} in [1, 5]"
    assert parts == list(dict.fromkeys([storage.cluster_partitions[1], storage.cluster_partitions[5]]))
    assert layouts["single"].storage.search_target([2], "")[0] is None
    routed = RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "none"), log_rate=0)
    try:
        status = routed.router_status(lay.collection)
        assert status["storage"] == {"mode": "grouped", "partitions": 6, "cluster_field": CLUSTER_FIELD,
                                     "clustering_key": False}
    finally:
        routed.close()


def test_clustering_key_refused_on_servers_before_2_4_7(client, wordnet_source, unique_name):
    version = client.get_server_version()
    if not version.lstrip("v").startswith("2.3"):
        pytest.skip(f"server {version} may support clustering keys; this checks the refusal on 2.3")
    with pytest.raises(LayoutError, match="clustering_key needs Milvus >= 2.4.7"):
        build_layout(client, wordnet_source, unique_name("ck"), storage="single", clustering_key=True)


def test_rows_written_around_a_partition_layout_stay_visible_and_are_repaired(
        milvus_uri, client, layouts, fixture_data, tmp_path):
    """A plain MilvusClient writes into _default: routed search still finds the row, status counts
    it, repair-layout moves it into its cluster (an older copy of the same key is removed)."""
    from milvus_ltr_router.cli import main as cli_main
    from milvus_ltr_router.repair import stray_rows
    lay = layouts["partition"]
    vec = fixture_data.queries[7]
    existing = 3       # primary key of source row 0, already stored in its cluster's partition
    client.insert(lay.collection, [{"id": 20_000_001, "vector": vec.tolist(), "title": "stray",
                                    "grp": 5, "weight": 0.5}])
    client.upsert(lay.collection, [{"id": existing, "vector": vec.tolist(), "title": "rewritten",
                                    "grp": 5, "weight": 0.5}])
    client.flush(lay.collection)
    assert stray_rows(client, lay) == 2
    routed = RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "none"), log_rate=0)
    try:
        hits = routed.search(lay.collection, data=[vec.tolist()], limit=5, nprobe=1,
                             consistency_level="Strong")[0]
        assert {20_000_001, existing} <= {h["id"] for h in hits}
        assert cli_main(["status", "--uri", milvus_uri, "--collection", lay.collection,
                         "--model-dir", str(tmp_path / "none"), "--json"]) == 0
        assert cli_main(["repair-layout", "--uri", milvus_uri, "--collection", lay.collection]) == 0
        client.flush(lay.collection)
        assert client.query(lay.collection, filter="id >= 0", output_fields=["id"],
                            partition_names=["_default"], consistency_level="Strong") == []
        cluster = int(cluster_of(lay, vec[None])[0])
        for key in (20_000_001, existing):
            got = routed.query(lay.collection, filter=f"id == {key}", output_fields=["title"],
                               consistency_level="Strong")
            assert len(got) == 1          # one row per key, the newest write
            here = routed.query(lay.collection, filter=f"id == {key}", output_fields=["id"],
                                partition_names=[lay.partition_names[cluster]],
                                consistency_level="Strong")
            assert len(here) == 1
        assert routed.query(lay.collection, filter=f"id == {existing}", output_fields=["title"],
                            consistency_level="Strong")[0]["title"] == "rewritten"
        routed.delete(lay.collection, ids=[20_000_001])
    finally:
        routed.close()


def test_auto_storage_from_logged_queries_follows_the_cost_model(client, milvus_uri, tmp_path,
                                                                 wordnet_source, wordnet_layout,
                                                                 fixture_data):
    """``auto`` with logged queries: the cost model over their co-probes decides; ``grouped``
    then holds the clusters the queries probe together, and routed searches through it find
    what the same probes find through ``single`` storage."""
    from milvus_ltr_router.costs import CostModel
    from milvus_ltr_router.grouping import centroid_probes, coprobe_groups
    base = wordnet_layout.layout
    queries = np.asarray(fixture_data.queries[:1500], dtype=np.float32)
    walk_is_dear = CostModel(request_ms=1.0, cluster_ms=0.0, segment_ms=0.0, row_walked_ms=1e-3,
                             query_ms=0.0, row_scanned_ms=1e-6, query_row_walked_ms=0.0)
    target = f"{base.collection}_auto"
    report = build_layout(client, wordnet_source, target, storage="auto", groups=4,
                          clusters_from=base, queries=queries, probe_nprobe=8,
                          cost_model=walk_is_dear)
    try:
        lay = report.layout
        choice = report.storage_choice
        assert lay.storage.mode == "grouped" == choice.mode and lay.storage.n_groups == 4
        assert set(choice.predicted_ms) == {"single", "grouped:4"}
        # the groups are the co-probe groups of those queries over these clusters
        expect = coprobe_groups(centroid_probes(queries, base.centroids, base.metric, 8),
                                np.asarray(base.sizes, dtype=float), 4)
        index = {p: i for i, p in enumerate(lay.storage.partitions)}
        got = np.array([index[p] for p in lay.storage.cluster_partitions])
        assert np.array_equal(got, expect)
        np.testing.assert_array_equal(cluster_sizes(client, read_layout(client, target)), base.sizes)
        # routed search through the groups = through single storage, probe for probe
        held_out = np.asarray(fixture_data.queries[-20:], dtype=np.float32).tolist()
        routed = RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "none"), log_rate=0)
        try:      # one query a request: a batch plan would merge queries differently per storage
            a = [routed.search(target, data=[q], limit=10, nprobe=8)[0] for q in held_out]
            b = [routed.search(base.collection, data=[q], limit=10, nprobe=8)[0] for q in held_out]
        finally:
            routed.close()
        assert [[h["id"] for h in r] for r in a] == [[h["id"] for h in r] for r in b]
        # segments dear: the same queries keep single storage
        segments_are_dear = CostModel(request_ms=1.0, cluster_ms=0.0, segment_ms=100.0,
                                      row_walked_ms=1e-9, query_ms=0.0, row_scanned_ms=1e-6,
                                      query_row_walked_ms=0.0)
        drop_layout(client, target)
        single = build_layout(client, wordnet_source, target, storage="auto", groups=4,
                              clusters_from=base, queries=queries, probe_nprobe=8,
                              cost_model=segments_are_dear)
        assert single.layout.storage.mode == "single" == single.storage_choice.mode
        assert client.list_partitions(target) == ["_default"]
    finally:
        drop_layout(client, target)


def test_routed_search_on_an_ivf_indexed_layout_scans_its_clusters_whole(client, milvus_uri,
                                                                         tmp_path, wordnet_source,
                                                                         wordnet_layout,
                                                                         fixture_data):
    """A layout indexed IVF_FLAT (build-layout --index-type IVF_FLAT) answers routed searches
    as the FLAT one does: the routed request visits every list (nprobe = nlist) unless the
    caller sets nprobe itself; Milvus's default nprobe would lose most neighbours."""
    base = wordnet_layout.layout
    target = f"{base.collection}_ivf"
    build_layout(client, wordnet_source, target, clusters_from=base,
                 index={"index_type": "IVF_FLAT", "params": {"nlist": 64}})
    held_out = np.asarray(fixture_data.queries[-20:], dtype=np.float32).tolist()
    routed = RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "none"), log_rate=0)
    try:
        a = [routed.search(target, data=[q], limit=10, nprobe=8)[0] for q in held_out]
        b = [routed.search(base.collection, data=[q], limit=10, nprobe=8)[0] for q in held_out]
        assert [[h["id"] for h in r] for r in a] == [[h["id"] for h in r] for r in b]
        # the caller's own nprobe is kept: one list of 64 holds few of the probed clusters' rows
        narrow = [routed.search(target, data=[q], limit=10, nprobe=8,
                                search_params={"params": {"nprobe": 1}})[0] for q in held_out]
        same = sum(len({h["id"] for h in x} & {h["id"] for h in y}) for x, y in zip(narrow, b))
        assert same < 0.9 * 10 * len(held_out)
    finally:
        routed.close()
        drop_layout(client, target)
