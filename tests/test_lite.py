"""The embedded default, milvus-lite: layout, routed client and the CLI on a local file."""
import json
import subprocess
import sys

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import LayoutError, assign, read_layout
from milvus_ltr_router.readout import iter_layout_blocks
from milvus_ltr_router.milvus_io import CollectionError, release_lite
from milvus_ltr_router.serving import fallback_kind
from milvus_ltr_router.writer import create_vector_collection


@pytest.fixture
def lite_layout(lite_uri, fixture_data):
    docs = fixture_data.docs[:3000]
    client = MilvusClient(lite_uri)
    create_vector_collection(client, "src", docs, scalars={"title": [f"doc {i}" for i in range(3000)]})
    report = build_layout(client, "src", "docs", n_clusters=24, seed=0)
    yield client, report, docs
    client.close()


def test_layout_on_milvus_lite(lite_layout):
    client, report, docs = lite_layout
    layout = read_layout(client, "docs", check_sizes=True)
    np.testing.assert_array_equal(layout.centroids, report.layout.centroids)
    assert layout.partition_names == sorted(layout.partition_names)
    seen = 0
    for ids, vecs, part in iter_layout_blocks(client, layout, batch_size=500):
        assert set(assign(layout, vecs)) == {layout.partition_names[part]}
        np.testing.assert_array_equal(vecs, docs[ids])
        seen += len(ids)
    assert seen == 3000
    row = client.query("docs", filter="id == 17", output_fields=["title"])[0]
    assert row["title"] == "doc 17"


def test_layout_bad_input_on_lite(lite_layout):
    client, report, docs = lite_layout
    with pytest.raises(CollectionError, match="unknown collection 'nope'"):
        build_layout(client, "nope", "x")
    with pytest.raises(LayoutError, match="already exists"):
        build_layout(client, "src", "docs")
    with pytest.raises(LayoutError, match="fewer than the 5000 clusters"):
        build_layout(client, "src", "too_many", n_clusters=5000)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) do not match"):
        assign(report.layout, np.ones((2, 3)))
    with pytest.raises(LayoutError, match="has no layout"):
        read_layout(client, "src")
    # several vector fields (Milvus 2.3 servers refuse such collections; lite has them)
    from pymilvus import DataType
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("a", DataType.FLOAT_VECTOR, dim=4)
    schema.add_field("b", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("two", schema=schema)
    with pytest.raises(CollectionError, match=r"several float-vector fields \(a, b\)"):
        build_layout(client, "two", "x")
    with pytest.raises(CollectionError, match="no float-vector field named 'c'"):
        build_layout(client, "two", "x", vector_field="c")


def test_routed_client_on_lite(lite_uri, lite_layout, fixture_data, tmp_path):
    client, report, docs = lite_layout
    client.close()
    release_lite(lite_uri)
    queries = fixture_data.queries[:40]
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "models"), nprobe=3, log_rate=1.0)
    try:
        status = routed.router_status("docs")
        # no router published: the layout's training-free router (moments, else centroids)
        assert status["mode"] == fallback_kind(routed.layout("docs"))
        assert status["error"] == "no router published"
        res = routed.search("docs", data=queries.tolist(), limit=5, output_fields=["title"])
        assert len(res) == 40 and all(len(r) == 5 for r in res)
        extra = routed.last_plan["extra_clusters"]          # the batch planner split the batch
        assert routed.last_plan["planned"] and routed.last_plan["requests"] < 40
        names = routed.layout("docs").partition_names
        order = [[names[c] for c in row] for row in routed.route("docs", queries, nprobe=3)]
        for q, hits, parts, more in zip(queries, res, order, extra):
            direct = MilvusClient.search(routed, "docs", data=[q.tolist()], limit=5,
                                         output_fields=["title"], partition_names=parts)[0]
            assert_at_least_as_good(hits, direct, exact=more == 0)
            if more == 0:
                assert hits[0]["entity"]["title"] == direct[0]["entity"]["title"]
        # numpy input and adaptive nprobe (recall_target) return the same shape
        adaptive = routed.search("docs", data=queries[:6], limit=5, recall_target=0.6, max_nprobe=4)
        assert len(adaptive) == 6 and all(len(r) == 5 for r in adaptive)
        single = routed.search("docs", data=[queries[0].tolist()], limit=5)
        # the batch answer of query 0 equals its own unless the planner added clusters to it
        assert_at_least_as_good(res[0], single[0], exact=extra[0] == 0)
        assert routed.flush_query_log()
        assert routed.router_status("docs")["query_log"]["written"] == 47
        # collections without a layout pass through untouched (and, as in pymilvus,
        # a reopened milvus-lite file must load them first)
        routed.load_collection("src")
        plain = routed.search("src", data=queries[:2].tolist(), limit=3)
        assert len(plain) == 2 and len(plain[0]) == 3
        # routed insert: each row lands in the partition of its cluster
        new = fixture_data.docs[5000:5010]
        out = routed.insert("docs", [{"id": 100_000 + i, "vector": v.tolist(), "title": "new"}
                                     for i, v in enumerate(new)])
        assert out["insert_count"] == 10 and out["ids"] == list(range(100_000, 100_010))
        want = assign(report.layout, new)
        for i, p in enumerate(want):
            got = routed.query("docs", filter=f"id == {100_000 + i}", output_fields=["id"],
                               partition_names=[p])
            assert len(got) == 1
        with pytest.raises(ValueError, match="no vector field 'vector'"):
            routed.insert("docs", [{"id": 1, "title": "no vector"}])
        with pytest.raises(ValueError, match=r"shape \(1, 7\) does not match"):
            routed.search("docs", data=[[0.0] * 7], limit=1)
    finally:
        routed.close()


