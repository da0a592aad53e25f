"""Issue 3 on a real Milvus server: build, read back, adopt, alias, bad input."""
import numpy as np
import pytest

from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import LayoutError, cluster_of, drop_layout, layout_collection_name, read_layout
from milvus_ltr_router.repair import adopt_layout
from milvus_ltr_router.readout import iter_layout_blocks
from milvus_ltr_router.milvus_io import CollectionError
from milvus_ltr_router.scan import iter_rows
from milvus_ltr_router.writer import create_vector_collection


def test_layout_round_trip_on_real_vectors(client, wordnet_source, wordnet_layout, fixture_data):
    built = wordnet_layout.layout
    assert wordnet_layout.rows == 20_000 and built.n_partitions == 64
    layout = read_layout(client, built.collection, check_sizes=True)
    # centroids and metadata round-trip bit-exact through Milvus
    assert layout.centroids.dtype == np.float32
    np.testing.assert_array_equal(layout.centroids, built.centroids)
    assert (layout.layout_id, layout.algorithm, layout.metric, layout.dim) == \
        (built.layout_id, "spherical", "IP", 384)
    assert layout.partition_names == sorted(layout.partition_names)
    assert int(layout.sizes.sum()) == 20_000
    # every row sits in its own cluster under the layout's rule
    seen_ids = []
    for ids, vecs, part in iter_layout_blocks(client, layout):
        np.testing.assert_array_equal(cluster_of(layout, vecs), np.broadcast_to(part, len(vecs)))
        np.testing.assert_array_equal(vecs, fixture_data.docs[(ids - 3) // 7])
        seen_ids.append(ids)
    seen = np.sort(np.concatenate(seen_ids))
    np.testing.assert_array_equal(seen, np.arange(20_000) * 7 + 3)
    # same ids and scalar values as the source
    fields = ["id", "title", "grp", "weight"]
    src = {r["id"]: r for b in iter_rows(client, wordnet_source, fields) for r in b}
    dst = {r["id"]: r for b in iter_rows(client, built.collection, fields) for r in b}
    assert src.keys() == dst.keys()
    assert all(src[k] == dst[k] for k in src)


def test_alias_switch_and_read_through_alias(client, wordnet_layout, unique_name):
    from milvus_ltr_router.layout import point_alias
    alias = unique_name("app")
    point_alias(client, alias, wordnet_layout.layout.collection)
    try:
        assert read_layout(client, alias).layout_id == wordnet_layout.layout.layout_id
    finally:
        client.drop_alias(alias)


def test_adopt_mode_reproduces_partition_means(client, fixture_data, unique_name):
    name = unique_name("adopt")
    docs = fixture_data.docs[:4000]
    create_vector_collection(client, name, docs[:0 + 1])      # schema only; row 0 goes to _default
    client.delete(name, filter="id >= 0")
    groups = np.arange(len(docs)) % 5
    for g in range(5):
        client.create_partition(name, f"cluster_{g}")
        rows = [{"id": int(i), "vector": docs[i].tolist()} for i in np.flatnonzero(groups == g)]
        client.insert(name, rows, partition_name=f"cluster_{g}")
    client.flush(name)
    try:
        layout = adopt_layout(client, name, algorithm="kmeans")
        assert layout.partition_names == [f"cluster_{g}" for g in range(5)]
        want = np.stack([docs[groups == g].astype(np.float64).mean(0) for g in range(5)])
        np.testing.assert_allclose(layout.centroids, want.astype(np.float32), rtol=1e-6, atol=1e-6)
        back = read_layout(client, name)
        np.testing.assert_array_equal(back.centroids, layout.centroids)
        np.testing.assert_array_equal(back.sizes, [800] * 5)
        with pytest.raises(LayoutError, match="already has a layout"):
            adopt_layout(client, name)
    finally:
        drop_layout(client, name)


def test_bad_input_is_refused_and_source_untouched(client, wordnet_source, wordnet_layout,
                                                  unique_name, fixture_data):
    with pytest.raises(CollectionError, match="unknown collection"):
        build_layout(client, unique_name("missing"), unique_name("t"))
    with pytest.raises(LayoutError, match="already exists"):
        build_layout(client, wordnet_source, wordnet_layout.layout.collection)
    with pytest.raises(LayoutError, match="rootCoord.maxPartitionNum"):
        build_layout(client, wordnet_source, unique_name("t"), n_clusters=2000, storage="partition")
    empty = unique_name("empty")
    create_vector_collection(client, empty, fixture_data.docs[:1])
    client.delete(empty, filter="id >= 0")
    client.flush(empty)
    try:
        with pytest.raises(LayoutError, match="is empty"):
            build_layout(client, empty, unique_name("t"))
    finally:
        client.drop_collection(empty)
    # the source is still whole
    from milvus_ltr_router.milvus_io import count_rows
    assert count_rows(client, wordnet_source) == 20_000
    assert not client.has_collection(layout_collection_name(wordnet_source))


def test_metric_found_through_a_custom_index_name(client, unique_name):
    """describe_index takes the index *name* on a server: a custom name must not make the metric
    silently default to IP (issue 13)."""
    from pymilvus import DataType, MilvusClient
    from milvus_ltr_router.schema import describe
    name = unique_name("idx")
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("emb", DataType.FLOAT_VECTOR, dim=8)
    params = client.prepare_index_params()
    params.add_index(field_name="emb", index_name="my_custom_idx", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=params)
    try:
        assert describe(client, name).metric == "L2"
    finally:
        client.drop_collection(name)


def test_column_scan_and_parallel_writes_keep_every_row_once(client, unique_name):
    """Issue 14: the column-wise read-out (independent requests by key residue) and the parallel
    writer, on keys that are negative, strided and huge, with string and dynamic fields; then a
    build through them keeps every row exactly once with all its values."""
    from pymilvus import DataType, MilvusClient
    from milvus_ltr_router.columns import DYNAMIC_COLUMN
    from milvus_ltr_router.scan import iter_columns, plan_scan
    from milvus_ltr_router.schema import vector_index_params
    from milvus_ltr_router.writer import ParallelWriter
    name = unique_name("cols")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("title", DataType.VARCHAR, max_length=32)
    client.create_collection(name, schema=schema, index_params=vector_index_params(client, "vector", "IP"))
    ids = np.concatenate([np.arange(-300, 0), np.arange(0, 16_000, 8), 10**12 + np.arange(500)])
    vecs = np.random.default_rng(1).normal(size=(len(ids), 8)).astype(np.float32)
    titles = [f"t{i}" for i in ids]
    try:
        with ParallelWriter(client, name, writers=3, request_bytes=4000) as writer:   # ~90-row requests
            writer.submit({"id": ids, "vector": vecs, "title": titles,
                           DYNAMIC_COLUMN: [{"twice": int(i) * 2} for i in ids]})
        assert writer.rows_written == len(ids)
        # residue parts hold at most twice their share even when keys come in strides of 8
        parts = plan_scan(client, name, "id", rows_per_request=100)
        counts = [client.query(name, filter=p, output_fields=["count(*)"],
                               consistency_level="Strong")[0]["count(*)"] for p in parts]
        assert sum(counts) == len(ids) and max(counts) <= 200
        got = list(iter_columns(client, name, ["id", "vector", "title", "*"], batch_size=300, readers=3))
        gid = np.concatenate([g["id"] for g in got])
        assert len(gid) == len(ids) and len(np.unique(gid)) == len(ids)
        pos = {int(k): i for i, k in enumerate(ids)}
        for g in got:
            idx = [pos[int(k)] for k in g["id"]]
            np.testing.assert_array_equal(g["vector"], vecs[idx])
            assert g["title"] == [titles[i] for i in idx]
            assert g[DYNAMIC_COLUMN] == [{"twice": int(k) * 2} for k in g["id"]]
        # a build through the parallel writer: same rows, values and dynamic fields in the target
        target = unique_name("cols_ivf")
        report = build_layout(client, name, target, n_clusters=7, batch_size=500, writers=3,
                              request_bytes=5000)
        try:
            assert report.rows == len(ids) and int(report.layout.sizes.sum()) == len(ids)
            fields = ["id", "title", "twice"]
            src = {r["id"]: r for b in iter_rows(client, name, fields) for r in b}
            dst = {r["id"]: r for b in iter_rows(client, target, fields) for r in b}
            assert len(dst) == len(ids) and src == dst
            layout = read_layout(client, target, check_sizes=True)
            seen = np.concatenate([b[0] for b in iter_layout_blocks(client, layout, batch_size=400)])
            assert np.array_equal(np.sort(seen), np.sort(ids))
        finally:
            drop_layout(client, target)
    finally:
        client.drop_collection(name)
