"""The routing core records into the metrics (issue 24): the routing table (router_info,
fallbacks with their reason, rows outside the layout), routed writes (rows, spilled by the
size bound, moved keys, failed rows) and the live recall sampler behind
``router_status()["live_recall"]``. No server: Milvus's layout calls are replaced."""

import numpy as np
import pytest

from milvus_ltr_router import serving
from milvus_ltr_router.export import export_router
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.metrics import NULL_METRICS, NullMetrics
from milvus_ltr_router.registry import ModelRegistry
from milvus_ltr_router.write_steps import delete_steps, run_steps
from milvus_ltr_router.writes import RoutedWrites, WriteError

N, DIM = 8, 16


def make_layout(collection="docs", layout_id="L1", extra=None):
    centroids = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return Layout(collection=collection, centroids=centroids, partition_names=partition_names_for(N),
                  sizes=np.full(N, 10, np.int64), metric="IP", algorithm="spherical", dim=DIM,
                  layout_id=layout_id, extra=dict(extra or {}))


def with_moments(layout):
    from milvus_ltr_router.clustering import assign_clusters
    from milvus_ltr_router.moments import cluster_moments
    rows = np.random.default_rng(3).standard_normal((40 * N, DIM)).astype(np.float32)
    layout.moments = cluster_moments(rows, assign_clusters(rows, layout.centroids, "spherical"),
                                     N, rank=4)
    return layout


