"""Cluster moments stored and read with every layout (issue 20, item 1), on milvus-lite:
built, adopted, repaired and retrained layouts store them; read_layout reads them back
when they are the layout's own and ignores them otherwise."""
import dataclasses

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from milvus_ltr_router import moment_store
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import (drop_layout, moments_collection_name, read_layout,
                                      write_moments)
from milvus_ltr_router.milvus_io import release_lite
from milvus_ltr_router.moments import ClusterMoments, cluster_moments
from milvus_ltr_router.readout import iter_layout_blocks
from milvus_ltr_router.router import MomentRouter, RouterError
from milvus_ltr_router.writer import create_vector_collection


@pytest.fixture(scope="module")
def client(lite):
    c = MilvusClient(lite)
    yield c
    c.close()
    release_lite(lite)


def offline_moments(client, layout, anchors=None) -> ClusterMoments:
    """The moments of the layout's rows as they sit in its clusters, computed here."""
    vecs, parts = [], []
    for _, v, p in iter_layout_blocks(client, layout, batch_size=500):
        vecs.append(v)
        parts.append(np.broadcast_to(p, len(v)))
    return cluster_moments(np.concatenate(vecs), np.concatenate(parts), layout.n_clusters,
                           anchors=layout.centroids if anchors is None else anchors)


