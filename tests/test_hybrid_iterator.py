"""Routed hybrid_search, search_iterator and range search on milvus-lite; pass-throughs said once."""
import asyncio
import warnings

import numpy as np
import pytest
from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import MilvusException

from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.milvus_io import release_lite
from milvus_ltr_router.routed_calls import HybridSearchUnsupported, check_hybrid_support, \
    hybrid_reason, plan_hybrid, take_rows
from milvus_ltr_router.writer import create_vector_collection

NPROBE = 3


@pytest.fixture(scope="module")
def lite_docs(tmp_path_factory, fixture_data):
    """'src' (2,000 MiniLM documents) laid out as 'docs' (16 clusters, partition storage) and
    'docs_single' (12 clusters, single storage)."""
    uri = str(tmp_path_factory.mktemp("hybrid_lite") / "h.db")
    client = MilvusClient(uri)
    docs = fixture_data.docs[:2000]
    create_vector_collection(client, "src", docs)
    layouts = {"docs": build_layout(client, "src", "docs", n_clusters=16, seed=0).layout,
               "docs_single": build_layout(client, "src", "docs_single", n_clusters=12, seed=0,
                                           storage="single").layout}
    client.close()
    release_lite(uri)
    yield uri, layouts
    release_lite(uri)


@pytest.fixture
def routed(lite_docs, tmp_path):
    uri, layouts = lite_docs
    client = RoutedMilvusClient(uri, model_dir=str(tmp_path / "models"), nprobe=NPROBE, log_rate=0)
    for name in layouts:
        client.load_collection(name)        # plain searches may come first in a test
    yield client, layouts
    client.close()


def ids(result):
    return [[h["id"] for h in hits] for hits in result]


def dense(queries, layout, limit=10, filter=None):
    return AnnSearchRequest(np.asarray(queries).tolist(), layout.vector_field,
                            {"metric_type": layout.metric, "params": {}}, limit,
                            **({"expr": filter} if filter else {}))


@pytest.mark.parametrize("collection", ["docs", "docs_single"])
def test_hybrid_search_with_one_dense_request_returns_the_routed_search(routed, fixture_data,
                                                                        collection):
    client, layouts = routed
    layout = layouts[collection]
    queries = fixture_data.queries[:12]
    client.batch_planning = False        # each query searches exactly its own clusters
    for ranker in (RRFRanker(), WeightedRanker(1.0)):
        hybrid = client.hybrid_search(collection, [dense(queries, layout)], ranker, limit=10)
        searched = client.search(collection, queries.tolist(), limit=10)
        assert ids(hybrid) == ids(searched)
    # each query's hits lie in its routed clusters: the same as a search of only those
    probed = client.route(collection, queries)
    for q, clusters in zip(queries, probed):
        parts, expr = layout.storage.search_target(clusters)
        own = MilvusClient.search(client, collection, [q.tolist()], limit=10,
                                  partition_names=parts, filter=expr)
        one = client.hybrid_search(collection, [dense([q], layout)], RRFRanker(), limit=10)
        assert ids(one) == ids(own)
    # an explicit nprobe is honoured, and the whole collection at nprobe = L
    full = MilvusClient.hybrid_search(client, collection, [dense(queries[:3], layout)],
                                      RRFRanker(), limit=10)
    assert ids(client.hybrid_search(collection, [dense(queries[:3], layout)], RRFRanker(),
                                    limit=10, nprobe=layout.n_clusters)) == ids(full)
    assert client.router_status(collection)["passthrough"] == {}


def test_hybrid_search_keeps_the_callers_filter_and_passes_partition_names(routed, fixture_data):
    client, layouts = routed
    layout = layouts["docs_single"]
    q = fixture_data.queries[:2]
    hits = client.hybrid_search("docs_single", [dense(q, layout, filter="id < 1000")], RRFRanker(),
                                limit=10)
    plain = client.search("docs_single", q.tolist(), limit=10, filter="id < 1000")
    assert ids(hits) == ids(plain) and all(i < 1000 for row in ids(hits) for i in row)
    # partition_names: the caller's choice, passed through untouched (as search: not warned,
    # and not looked up, so not counted per collection)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client.hybrid_search("docs_single", [dense(q, layout)], RRFRanker(), limit=5,
                             partition_names=["_default"])
    assert client.router_status("docs_single")["passthrough"] == {}