class Recorder(NullMetrics):
    """Every recorder call, in order (a recorder as the client would be given one)."""

    enabled = True

    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name in ("fallback", "router_info", "routed_write", "rows_outside_layout", "recall",
                    "recall_audit"):
            calls = object.__getattribute__(self, "calls")
            return lambda *args: calls.append((name, *args))
        return object.__getattribute__(self, name)

    def of(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


@pytest.fixture
def table(monkeypatch, tmp_path):
    """A RoutingTable over a fake client: collection 'docs' has ``state['layout']``."""
    box = {"layout": make_layout(), "fail": False}

    def laid_out(client, name):
        if box["fail"]:
            raise ConnectionError("Milvus unreachable")
        return box["layout"].collection
    monkeypatch.setattr(serving, "laid_out_name", laid_out)
    monkeypatch.setattr(serving, "current_layout_id", lambda client, name: box["layout"].layout_id)
    monkeypatch.setattr(serving, "read_layout", lambda client, name: box["layout"])
    rec = Recorder()
    t = serving.RoutingTable(object(), ModelRegistry(tmp_path / "models"), reload_interval=0.0,
                             metrics=rec)
    return t, rec, box, ModelRegistry(tmp_path / "models")


def publish(reg, layout, version="v1"):
    w = np.random.default_rng(2).standard_normal((N, DIM)).astype(np.float32)
    path = export_router(w, None, layout, layout.collection, reg.version_path(layout.collection,
                                                                                version))
    reg.publish(layout.collection, path, version, {})
    return version


def test_default_is_the_null_recorder():
    assert serving.RoutingTable(object(), ModelRegistry("m")).metrics is NULL_METRICS
    writes = RoutedWrites(object(), submit=None, is_lite=lambda: False)
    assert writes.metrics is NULL_METRICS


@pytest.mark.parametrize("moments", [False, True])
def test_cold_start_records_a_no_router_fallback_of_the_layouts_kind(table, moments):
    t, rec, box, reg = table
    if moments:
        with_moments(box["layout"])
    state = t.state("docs")
    kind = "moments" if moments else "centroid"
    assert state.router.kind == kind
    assert rec.of("fallback") == [("docs", "no_router")]
    assert rec.of("router_info") == [("docs", None, kind, "no_router")]
    t.state("docs")                       # unchanged: nothing new recorded
    assert len(rec.calls) == 2


def test_published_router_and_each_fallback_reason(table):
    t, rec, box, reg = table
    version = publish(reg, box["layout"])
    assert t.state("docs").version == version
    assert rec.of("router_info") == [("docs", version, "learned")] and not rec.of("fallback")
    # a router made for another layout: refused, layout_mismatch
    publish(reg, make_layout(layout_id="L0"), "v2")
    state = t.state("docs")
    assert state.router.kind == "centroid" and "retrain the router" in state.error
    assert rec.of("fallback") == [("docs", "layout_mismatch")]
    assert rec.of("router_info")[-1] == ("docs", None, "centroid", "layout_mismatch")
    # a corrupt pointer: unreadable_file
    reg.pointer_path("docs").write_text("{not json")
    state = t.state("docs")
    assert "corrupt" in state.error
    assert rec.of("fallback")[-1] == ("docs", "unreadable_file")
    # a re-check that fails keeps the state and says so: milvus_error
    box["fail"] = True
    assert t.state("docs") is state
    assert rec.of("fallback")[-1] == ("docs", "milvus_error")


def test_fallback_reason():
    assert serving.fallback_reason(None) == "no_router"
    assert serving.fallback_reason(OSError("x")) == "unreadable_file"
    assert serving.fallback_reason(serving._LayoutMismatch("x")) == "layout_mismatch"


def test_rows_outside_layout_are_recorded_when_counted(table, monkeypatch):
    t, rec, box, reg = table
    state = t.state("docs")
    counts = iter([3, RuntimeError("down")])

    def stray_rows(client, layout):
        value = next(counts)
        if isinstance(value, Exception):
            raise value
        return value
    monkeypatch.setattr(serving, "has_stray_partition", lambda layout: True)
    monkeypatch.setattr(serving, "stray_rows", stray_rows)
    assert t.stray_count(state) == 3 and t.stray_count(state) == -1    # reload_interval 0
    assert rec.of("rows_outside_layout") == [("docs", 3), ("docs", -1)]


def test_a_failing_recorder_never_fails_routing(table):
    t, rec, box, reg = table

    class Broken(NullMetrics):
        enabled = True

        def fallback(self, *a):
            raise RuntimeError("metrics down")
        router_info = fallback
    t.metrics = Broken()
    assert t.state("docs").router.kind == "centroid"


# ---------------------------------------------------------------------------- routed writes
class FakeMilvus:
    """What RoutedWrites asks a client for inserts: nothing (writes go through ``write``)."""


def insert_rows(n, vecs):
    return [{"id": i, "vector": v.tolist()} for i, v in enumerate(vecs[:n])]


def writer(rec, live=None):
    w = RoutedWrites(FakeMilvus(), submit=lambda fn: fn(), is_lite=lambda: False, metrics=rec)
    if live is not None:
        w.live_cluster_sizes = lambda layout: np.asarray(live, np.int64)
    return w


def accept(calls):
    def write(collection, rows, timeout=None, partition_name=None, **kw):
        calls.append((partition_name, len(rows)))
        return {"insert_count": len(rows), "ids": [r["id"] for r in rows]}
    return write


def test_routed_insert_records_rows_and_the_rows_the_bound_spilled():
    layout = make_layout(extra={"max_cluster_ratio": 1.0})
    # 8 rows all nearest to cluster 0; 80 rows in 8 clusters, bound 1.0: capacity 11 each
    vecs = np.repeat(layout.centroids[:1], 8, axis=0) + 0.01
    rec, calls = Recorder(), []
    out = writer(rec, live=[10] * N).write("insert", accept(calls), None, "docs", layout,
                                            insert_rows(8, vecs), stray_partition=lambda: None)
    assert out["insert_count"] == 8
    assert rec.of("routed_write") == [("docs", 8, 7, 0, 0)]       # 1 fits in cluster 0
    # unbounded: nothing spills
    rec = Recorder()
    writer(rec).write("insert", accept([]), None, "docs", make_layout(), insert_rows(8, vecs),
                      stray_partition=lambda: None)
    assert rec.of("routed_write") == [("docs", 8, 0, 0, 0)]


def test_a_write_that_fails_part_way_records_the_rows_not_written():
    layout = make_layout()
    vecs = layout.centroids[[0, 0, 1, 1, 1]] + 0.01          # two partitions, 2 then 3 rows
    rec, calls = Recorder(), []
    good = accept(calls)

    def second_fails(collection, rows, **kw):
        if calls:
            raise ConnectionError("lost")
        return good(collection, rows, **kw)
    with pytest.raises(WriteError):
        writer(rec).write("insert", second_fails, None, "docs", layout, insert_rows(5, vecs),
                          stray_partition=lambda: None)
    assert rec.of("routed_write") == [("docs", 2, 0, 0, 3)]
    # nothing written: pymilvus's own error, every row failed
    rec = Recorder()

    def refuse(collection, rows, **kw):
        raise ValueError("refused")
    with pytest.raises(ValueError):
        writer(rec).write("insert", refuse, None, "docs", layout, insert_rows(5, vecs),
                          stray_partition=lambda: None)
    assert rec.of("routed_write") == [("docs", 0, 0, 0, 5)]


def test_moved_keys_are_the_keys_whose_old_copy_was_deleted():
    layout = make_layout()
    rows = [{"id": k, "vector": layout.centroids[c].tolist()} for k, c in ((1, 0), (2, 1), (3, 2))]
    clusters = np.array([0, 1, 2])
    stored = {1: {layout.partition_names[3], layout.partition_names[4]},   # moved, two old copies
              2: {layout.partition_names[1]},                              # stayed
              3: {layout.partition_names[5]}}                              # moved
    deletes = []
    moved = run_steps(delete_steps(layout, rows, clusters, stored),
                      lambda request: deletes.append(request.partition_name))
    assert moved == 2 and len(deletes) == 3


def test_metrics_off_records_nothing_and_skips_the_spill_count(monkeypatch):
    from milvus_ltr_router import writes as writes_mod
    monkeypatch.setattr(writes_mod, "nearest_clusters",
                        lambda *a: pytest.fail("counted spills with metrics off"))
    layout = make_layout(extra={"max_cluster_ratio": 1.0})
    w = RoutedWrites(FakeMilvus(), submit=lambda fn: fn(), is_lite=lambda: False)
    w.live_cluster_sizes = lambda layout: np.full(N, 10, np.int64)
    out = w.write("insert", accept([]), None, "docs", layout,
                  insert_rows(4, layout.centroids[[0, 0, 0, 0]]), stray_partition=lambda: None)
    assert out["insert_count"] == 4


# ---------------------------------------------------------------------------- live recall
def hits(ids):
    return [{"id": i, "distance": 1.0 - 0.01 * n} for n, i in enumerate(ids)]


def routing(layout=None, version="v1", router=None):
    layout = layout or make_layout()
    from milvus_ltr_router.router import CentroidRouter
    return serving.Routing(layout, router or CentroidRouter(layout), version)


def test_live_recall_off_is_free():
    live = serving.LiveRecall(0.0, lambda *a, **k: pytest.fail("searched"))
    assert not live.enabled and live.auditor is None
    assert live.offer(routing(), np.zeros((3, DIM)), [hits([1])] * 3, limit=1) == 0
    assert live.status("docs") is None and live.flush()
    live.close()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        serving.LiveRecall(1.5, None)


def test_live_recall_samples_reruns_exactly_and_reports_status():
    asked = []

    def exact(collection, vector, limit, filter, **extra):
        asked.append((collection, limit, filter, extra))
        return hits([1, 2, 3, 4])                  # the exact top-4
    rec = Recorder()
    live = serving.LiveRecall(1.0, exact, metrics=rec, seed=0)
    try:
        queries = np.ones((4, DIM), np.float32)
        served = [hits([1, 2, 3, 4]), hits([1, 2, 9, 8]), hits([1, 2, 3, 7]), hits([5, 6, 7, 8])]
        assert live.offer(routing(), queries, served, limit=4, filter="grp == 3",
                          recall_target=0.9, anns_field="vector") == 4
        assert live.flush(10)
        assert asked == [("docs", 4, "grp == 3", {"anns_field": "vector"})] * 4
        status = live.status("docs")
        assert status["sample_rate"] == 1.0 and status["done"] == 4 and status["failed"] == 0
        (est,) = status["estimates"]
        assert est["recall_target"] == 0.9 and est["k"] == 4 and est["n"] == 4
        assert est["recall"] == pytest.approx((1 + 0.5 + 0.75 + 0) / 4)
        assert [c[0] for c in rec.calls].count("recall") == 4
        # another router serves: the estimate starts again
        live.offer(routing(version="v2"), queries[:1], served[:1], limit=4, recall_target=0.9)
        assert live.flush(10)
        (est,) = live.status("docs")["estimates"]
        assert est["n"] == 1 and est["recall"] == 1.0 and est["total"] == 1
    finally:
        live.close()


def test_live_recall_never_fails_the_search(caplog):
    def exact(*a, **k):
        raise ConnectionError("Milvus down")
    live = serving.LiveRecall(1.0, exact, seed=0)
    try:
        assert live.offer(routing(), np.ones((2, DIM)), [hits([1])] * 2, limit=1) == 2
        assert live.offer(routing(), np.ones((2, DIM)), None, limit=1) == 0   # broken input
        assert live.flush(10)
        status = live.status("docs")
        assert status["failed"] == 2 and "Milvus down" in status["last_error"]
    finally:
        live.close()


def test_router_status_carries_live_recall():
    state = routing()
    out = serving.routing_status(state, nprobe=2, balance=None, rows_outside_layout=0,
                                 query_log={})
    assert out["live_recall"] is None
    out = serving.routing_status(state, nprobe=2, balance=None, rows_outside_layout=0,
                                 query_log={}, live_recall={"done": 1})
    assert out["live_recall"] == {"done": 1}


def test_every_router_kind_is_a_label_value():
    prom = pytest.importorskip("prometheus_client")
    from milvus_ltr_router import metrics as m
    registry = prom.CollectorRegistry()
    rec = m.metrics_recorder(registry)
    for kind in ("learned", "moments", "learned-moments", "centroid"):
        rec.search_routed("docs", 2, [1, 2], 0.001, 0.01, kind)
        assert registry.get_sample_value("milvus_ltr_router_routed_queries_total",
                                         {"collection": "docs", "router": kind}) == 2
    rec.router_info("docs", None, "moments", "no_router")
    assert registry.get_sample_value("milvus_ltr_router_router_info", {
        "collection": "docs", "version": "", "kind": "moments",
        "fallback_reason": "no_router"}) == 1


def test_routing_table_and_live_recall_on_lite(lite_uri, fixture_data, tmp_path):
    """The wiring against a real (embedded) Milvus: a built layout's cold start is recorded
    as its moments serving, and sampled searches re-run exactly give their true recall."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.writer import create_vector_collection
    docs = fixture_data.docs[:1500]
    client = MilvusClient(lite_uri)
    try:
        create_vector_collection(client, "src", docs)
        build_layout(client, "src", "docs", n_clusters=8, seed=0)
        rec = Recorder()
        t = serving.RoutingTable(client, ModelRegistry(tmp_path / "models"), metrics=rec)
        state = t.state("docs")
        kind = serving.fallback_kind(state.layout)
        assert rec.of("router_info") == [("docs", None, kind, "no_router")]
        assert t.stray_count(state) == 0 and rec.of("rows_outside_layout") == [("docs", 0)]

        def exact(collection, vector, limit, filter, **extra):
            return client.search(collection, data=[vector.tolist()], limit=limit, filter=filter,
                                 **extra)[0]
        live = serving.LiveRecall(1.0, exact, metrics=rec, seed=0)
        try:
            queries = fixture_data.queries[:20]
            names = state.layout.partition_names
            served = [client.search("docs", data=[q.tolist()], limit=10,
                                    partition_names=[names[c] for c in row])[0]
                      for q, row in zip(queries, state.router.rank(queries, 2))]
            assert live.offer(state, queries, served, limit=10) == 20
            assert live.flush(60)
            (est,) = live.status("docs")["estimates"]
            truth = np.argsort(-(queries @ docs.T), axis=1)[:, :10]    # ids are row numbers
            want = np.mean([len({h["id"] for h in s} & set(top.tolist())) / 10
                            for s, top in zip(served, truth)])
            assert est["n"] == 20 and est["recall"] == pytest.approx(want)
            assert 0 < est["recall"] < 1 and est["lower"] <= est["recall"] <= est["upper"]
        finally:
            live.close()
    finally:
        client.close()
