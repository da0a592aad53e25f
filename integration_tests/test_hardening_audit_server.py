"""Issue 13 audit, on the real server where findings 1, 2 and 10 were made.

1. Writes keep one row per primary key as plain ``MilvusClient`` code sees it (count(*),
   partition-restricted queries, plain searches with the old vector), and a routed write that
   fails part-way reports exactly which rows and partitions landed.
2. A row written around a partition layout is counted by ``router_status`` and ``status``,
   found by routed searches at nprobe 1 and with ``recall_target``, named by retrain (which
   labels the layout's clusters only) and moved by ``repair-layout``.
10. NaN/inf and 3-D query lists through the routed client; ``clone_schema`` says what the
   laid-out copy drops.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException, ParamError

from milvus_ltr_router.client import RoutedMilvusClient, WriteError
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import cluster_of, drop_layout
from milvus_ltr_router.writer import create_vector_collection

N_DOCS = 2000
N_CLUSTERS = 8
STRONG = {"consistency_level": "Strong"}


@pytest.fixture(scope="module")
def part_layout(milvus_server, fixture_data):
    """2,000 real MiniLM vectors with a short VARCHAR ``title``, one partition per cluster."""
    client = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    tag = uuid.uuid4().hex[:6]
    source, target = f"audit_src_{tag}", f"audit_part_{tag}"
    docs = fixture_data.docs[:N_DOCS]
    create_vector_collection(client, source, docs, ids=np.arange(N_DOCS),
                             scalars={"title": [f"d{i:05d}" for i in range(N_DOCS)]})
    layout = build_layout(client, source, target, n_clusters=N_CLUSTERS, storage="partition",
                          seed=0).layout
    yield layout
    drop_layout(client, target)
    client.drop_collection(source)
    client.close()


def plain(milvus_server) -> MilvusClient:
    return MilvusClient(uri=milvus_server.uri, token=milvus_server.token)


def routed(milvus_server, model_dir, **kwargs) -> RoutedMilvusClient:
    return RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                              model_dir=str(model_dir), log_rate=0, **kwargs)


def count(client, collection: str) -> int:
    return int(client.query(collection, filter="", output_fields=["count(*)"], **STRONG)[0]["count(*)"])


def partitions_holding(client, layout, key: int) -> list[str]:
    """Every partition (the layout's and _default) that holds a row with ``key``."""
    return [p for p in layout.storage.partitions + ["_default"]
            if client.query(layout.collection, filter=f"id == {key}", output_fields=["id"],
                            partition_names=[p], **STRONG)]


def three_clusters_in_three_partitions(layout, docs):
    parts = cluster_of(layout, docs)
    clusters = list(dict.fromkeys(int(p) for p in parts))[:3]
    assert len({layout.storage.write_partition(c) for c in clusters}) == 3
    return [(c, layout.storage.write_partition(c), docs[np.flatnonzero(parts == c)[0]])
            for c in clusters]


# ----------------------------------------------------------------------------- finding 1
def test_moving_upserts_leave_no_stale_row_for_plain_clients(milvus_server, part_layout,
                                                             fixture_data, tmp_path):
    """The finding: count(*) grew by 2, partition-restricted queries found the key in both
    partitions, and plain searches with the old vector returned the stale row."""
    lay = part_layout
    (a, part_a, va), (b, part_b, vb), _ = three_clusters_in_three_partitions(lay, fixture_data.docs)
    keys = [9_000_001, 9_000_002, 9_000_003]
    app, raw = routed(milvus_server, tmp_path / "none"), plain(milvus_server)
    try:
        before = count(raw, lay.collection)
        app.insert(lay.collection, [{"id": k, "vector": va.tolist(), "title": "old"} for k in keys])
        app.upsert(lay.collection, {"id": keys[0], "vector": vb.tolist(), "title": "new"})  # one row
        app.upsert(lay.collection, [{"id": k, "vector": vb.tolist(), "title": "new"}        # a batch
                                    for k in keys[1:]])
        assert count(raw, lay.collection) == before + 3
        for k in keys:
            assert partitions_holding(raw, lay, k) == [part_b], k
        hits = raw.search(lay.collection, data=[va.tolist()], limit=50, output_fields=["title"],
                          **STRONG)[0]
        assert not [h for h in hits if h["id"] in keys and h["entity"]["title"] == "old"]
        moved = raw.search(lay.collection, data=[vb.tolist()], limit=50, output_fields=["title"],
                           partition_names=[part_b], **STRONG)[0]
        assert {h["id"] for h in moved if h["entity"]["title"] == "new"} >= set(keys)
        app.delete(lay.collection, ids=keys)
        assert count(raw, lay.collection) == before
    finally:
        app.close()
        raw.close()


def test_a_write_failing_in_a_later_partition_reports_exactly_what_landed(
        milvus_server, part_layout, fixture_data, tmp_path):
    """Rows for three partitions; the second partition's request is refused by the server (a
    title longer than the VARCHAR's max_length). The first partition's rows landed, the rest
    did not, and the WriteError says so; with the refused request first, nothing landed and
    the caller sees pymilvus's own exception."""
    lay = part_layout
    (a, part_a, va), (b, part_b, vb), (c, part_c, vc) = \
        three_clusters_in_three_partitions(lay, fixture_data.docs)
    too_long = "x" * 64
    app, raw = routed(milvus_server, tmp_path / "none"), plain(milvus_server)
    k1, k2, k3, k4 = 9_100_001, 9_100_002, 9_100_003, 9_100_004
    try:
        before = count(raw, lay.collection)
        rows = [{"id": k1, "vector": va.tolist(), "title": "ok"},
                {"id": k2, "vector": vb.tolist(), "title": too_long},
                {"id": k3, "vector": vc.tolist(), "title": "ok"}]
        with pytest.raises(WriteError) as info:
            app.insert(lay.collection, rows)
        err = info.value
        assert err.written == 1 and err.partitions_done == [part_a]
        assert f"failed at partition {part_b!r} after 1 of 3 rows were written" in str(err)
        assert isinstance(err.__cause__, MilvusException)
        assert count(raw, lay.collection) == before + 1
        assert partitions_holding(raw, lay, k1) == [part_a]
        assert partitions_holding(raw, lay, k2) == [] and partitions_holding(raw, lay, k3) == []

        # the refused request first: nothing written, pymilvus's exception unchanged
        with pytest.raises(MilvusException) as info:
            app.insert(lay.collection, [rows[1], {"id": k4, "vector": va.tolist(), "title": "ok"}])
        assert not isinstance(info.value, WriteError)
        assert count(raw, lay.collection) == before + 1 and partitions_holding(raw, lay, k4) == []

        # an upsert that fails part-way still leaves one row per key: k1 (stored in a) moving
        # to b is refused, so its old row stays; k4 lands in a
        with pytest.raises(WriteError) as info:
            app.upsert(lay.collection, [{"id": k4, "vector": va.tolist(), "title": "ok"},
                                        {"id": k1, "vector": vb.tolist(), "title": too_long}])
        assert info.value.written == 1 and info.value.partitions_done == [part_a]
        assert partitions_holding(raw, lay, k1) == [part_a] and partitions_holding(raw, lay, k4) == [part_a]
        assert count(raw, lay.collection) == before + 2

        # k1 (stored in a) moves to c, which is written; then the request for b is refused:
        # k1's old copy in a is still deleted (one row per key for the keys that moved)
        k5 = 9_100_005
        with pytest.raises(WriteError) as info:
            app.upsert(lay.collection, [{"id": k1, "vector": vc.tolist(), "title": "ok"},
                                        {"id": k5, "vector": vb.tolist(), "title": too_long}])
        assert info.value.written == 1 and info.value.partitions_done == [part_c]
        assert partitions_holding(raw, lay, k1) == [part_c]
        assert partitions_holding(raw, lay, k5) == []
        assert count(raw, lay.collection) == before + 2
        app.delete(lay.collection, ids=[k1, k4])
        assert count(raw, lay.collection) == before
    finally:
        app.close()
        raw.close()


# ----------------------------------------------------------------------------- finding 2
def test_rows_written_around_the_layout_are_counted_searched_labelled_and_moved(
        milvus_server, part_layout, fixture_data, tmp_path, caplog, capsys):
    pytest.importorskip("torch")
    from milvus_ltr_router.cli import main as cli_main
    from milvus_ltr_router.retrain import RetrainConfig, retrain
    lay = part_layout
    vec = fixture_data.queries[11]
    key = 9_200_001
    raw = plain(milvus_server)
    raw.insert(lay.collection, [{"id": key, "vector": vec.tolist(), "title": "stray"}])
    raw.flush(lay.collection)
    models = tmp_path / "models"
    try:
        assert partitions_holding(raw, lay, key) == ["_default"]
        # retrain names the stray rows (labelling reads the layout's clusters only) and publishes
        qfile = tmp_path / "q.npy"
        np.save(qfile, fixture_data.queries[:300])
        with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.retrain"):
            result = retrain(raw, RetrainConfig(collection=lay.collection, model_dir=str(models),
                                                queries_file=str(qfile), nprobe=2, min_gain=-1.0,
                                                max_epochs=2, min_queries=100))
        assert result.decision == "published" and result.rows_outside_layout == 1
        assert "1 rows of" in caplog.text and "repair-layout" in caplog.text

        app = routed(milvus_server, models, reload_interval=0.5)
        try:
            status = app.router_status(lay.collection)
            # the published router serves (whichever kind won the gate)
            assert status["mode"] == result.training["router_kind"] != "centroid"
            assert status["rows_outside_layout"] == 1
            for kwargs in ({"nprobe": 1}, {"recall_target": 0.95}, {"nprobe": N_CLUSTERS}):
                hits = app.search(lay.collection, data=[vec.tolist()], limit=3, **kwargs, **STRONG)[0]
                assert key in [h["id"] for h in hits], kwargs
            capsys.readouterr()
            assert cli_main(["status", "--uri", milvus_server.uri, "--collection", lay.collection,
                             "--model-dir", str(models), "--json"]) == 0
            out = capsys.readouterr()
            assert json.loads(out.out)["rows_outside_layout"] == 1
            assert "warning: 1 rows of" in out.err and "repair-layout" in out.err
            assert cli_main(["repair-layout", "--uri", milvus_server.uri,
                             "--collection", lay.collection]) == 0
            raw.flush(lay.collection)
            cluster = int(cluster_of(lay, vec[None])[0])
            assert partitions_holding(raw, lay, key) == [lay.partition_names[cluster]]
            # re-counted every reload interval (a count read just after the delete may lag:
            # until it reaches 0, searches keep including _default, the safe side)
            deadline = time.monotonic() + 30
            while app.router_status(lay.collection)["rows_outside_layout"] != 0:
                assert time.monotonic() < deadline, "rows_outside_layout never went back to 0"
                time.sleep(0.2)
            hits = app.search(lay.collection, data=[vec.tolist()], limit=3, nprobe=1, **STRONG)[0]
            assert hits[0]["id"] == key        # its own cluster is the query's nearest centroid
        finally:
            app.delete(lay.collection, ids=[key])
            app.close()
    finally:
        raw.close()


# ----------------------------------------------------------------------------- finding 10
@pytest.mark.filterwarnings("error::RuntimeWarning")     # no numpy warning per NaN search
def test_non_finite_and_3d_queries_through_the_routed_client(milvus_server, part_layout,
                                                             fixture_data, tmp_path):
    """NaN/inf rows are searched as pymilvus searches them (no exception, one result row per
    query) and never logged; a 3-D list names its shape, not 'dim 384 ... dim=384'."""
    lay = part_layout
    good = fixture_data.queries[20]
    nan_row, inf_row = np.full(lay.dim, np.nan), np.full(lay.dim, np.inf)
    app = RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                             model_dir=str(tmp_path / "none"), log_rate=1.0, nprobe=2)
    try:
        data = [nan_row.tolist(), good.tolist(), inf_row.tolist()]
        res = app.search(lay.collection, data=data, limit=5)
        assert len(res) == 3 and len(res[1]) == 5
        raw_res = MilvusClient.search(app, lay.collection, data=data, limit=5)
        assert [len(r) for r in res] <= [len(r) for r in raw_res]   # nothing pymilvus lacks
        res = app.search(lay.collection, data=data, limit=5, recall_target=0.9)
        assert len(res) == 3 and len(res[1]) == 5
        assert app.flush_query_log(60)
        stats = app.router_status(lay.collection)["query_log"]
        assert stats["submitted"] == 6 and stats["written"] == 2 and stats["non_finite"] == 4
        with pytest.raises(ParamError) as info:
            app.search(lay.collection, data=[[good.tolist()]], limit=5)
        assert f"shape (1, 1, {lay.dim})" in str(info.value)
        assert f"dimension {lay.dim} do not match" not in str(info.value)
    finally:
        app.close()
        from milvus_ltr_router.querylog import log_collection_name
        raw = plain(milvus_server)
        try:
            if raw.has_collection(log_collection_name(lay.collection)):
                raw.drop_collection(log_collection_name(lay.collection))
        finally:
            raw.close()