def test_cluster_filter_pins_the_clusters_said_once(routed, fixture_data):
    client, layouts = routed
    layout = layouts["docs_single"]
    q = fixture_data.queries[:1].tolist()
    expr = f"{layout.storage.cluster_field} in [0, 1]"
    plain = MilvusClient.search(client, "docs_single", q, limit=10, filter=expr)
    assert len(plain[0]) == 10
    with pytest.warns(RuntimeWarning, match="cluster_filter"):
        pinned = client.search("docs_single", q, limit=10, filter=expr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # once
        client.search("docs_single", q, limit=10, filter=expr)
    assert ids(pinned) == ids(plain)
    with pytest.warns(RuntimeWarning, match="hybrid_search.*cluster_filter"):
        hybrid = client.hybrid_search("docs_single", [dense(q, layout, filter=expr)], RRFRanker(),
                                      limit=10)
    assert ids(hybrid) == ids(plain)
    assert client.router_status("docs_single")["passthrough"] == {
        "search:cluster_filter": 2, "hybrid_search:cluster_filter": 1}


def test_hybrid_search_on_a_server_without_it_names_the_version(routed, monkeypatch):
    client, layouts = routed
    check_hybrid_support("milvus_lite 2.5")
    check_hybrid_support("v2.4.0")
    with pytest.raises(HybridSearchUnsupported, match=r"v2\.3\.5") as err:
        check_hybrid_support("v2.3.5")
    assert isinstance(err.value, MilvusException)
    client._server_version = "v2.3.5"
    with pytest.raises(MilvusException, match=r">= 2\.4.*v2\.3\.5"):
        client.hybrid_search("docs", [dense(np.zeros((1, 384)), layouts["docs"])], RRFRanker())


class _Req:
    def __init__(self, data, anns_field, expr=None):
        self.data, self.anns_field, self.expr = data, anns_field, expr


class _State:
    def __init__(self, layout):
        self.layout = layout


def test_hybrid_plan_routes_the_layout_field_only(lite_docs):
    _, layouts = lite_docs
    single, partition = _State(layouts["docs_single"]), _State(layouts["docs"])
    reqs = [_Req([[0.0]] * 3, "vector", "id > 5"), _Req([{1: 0.5}] * 3, "sparse")]
    reason, routed, unrouted = hybrid_reason(single, reqs)
    assert (reason, routed, unrouted) == (None, [0], {1: "anns_field"})
    assert hybrid_reason(partition, reqs)[0] == "hybrid_partition_storage"
    assert hybrid_reason(single, reqs[1:])[0] == "anns_field"
    probed = {0: [[2, 1], [1, 2], [3, 4]]}
    route = plan_hybrid(single, reqs, probed, [0], 3, limit=10)
    assert [c.rows for c in route.calls] == [(0, 1), (2,)]
    assert route.calls[0].filters[0] == "(id > 5) and _ltr_cluster in [1, 2]"
    assert route.calls[0].filters[1] is None and route.calls[0].partition_names is None
    assert take_rows(reqs[1].data, (2,), 3) == [{1: 0.5}]
    only_dense = plan_hybrid(partition, reqs[:1], probed, [0], 3, limit=10)
    names = layouts["docs"].storage.cluster_partitions
    assert only_dense.calls[1].partition_names == [names[3], names[4]]
    assert only_dense.calls[1].filters[0] == "id > 5"


@pytest.mark.parametrize("collection", ["docs", "docs_single"])
def test_search_iterator_pages_through_the_routed_clusters(routed, fixture_data, collection):
    client, layouts = routed
    layout = layouts[collection]
    q = fixture_data.queries[5]
    clusters = client.route(collection, [q])[0]
    searched = client.search(collection, [q.tolist()], limit=40)[0]
    it = client.search_iterator(collection, [q.tolist()], batch_size=7, limit=40)
    pages = []
    while True:
        page = it.next()
        if not page:
            break
        pages.append([h["id"] for h in page])
    it.close()
    paged = [i for p in pages for i in p]
    assert len(pages) >= 5 and len(paged) == 40
    assert set(paged) == {h["id"] for h in searched}
    parts, expr = layout.storage.search_target(clusters)
    inside = MilvusClient.query(client, collection, filter=f"id in {paged}", output_fields=["id"],
                                partition_names=parts or None)
    if expr:
        inside = MilvusClient.query(client, collection, filter=f"({expr}) and id in {paged}",
                                    output_fields=["id"])
    assert {r["id"] for r in inside} == set(paged)        # every hit in a routed cluster
    assert client.router_status(collection)["passthrough"] == {}


def test_search_iterator_of_several_vectors_passes_through_said_once(routed, fixture_data):
    client, _ = routed
    qs = fixture_data.queries[:2].tolist()
    with pytest.warns(RuntimeWarning, match="search_iterator.*iterator_batch"):
        with pytest.raises(MilvusException):
            client.search_iterator("docs_single", qs, batch_size=5)
    assert client.router_status("docs_single")["passthrough"] == {"search_iterator:iterator_batch": 1}


def test_range_search_is_routed(routed, fixture_data):
    client, layouts = routed
    layout = layouts["docs_single"]
    q = fixture_data.queries[7]
    top = client.search("docs_single", [q.tolist()], limit=50)[0]
    radius = top[20]["distance"]
    params = {"metric_type": layout.metric, "params": {"radius": radius}}
    hits = client.search("docs_single", [q.tolist()], limit=50, search_params=params)[0]
    assert 0 < len(hits) <= 21 and all(h["distance"] >= radius - 1e-5 for h in hits)
    assert {h["id"] for h in hits} <= {h["id"] for h in top[:21]}   # the routed clusters' only
    assert client.router_status("docs_single")["passthrough"] == {}


def test_async_hybrid_search_returns_the_sync_clients(lite_docs, fixture_data, tmp_path):
    uri, layouts = lite_docs
    layout = layouts["docs_single"]
    queries = fixture_data.queries[20:26]
    sync = RoutedMilvusClient(uri, model_dir=str(tmp_path / "m"), nprobe=NPROBE, log_rate=0)
    try:
        expected = ids(sync.hybrid_search("docs_single", [dense(queries, layout)], RRFRanker(),
                                          limit=10))
    finally:
        sync.close()

    async def go():
        client = AsyncRoutedMilvusClient(uri, model_dir=str(tmp_path / "m"), nprobe=NPROBE,
                                         log_rate=0, batch_planning=False)
        try:
            got = await client.hybrid_search("docs_single", [dense(queries, layout)], RRFRanker(),
                                             limit=10)
            searched = await client.search("docs_single", queries.tolist(), limit=10)
            return ids(got), ids(searched)
        finally:
            await client.close()
    got, searched = asyncio.run(go())
    assert got == expected
    assert got == searched


def test_hybrid_search_on_milvus_2_3_names_the_server_version(tmp_path):
    """The embedded Milvus 2.3.5 (no HybridSearch): a clear error naming its version, before
    any request is sent (about 10 s: the server is started for this test alone)."""
    pytest.importorskip("milvus", reason="the embedded server needs the [server] extra")
    from benchmarks.embedded_server import start_embedded_server
    server = start_embedded_server(tmp_path / "server", timeout=150)
    try:
        client = RoutedMilvusClient(server.uri, model_dir=str(tmp_path / "m"), log_rate=0)
        try:
            version = str(client.get_server_version())
            assert version.startswith("v2.3")
            req = AnnSearchRequest([[0.0] * 4], "vector", {}, 5)
            with pytest.raises(HybridSearchUnsupported, match=version) as err:
                client.hybrid_search("any_collection", [req], RRFRanker())
            assert isinstance(err.value, MilvusException)
        finally:
            client.close()
    finally:
        server.stop()


def test_new_passthrough_reasons_are_metric_labels():
    """Every reason routed_calls can pass a call through for is a label of its own in the
    pass-through metric (not folded into 'other')."""
    from milvus_ltr_router.metrics import PASSTHROUGH_REASONS
    from milvus_ltr_router.routed_calls import WHY
    assert set(WHY) <= set(PASSTHROUGH_REASONS)
