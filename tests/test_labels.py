import numpy as np
import pytest

from milvus_ltr_router.labels import array_blocks, clean_queries, exact_knn


def brute_force(queries, docs, k, metric):
    if metric == "COSINE":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    if metric == "L2":
        s = -((queries[:, None, :] - docs[None, :, :]) ** 2).sum(-1)
    else:
        s = queries @ docs.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], np.sort(s, axis=1)[:, ::-1][:, :k]


@pytest.mark.parametrize("metric", ["IP", "COSINE", "L2"])
@pytest.mark.parametrize("block_rows,max_scores", [(7, 1 << 24), (64, 1 << 24), (10_000, 1 << 24),
                                                   (300, 1000)])   # 1000: 3 queries per chunk
def test_exact_knn_matches_brute_force(fixture_data, metric, block_rows, max_scores):
    docs = fixture_data.docs[:700]
    queries = fixture_data.queries[:50]
    parts = np.arange(len(docs)) % 13
    nb = exact_knn(queries, array_blocks(docs, parts, block_rows=block_rows), k=10, metric=metric,
                   max_scores=max_scores)
    ids, scores = brute_force(queries, docs, 10, metric)
    np.testing.assert_array_equal(nb.ids, ids)
    np.testing.assert_allclose(nb.scores, scores, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(nb.partitions, parts[ids])
    np.testing.assert_array_equal(nb.labels, parts[ids[:, 0]])


def test_exact_knn_ids_are_primary_keys_and_short_collections_pad(rng):
    docs = rng.standard_normal((5, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    ids = np.array([100, 200, 300, 400, 500])
    nb = exact_knn(q, array_blocks(docs, np.zeros(5, int), ids=ids, block_rows=2), k=7)
    assert set(nb.ids[:, :5].ravel()) <= set(ids)
    assert (nb.ids[:, 5:] == -1).all() and (nb.partitions[:, 5:] == -1).all()
    assert (np.diff(nb.scores[:, :5], axis=1) <= 0).all()


def test_exact_knn_rejects_dimension_mismatch(rng):
    with pytest.raises(ValueError, match="dimension"):
        exact_knn(rng.standard_normal((2, 8)), [(np.arange(3), rng.standard_normal((3, 9)), 0)])


def test_clean_queries_validates_and_drops_non_finite():
    good = np.ones((4, 3), dtype=np.float64)
    good[1, 2] = np.nan
    good[3, 0] = np.inf
    out = clean_queries(good, dim=3)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    with pytest.raises(ValueError, match="dimension 3 does not match the collection's 4"):
        clean_queries(good, dim=4)
    with pytest.raises(ValueError, match="2-D"):
        clean_queries(np.ones(3))
    with pytest.raises(ValueError, match="numeric"):
        clean_queries(np.array([["a", "b"]]))