def test_clone_schema_says_what_the_laid_out_copy_drops(milvus_server, fixture_data, caplog):
    """auto_id, default values, the partition key and scalar indexes are not carried into the
    layout's copy:
    the build says so, field by field (it used to drop them silently)."""
    from pymilvus import DataType
    client = plain(milvus_server)
    tag = uuid.uuid4().hex[:6]
    source, target = f"audit_schema_{tag}", f"audit_schema_ivf_{tag}"
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=fixture_data.docs.shape[1])
    schema.add_field("hits", DataType.INT64, default_value=7)
    schema.add_field("tenant", DataType.INT64, is_partition_key=True)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    params.add_index(field_name="hits", index_type="STL_SORT", index_name="hits_idx")
    client.create_collection(source, schema=schema, index_params=params)
    try:
        client.insert(source, [{"vector": v.tolist(), "hits": i, "tenant": i % 3}
                               for i, v in enumerate(fixture_data.docs[:300])])
        client.flush(source)
        with caplog.at_level(logging.WARNING):
            build_layout(client, source, target, n_clusters=4, seed=0)
        text = caplog.text
        assert f"the laid-out copy of {source!r} does not keep" in text
        for what in ("auto_id on 'id'", "default value of 'hits'", "partition key 'tenant'",
                     "scalar index 'hits_idx'"):
            assert what in text, what
        assert client.query(target, filter="", output_fields=["count(*)"],
                            **STRONG)[0]["count(*)"] == 300
    finally:
        if client.has_collection(target):
            drop_layout(client, target)
        client.drop_collection(source)
        client.close()