def assert_at_least_as_good(hits, direct, exact: bool) -> None:
    """``hits`` (IP) are a search's answer over a superset of ``direct``'s clusters: rank by
    rank at least as close; the same hits where no cluster was added (``exact``)."""
    if exact:
        assert [h["id"] for h in hits] == [h["id"] for h in direct]
    got, own = [h["distance"] for h in hits], [h["distance"] for h in direct]
    assert len(got) >= len(own)
    assert all(g >= o - 1e-5 for g, o in zip(got, own))


def test_batch_of_routed_queries_shares_requests_and_loses_no_recall(lite_uri, lite_layout,
                                                                     fixture_data, tmp_path):
    """Issue 21: a batch of 32 routed queries is planned into fewer requests than one per
    query; each query's hits are at least as good against the exact neighbours as its own
    routed search's, and exactly its own where its request adds no cluster."""
    client, report, docs = lite_layout
    client.close()
    release_lite(lite_uri)
    queries = fixture_data.queries[100:132]
    exact = np.argsort(-(queries @ docs.T), axis=1)[:, :10]          # ids are row numbers
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "models"), nprobe=4, log_rate=0)
    alone = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "models"), nprobe=4, log_rate=0,
                               batch_planning=False)
    try:
        batch = routed.search("docs", data=queries, limit=10)
        plan = routed.last_plan
        assert plan["planned"] and plan["queries"] == 32
        own = [alone.search("docs", data=[q], limit=10)[0] for q in queries]
        per_set = alone.search("docs", data=queries, limit=10)       # distinct sets, unplanned
        assert not alone.last_plan["planned"]
        assert plan["requests"] < alone.last_plan["requests"] <= 32
        for i, (hits, mine, more) in enumerate(zip(batch, own, plan["extra_clusters"])):
            assert [h["id"] for h in per_set[i]] == [h["id"] for h in mine]
            assert_at_least_as_good(hits, mine, exact=more == 0)
            truth = set(exact[i].tolist())
            r_batch = len({h["id"] for h in hits} & truth)
            r_own = len({h["id"] for h in mine} & truth)
            assert r_batch >= r_own
        assert plan["mean_extra_clusters"] > 0 and plan["predicted_ms"] < plan["per_query_ms"]
        totals = routed.router_status("docs")["batches"]
        assert totals["searches"] == 1 and totals["planned"] == 1 and totals["queries"] == 32
        assert totals["requests"] == plan["requests"] and totals["batch_planning"]
        assert totals["extra_clusters_per_query"] == pytest.approx(np.mean(plan["extra_clusters"]))
        one = routed.search("docs", data=[queries[0]], limit=10)      # one query: never planned
        assert not routed.last_plan["planned"] and routed.last_plan["requests"] == 1
        assert [h["id"] for h in one[0]] == [h["id"] for h in own[0]]
    finally:
        routed.close()
        alone.close()


