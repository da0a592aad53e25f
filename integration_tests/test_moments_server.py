"""Issue 20, item 1 on a real Milvus server: a built layout's cluster moments are stored in
<collection>__ltr_moments, read back with the layout (in pages under the query window and
16 MB) and route a search through the moment router."""
import numpy as np

from milvus_ltr_router import moment_store
from milvus_ltr_router.layout import moments_collection_name, read_layout
from milvus_ltr_router.moments import ClusterMoments, cluster_moments
from milvus_ltr_router.readout import iter_layout_blocks
from milvus_ltr_router.router import CentroidRouter, MomentRouter


def test_built_layout_moments_read_back_and_route_a_search(client, wordnet_layout, fixture_data):
    built = wordnet_layout.layout
    assert built.moments is not None and wordnet_layout.moment_seconds > 0
    layout = read_layout(client, built.collection)
    got = layout.moments
    assert got is not None and (got.n_clusters, got.dim, got.rank) == (64, 384, 32)
    # the build's moments, or those a retrain of this session's layout refreshed from its
    # read-out (the same rows in another order: float sums differ in the last bits, a basis
    # vector may flip sign); the bit-exact round trip is test_moments_of_wide_vectors...
    q = fixture_data.queries[:500]
    np.testing.assert_allclose(got.means, built.moments.means, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.spread(q), built.moments.spread(q), rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(got.sizes, layout.sizes)
    assert int(got.sizes.sum()) == 20_000
    # the moments of the rows as they sit in the clusters, computed here
    vecs, parts = [], []
    for _, v, p in iter_layout_blocks(client, layout):
        vecs.append(v)
        parts.append(np.broadcast_to(p, len(v)))
    want = cluster_moments(np.concatenate(vecs), np.concatenate(parts), 64, anchors=layout.centroids)
    np.testing.assert_array_equal(got.sizes, want.sizes)
    np.testing.assert_allclose(got.means, want.means, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.spread(q), want.spread(q), rtol=1e-3, atol=1e-6)
    # the moment router routes a search: the probed partitions hold the best rows at least
    # as often as the centroids' choice
    router, centroid = MomentRouter(layout), CentroidRouter(layout)
    queries = fixture_data.queries[:200]
    exact = np.concatenate(vecs) @ queries.T
    best_part = np.concatenate(parts)[exact.argmax(axis=0)]
    names = layout.partition_names
    hit_m = np.mean([names[b] in r for b, r in zip(best_part, router.partitions(queries, 2))])
    hit_c = np.mean([names[b] in r for b, r in zip(best_part, centroid.partitions(queries, 2))])
    assert hit_m >= hit_c - 0.02 and hit_m > 0.5, (hit_m, hit_c)
    for q, ranked in zip(queries[:5], router.rank(queries[:5], 4)):
        partitions, expr = layout.storage.search_target([int(c) for c in ranked])
        hits = client.search(layout.collection, data=[q.tolist()], limit=5, filter=expr,
                             partition_names=partitions)[0]
        assert len(hits) == 5


def test_moments_of_wide_vectors_are_read_in_pages(client, unique_name):
    """d = 1536: 100 clusters x 33 rows (20 MB) take two pages on the way back."""
    d, L = 1536, 100
    x = np.random.default_rng(0).standard_normal((L * 40, d)).astype(np.float32)
    m = cluster_moments(x, np.arange(len(x)) % L, L)
    assert L * (m.rank + 1) > moment_store.rows_per_page(d)
    name = moments_collection_name(unique_name("wide"))
    moment_store.store_moments(client, name, m, {"clustering_id": "wide"})
    try:
        got = moment_store.load_moments(client, name, "wide", L, d)
        assert isinstance(got, ClusterMoments)
        for k, v in m.to_arrays().items():
            np.testing.assert_array_equal(got.to_arrays()[k], v, err_msg=k)
        assert moment_store.load_moments(client, name, "other", L, d) is None
    finally:
        client.drop_collection(name)