def test_half_written_layout_is_refused_on_the_server(milvus_server, part_layout, tmp_path):
    """Finding 10: a reader during ``--overwrite`` (layout rows still being inserted) read and
    cached a partial layout. Runs last in this module: it breaks the module's layout."""
    from milvus_ltr_router.layout import LayoutError, layout_collection_name, read_layout
    lay = part_layout
    raw = plain(milvus_server)
    try:
        assert read_layout(raw, lay.collection).n_partitions == N_CLUSTERS
        raw.delete(layout_collection_name(lay.collection), filter=f"cluster >= {N_CLUSTERS - 2}")
        deadline = time.monotonic() + 30
        while True:         # the delete becomes visible to default-consistency reads shortly
            try:
                read_layout(raw, lay.collection)
            except LayoutError as exc:
                message = str(exc)
                break
            assert time.monotonic() < deadline, "a half-written layout was read as whole"
            time.sleep(0.2)
        assert f"holds {N_CLUSTERS - 2} of the {N_CLUSTERS} clusters" in message
        app = routed(milvus_server, tmp_path / "none")
        try:
            with pytest.raises(LayoutError, match="half-written"):
                app.search(lay.collection, data=[[0.1] * lay.dim], limit=3)
            with pytest.raises(LayoutError, match="half-written"):     # nothing partial cached
                app.router_status(lay.collection)
        finally:
            app.close()
    finally:
        raw.close()