def assert_same_moments(got: ClusterMoments, want: ClusterMoments, queries, exact=False):
    np.testing.assert_array_equal(got.sizes, want.sizes)
    if exact:
        for k, v in want.to_arrays().items():
            np.testing.assert_array_equal(got.to_arrays()[k], v, err_msg=k)
        return
    np.testing.assert_allclose(got.means, want.means, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.variances, want.variances, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(got.residual, want.residual, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(got.spread(queries), want.spread(queries), rtol=1e-3, atol=1e-6)


def test_build_stores_the_moments_of_its_rows(client, fixture_data):
    layout = read_layout(client, "docs")
    m = layout.moments
    assert m is not None and (m.n_clusters, m.dim, m.rank) == (8, 384, 32)
    np.testing.assert_array_equal(m.sizes, layout.sizes)
    assert_same_moments(m, offline_moments(client, layout), fixture_data.queries[:300])
    meta = moment_store.read_moments_meta(client, moments_collection_name("docs"))
    assert meta["clustering_id"] == layout.clustering_id and meta["rank"] == 32
    assert meta["computed_at"] and meta["n_clusters"] == 8 and meta["dim"] == 384
    # the moment router routes with them
    route = MomentRouter(layout).partitions(fixture_data.queries[:5], 2)
    assert len(route) == 5 and all(len(r) == 2 and set(r) <= set(layout.partition_names)
                                   for r in route)
    assert read_layout(client, "docs", moments=False).moments is None


def test_single_storage_build_round_trips_and_drop_removes_them(client, fixture_data):
    report = build_layout(client, "src", "docs_single", n_clusters=6, storage="single", seed=1)
    try:
        assert report.moment_seconds > 0 and "moments" in report.seconds
        built = report.layout.moments
        layout = read_layout(client, "docs_single")
        assert_same_moments(layout.moments, built, None, exact=True)       # bit-exact
        assert_same_moments(built, offline_moments(client, layout), fixture_data.queries[:300])
        assert client.has_collection("docs_single__ltr_moments")
    finally:
        drop_layout(client, "docs_single")
    assert not client.has_collection("docs_single__ltr_moments")
    assert not client.has_collection("docs_single__ltr_layout")


def test_old_layout_without_moments_reads_with_none(client, fixture_data):
    layout = read_layout(client, "docs")
    saved = layout.moments
    client.drop_collection(moments_collection_name("docs"))
    try:
        old = read_layout(client, "docs", check_sizes=True)
        assert old.moments is None and old.layout_id == layout.layout_id
        with pytest.raises(RouterError, match="no cluster moments"):
            MomentRouter(old)
    finally:
        write_moments(client, layout, saved)
    assert_same_moments(read_layout(client, "docs").moments, saved, None, exact=True)


def test_moments_of_another_clustering_are_ignored(client, caplog):
    layout = read_layout(client, "docs")
    saved = layout.moments
    other = dataclasses.replace(layout, layout_id="other", clustering_id="other")
    write_moments(client, other, saved)
    try:
        with caplog.at_level("DEBUG", logger="milvus_ltr_router.moment_store"):
            assert read_layout(client, "docs").moments is None
        assert "of clustering other" in caplog.text
    finally:
        write_moments(client, layout, saved)
    assert read_layout(client, "docs").moments is not None
    with pytest.raises(Exception, match="do not fit layout"):
        write_moments(client, layout, ClusterMoments(saved.sizes[:3], saved.means[:3],
                                                     saved.bases[:3], saved.variances[:3],
                                                     saved.residual[:3]))


def test_pages_half_written_and_mismatched_collections(client, monkeypatch, rng):
    x = rng.standard_normal((300, 16)).astype(np.float32)
    clusters = np.arange(300) % 5
    m = cluster_moments(x, clusters, 5, rank=4)
    monkeypatch.setattr(moment_store, "rows_per_page", lambda dim, page_bytes=0: 7)
    name = "pages__ltr_moments"
    moment_store.store_moments(client, name, m, {"clustering_id": "c1"})
    try:
        assert client.query(name, filter="key >= 0", output_fields=["count(*)"])[0]["count(*)"] == 25
        got = moment_store.load_moments(client, name, "c1", 5, 16)
        assert_same_moments(got, m, None, exact=True)
        assert moment_store.load_moments(client, name, "c2", 5, 16) is None
        assert moment_store.load_moments(client, name, "c1", 6, 16) is None
        assert moment_store.load_moments(client, name, "c1", 5, 8) is None
        client.delete(name, filter="key >= 20")                 # half written
        assert moment_store.load_moments(client, name, "c1", 5, 16) is None
    finally:
        client.drop_collection(name)
    assert moment_store.load_moments(client, name, "c1", 5, 16) is None


def test_rows_per_page_stays_under_the_window_and_payload():
    assert moment_store.rows_per_page(4) == moment_store.QUERY_WINDOW
    for d in (384, 768, 1536, 4096, 32768):
        n = moment_store.rows_per_page(d)
        assert 1 <= n < moment_store.QUERY_WINDOW and n * 4 * d <= moment_store.PAGE_BYTES


def test_adopt_computes_the_moments_of_each_partition(lite_uri, fixture_data):
    from milvus_ltr_router.repair import adopt_layout
    docs = fixture_data.docs[:900]
    groups = np.arange(len(docs)) % 3
    c = MilvusClient(lite_uri)
    try:
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=docs.shape[1])
        params = c.prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        c.create_collection("pre", schema=schema, index_params=params)
        for g in range(3):
            c.create_partition("pre", f"p{g}")
            idx = np.flatnonzero(groups == g)
            c.insert("pre", [{"id": int(i), "vector": docs[i]} for i in idx], partition_name=f"p{g}")
        c.flush("pre")
        layout = adopt_layout(c, "pre")
        want = cluster_moments(docs, groups, 3, anchors=np.stack(
            [docs[groups == g].mean(axis=0) for g in range(3)]))
        assert_same_moments(layout.moments, want, fixture_data.queries[:300])
        back = read_layout(c, "pre")
        assert_same_moments(back.moments, layout.moments, None, exact=True)
    finally:
        c.close()


def test_repair_refreshes_the_moments(lite_uri, fixture_data):
    from milvus_ltr_router.repair import move_stray_rows
    docs = fixture_data.docs[:600]
    c = MilvusClient(lite_uri)
    try:
        create_vector_collection(c, "src", docs)
        layout = build_layout(c, "src", "lay", n_clusters=4, seed=0, storage="partition").layout
        c.insert("lay", [{"id": 10_000 + i, "vector": fixture_data.docs[1000 + i]} for i in range(7)])
        assert move_stray_rows(c, layout) == 7
        assert int(layout.moments.sizes.sum()) == 607
        back = read_layout(c, "lay")
        assert_same_moments(back.moments, layout.moments, None, exact=True)
        assert_same_moments(back.moments, offline_moments(c, back), fixture_data.queries[:300])
    finally:
        c.close()


def test_retrain_stores_the_refreshed_moments(client, fixture_data, tmp_path):
    from milvus_ltr_router.retrain import RetrainConfig, retrain
    layout = read_layout(client, "docs")
    saved = layout.moments
    client.drop_collection(moments_collection_name("docs"))
    qfile = tmp_path / "q.npy"
    np.save(qfile, fixture_data.queries[:400])
    cfg = RetrainConfig(collection="docs", model_dir=str(tmp_path / "models"),
                        queries_file=str(qfile), nprobe=2, max_epochs=3, dry_run=True,
                        labels="local")
    retrain(client, cfg)
    back = read_layout(client, "docs")
    assert back.moments is not None
    assert_same_moments(back.moments, saved, fixture_data.queries[:300])