def test_cold_start_routes_by_cluster_moments_on_lite(lite_uri, lite_layout, fixture_data,
                                                      tmp_path, monkeypatch):
    """Issue 20: before any router is published a laid-out collection with cluster moments is
    routed by them (the moment router), and its searches are those partitions' answers."""
    from milvus_ltr_router import serving
    from milvus_ltr_router.clustering import assign_clusters
    from milvus_ltr_router.moments import cluster_moments
    from milvus_ltr_router.router import MomentRouter
    client, report, docs = lite_layout
    stored = read_layout(client, "docs")
    if getattr(stored, "moments", None) is None:      # layouts stored without their moments
        clusters = assign_clusters(docs, stored.centroids, stored.algorithm)
        moments = cluster_moments(docs, clusters, stored.n_clusters)
        real = serving.read_layout

        def read_with_moments(c, name, *a, **k):
            layout = real(c, name, *a, **k)
            layout.moments = moments
            return layout
        monkeypatch.setattr(serving, "read_layout", read_with_moments)
    client.close()
    release_lite(lite_uri)
    queries = fixture_data.queries[:30]
    # batch planning off: each query searches exactly the clusters its router picks
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "models"), nprobe=3, log_rate=0,
                                batch_planning=False)
    try:
        status = routed.router_status("docs")
        assert status["mode"] == "moments" and status["error"] == "no router published"
        assert status["version"] is None and status["failures"] == 0
        layout = routed.layout("docs")
        assert layout.moments is not None and fallback_kind(layout) == "moments"
        want = MomentRouter(layout).rank(queries, 3)
        np.testing.assert_array_equal(routed.route("docs", queries, nprobe=3), want)
        res = routed.search("docs", data=queries.tolist(), limit=5, output_fields=["title"])
        names = layout.partition_names
        for q, hits, row in zip(queries, res, want):
            direct = MilvusClient.search(routed, "docs", data=[q.tolist()], limit=5,
                                         output_fields=["title"],
                                         partition_names=[names[c] for c in row])[0]
            assert [h["id"] for h in hits] == [h["id"] for h in direct]
        adaptive = routed.search("docs", data=queries[:4], limit=5, recall_target=0.6, max_nprobe=4)
        assert len(adaptive) == 4 and all(len(r) == 5 for r in adaptive)
    finally:
        routed.close()


def test_drop_in_errors_and_results_match_pymilvus(lite_uri, lite_layout, fixture_data, tmp_path):
    """On a laid-out collection the routed client fails where pymilvus fails, with an exception
    pymilvus code already catches (and the plugin's InputError), and returns pymilvus's types."""
    from pymilvus.exceptions import MilvusException
    from milvus_ltr_router.errors import InputError
    client, report, docs = lite_layout
    client.close()
    release_lite(lite_uri)
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "models"), nprobe=3, log_rate=0)
    try:
        q = fixture_data.queries[0]
        bad_searches = {"one 1-D vector": q.tolist(), "wrong dimension": [[0.0] * 7], "no vectors": []}
        for what, data in bad_searches.items():
            with pytest.raises(MilvusException) as plain_err:
                MilvusClient.search(routed, "docs", data=data, limit=3)
            with pytest.raises(type(plain_err.value)) as routed_err:
                routed.search("docs", data=data, limit=3)
            assert isinstance(routed_err.value, InputError), what
        with pytest.raises(MilvusException) as plain_err:
            MilvusClient.insert(routed, "docs", [{"id": 1, "title": "no vector"}])
        with pytest.raises(type(plain_err.value)):
            routed.insert("docs", [{"id": 1, "title": "no vector"}])
        assert routed.insert("docs", []) == MilvusClient.insert(routed, "docs", []) == \
            {"insert_count": 0, "ids": []}
        row = {"id": 300_000, "vector": fixture_data.docs[1].tolist(), "title": "t"}
        res = routed.insert("docs", [row])
        assert type(res) is type(MilvusClient.upsert(routed, "docs", [row]))
        assert res["insert_count"] == 1 and res["ids"] == [300_000]
        # the plugin's own parameters are keyword-only: a 10th positional argument is pymilvus's
        # (ranker), and the call passes through to pymilvus untouched
        import inspect
        params = inspect.signature(RoutedMilvusClient.search).parameters
        assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY
                   for p in ("nprobe", "recall_target", "min_nprobe", "max_nprobe"))
    finally:
        routed.close()