@pytest.mark.parametrize("storage", ["single", "grouped"])
def test_field_modes_refuse_a_plain_write_without_the_cluster_field(milvus_server, fixture_data,
                                                                    tmp_path, storage):
    """README: "In the field modes a plain MilvusClient cannot write a row around the layout
    (Milvus refuses a row without ``_ltr_cluster``)"; in grouped storage a plain row that does
    carry the field lands in _default, where routed searches still find it."""
    from milvus_ltr_router.storage import CLUSTER_FIELD
    raw = plain(milvus_server)
    tag = uuid.uuid4().hex[:6]
    source, target = f"audit_fm_src_{tag}", f"audit_fm_{storage}_{tag}"
    create_vector_collection(raw, source, fixture_data.docs[:600])
    try:
        lay = build_layout(raw, source, target, n_clusters=6, storage=storage,
                           groups=3 if storage == "grouped" else None, seed=0).layout
        assert lay.storage.mode == storage and lay.storage.cluster_field == CLUSTER_FIELD
        before = count(raw, target)
        vec = fixture_data.queries[30]
        with pytest.raises(MilvusException):
            raw.insert(target, [{"id": 7_000_001, "vector": vec.tolist()}])
        assert count(raw, target) == before
        if storage == "grouped":
            cluster = int(cluster_of(lay, vec[None])[0])      # e.g. a row copied with its id
            raw.insert(target, [{"id": 7_000_002, "vector": vec.tolist(), CLUSTER_FIELD: cluster}])
            raw.flush(target)
            app = routed(milvus_server, tmp_path / "none")
            try:
                assert app.router_status(target)["rows_outside_layout"] == 1
                hits = app.search(target, data=[vec.tolist()], limit=3, nprobe=1, **STRONG)[0]
                assert 7_000_002 in [h["id"] for h in hits]
            finally:
                app.close()
    finally:
        drop_layout(raw, target)
        raw.drop_collection(source)
        raw.close()