def test_cli_help_and_exit_codes(tmp_path):
    for args in ([], ["build-layout"], ["adopt-layout"], ["status"], ["retrain"], ["evaluate"],
                 ["rollback"], ["demo"], ["drop-layout"], ["repair-layout"]):
        out = subprocess.run([sys.executable, "-m", "milvus_ltr_router.cli", *args, "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, args
    # a mistyped milvus-lite path: refused (exit 2, the path named), no empty database created
    out = subprocess.run([sys.executable, "-m", "milvus_ltr_router.cli", "status", "--uri",
                          str(tmp_path / "x.db"), "--collection", "missing"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"milvus-lite file {tmp_path / 'x.db'} does not exist" in out.stderr
    assert not (tmp_path / "x.db").exists()


def test_retrain_cli_on_lite_bootstrap_from_query_file(lite_uri, lite_layout, fixture_data, tmp_path):
    client, report, docs = lite_layout
    client.close()
    release_lite(lite_uri)      # milvus-lite serves a file to one process at a time
    qfile = tmp_path / "q.npy"
    np.save(qfile, fixture_data.queries)
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "milvus_ltr_router.cli", "retrain", "--uri", lite_uri,
           "--collection", "docs", "--model-dir", str(models), "--queries", str(qfile),
           "--nprobe", "2", "--json", "--epochs", "30"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["decision"] == "published", result["reason"]
    assert result["n_queries"] == len(fixture_data.queries)
    centroid = {r["nprobe"]: r for r in result["table"]["centroid"]}
    learned = {r["nprobe"]: r for r in result["table"]["learned"]}
    assert set(centroid) == set(learned) and 2 in learned
    assert learned[2]["top1_accuracy"] > centroid[2]["top1_accuracy"]
    assert (models / "docs" / f"{result['version']}.onnx").exists()
    pointer = (models / "docs" / "CURRENT.json").read_bytes()
    # a retrain that must be refused: no router can gain 0.5 top-1 over the live one
    out = subprocess.run(cmd + ["--min-gain", "0.5", "--seed", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    refused = json.loads(out.stdout)
    assert refused["decision"] == "kept" and refused["version"] is None, refused["reason"]
    assert refused["baseline"] == "current" and refused["gain"] < 0.5
    assert (models / "docs" / "CURRENT.json").read_bytes() == pointer
    assert sorted(p.stem for p in (models / "docs").glob("*.onnx")) == [result["version"]]
    # bad query file: wrong dimension -> exit 2, nothing published
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((500, 7), np.float32))
    before = sorted(p.name for p in (models / "docs").glob("*"))
    out = subprocess.run(cmd[:cmd.index("--queries") + 1] + [str(bad), "--nprobe", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "dimension 7 does not match the collection's 384" in out.stderr
    assert sorted(p.name for p in (models / "docs").glob("*")) == before


def test_client_notices_a_rebuilt_layout(lite_uri, lite_layout, tmp_path):
    client, report, docs = lite_layout
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), log_rate=0,
                                reload_interval=0)
    try:
        assert routed.router_status("docs")["layout_id"] == report.layout.layout_id
        assert routed.router_status("src")["mode"] == "none"
        rebuilt = build_layout(client, "src", "docs", n_clusters=12, overwrite=True)
        status = routed.router_status("docs")
        assert status["layout_id"] == rebuilt.layout.layout_id != report.layout.layout_id
        assert status["n_partitions"] == 12
        build_layout(client, "docs", "src_laid_out", n_clusters=4)
        client.create_alias("src_laid_out", "app")
        assert routed.router_status("app")["n_partitions"] == 4     # alias resolved
    finally:
        routed.close()



def test_layout_build_options_sample_refine_balance(lite_layout):
    """Issue 16 on the build path: a sample spec, Lloyd refinement over the whole source (the
    k-means objective does not get worse), and a size bound honoured exactly."""
    from milvus_ltr_router.clustering import array_block_source, kmeans_objective
    from milvus_ltr_router.layout import cluster_sizes
    client, report, docs = lite_layout
    plain = build_layout(client, "src", "opt_plain", n_clusters=24, seed=0, sample_size="39x").layout
    refined = build_layout(client, "src", "opt_refined", n_clusters=24, seed=0, sample_size="39x",
                           refine_passes=2).layout
    blocks = array_block_source(docs)
    assert kmeans_objective(blocks, refined.centroids, "spherical") <= \
        kmeans_objective(blocks, plain.centroids, "spherical") + 1e-6     # lower is better
    balanced = build_layout(client, "src", "opt_balanced", n_clusters=24, seed=0, sample_size="all",
                            max_cluster_ratio=1.2)
    cap = int(np.ceil(1.2 * 3000 / 24))
    sizes = cluster_sizes(client, balanced.layout)
    assert sizes.max() <= cap and sizes.sum() == 3000
    np.testing.assert_array_equal(sizes, balanced.layout.sizes)
    assert read_layout(client, "opt_balanced").extra["max_cluster_ratio"] == 1.2
    with pytest.raises(LayoutError, match="max_cluster_ratio must be >= 1"):
        build_layout(client, "src", "opt_bad", n_clusters=24, max_cluster_ratio=0.5)
    with pytest.raises(LayoutError, match="sample size"):
        build_layout(client, "src", "opt_bad", n_clusters=24, sample_size="10")


@pytest.mark.parametrize("storage", ["partition", "grouped", "single"])
def test_writes_keep_one_row_per_key_on_lite(tmp_path, fixture_data, storage):
    """milvus-lite's upsert replaces a key in every partition and its delete ignores the
    partition: routed upserts (moving or not, a key twice in one batch, non-ASCII string keys)
    and repair-layout must neither lose nor duplicate rows there."""
    from pymilvus import DataType
    from milvus_ltr_router.layout import cluster_of
    from milvus_ltr_router.repair import move_stray_rows, stray_rows
    uri = str(tmp_path / "w.db")
    docs = fixture_data.docs[:400]
    client = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=docs.shape[1])
    schema.add_field("tag", DataType.VARCHAR, max_length=64)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection("src", schema=schema, index_params=params)
    client.insert("src", [{"key": f"k{i}", "vector": v.tolist(), "tag": "src"} for i, v in enumerate(docs)])
    lay = build_layout(client, "src", "docs", n_clusters=6, storage=storage, groups=3).layout
    client.close()
    release_lite(uri)
    routed = RoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), log_rate=0)
    try:
        parts = cluster_of(lay, docs)
        other = int(np.flatnonzero(parts != parts[0])[0])
        key = "café ☕ \"q\" \\ k0"
        routed.upsert("docs", {"key": key, "vector": docs[0].tolist(), "tag": "new"})
        routed.upsert("docs", {"key": key, "vector": docs[0].tolist(), "tag": "same cluster"})
        routed.upsert("docs", [{"key": key, "vector": docs[0].tolist(), "tag": "first"},
                               {"key": key, "vector": docs[other].tolist(), "tag": "last wins"}])
        routed.upsert("docs", {"key": "k0", "vector": docs[other].tolist(), "tag": "moved"})
        got = {r["key"]: r["tag"] for r in routed.query("docs", filter="key != ''", output_fields=["tag"])}
        assert len(got) == 401 and got[key] == "last wins" and got["k0"] == "moved"
        # a plain client's write around a partition layout: kept visible, then repaired
        if storage != "single":
            MilvusClient.insert(routed, "docs", [{"key": "stray", "vector": docs[3].tolist(), "tag": "s",
                                                  **({"_ltr_cluster": int(parts[3])} if storage == "grouped" else {})}])
            assert stray_rows(routed, lay) == 1
            hit = routed.search("docs", data=[docs[3].tolist()], limit=3, nprobe=1)[0]
            assert "stray" in {h["key"] for h in hit}
            assert move_stray_rows(routed, lay) == 1
            assert stray_rows(routed, lay) == 0
            got = {r["key"] for r in routed.query("docs", filter="key != ''", output_fields=["key"])}
            assert len(got) == 402 and "stray" in got
    finally:
        routed.close()
        release_lite(uri)


def test_half_written_layout_is_refused(lite_layout):
    """A reader that meets a layout collection missing some cluster rows (a build or
    --overwrite in progress, or a crash) gets a clear error instead of a partial layout."""
    client, report, docs = lite_layout
    client.delete("docs__ltr_layout", filter="cluster >= 20")
    with pytest.raises(LayoutError, match="holds 20 of the 24 clusters"):
        read_layout(client, "docs")


def test_column_io_round_trip_on_lite(tmp_path):
    """Issue 14: the parallel column writer and the column read-out (query_iterator fallback on
    milvus-lite) keep every row once, with string and dynamic values."""
    from pymilvus import DataType
    from milvus_ltr_router.columns import DYNAMIC_COLUMN
    from milvus_ltr_router.scan import iter_columns
    from milvus_ltr_router.schema import vector_index_params
    from milvus_ltr_router.writer import ParallelWriter
    uri = str(tmp_path / "cols.db")
    client = MilvusClient(uri)
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
        schema.add_field("title", DataType.VARCHAR, max_length=16)
        client.create_collection("c", schema=schema,
                                 index_params=vector_index_params(client, "vector", "IP"))
        ids = np.arange(-50, 950, dtype=np.int64) * 3
        vecs = np.random.default_rng(0).normal(size=(len(ids), 4)).astype(np.float32)
        with ParallelWriter(client, "c", writers=2, request_bytes=1000) as writer:
            writer.submit({"id": ids, "vector": vecs, "title": [f"t{i}" for i in ids],
                           DYNAMIC_COLUMN: [{"k": int(i) % 5} for i in ids]})
        assert writer.rows_written == len(ids)
        got = list(iter_columns(client, "c", ["id", "vector", "title", "*"], batch_size=128))
        gid = np.concatenate([g["id"] for g in got])
        order = np.argsort(gid)
        np.testing.assert_array_equal(gid[order], ids)
        np.testing.assert_allclose(np.concatenate([g["vector"] for g in got])[order], vecs, rtol=1e-6)
        titles = [t for g in got for t in g["title"]]
        dyn = [d for g in got for d in g[DYNAMIC_COLUMN]]
        assert all(t == f"t{k}" and d == {"k": int(k) % 5} for t, d, k in zip(titles, dyn, gid))
    finally:
        client.close()
        release_lite(uri)


def test_cluster_range_filters_cover_every_row_once():
    """Issue 14: the read-out's parts of a laid-out collection - runs of clusters by recorded
    size, big clusters split by key residue - match every (cluster id, key) exactly once, also
    cluster ids outside the layout and negative keys."""
    from milvus_ltr_router.layout import cluster_range_filters
    sizes = [3, 30, 1, 1, 0, 12, 2]
    parts = cluster_range_filters("c", sizes, 10, "id")
    assert len(parts) > 3 and any("id %" in p for p in parts)
    for c in range(-2, len(sizes) + 2):
        for key in range(-25, 25):
            hits = [p for p in parts if eval(p, {}, {"c": c, "id": key})]
            assert len(hits) == 1, (c, key, hits)
    assert cluster_range_filters("c", [50], 100) == ["c % 1 == 0"]
