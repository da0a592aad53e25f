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
    good = np.arange(12, dtype=np.float64).reshape(4, 3)
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

    with pytest.raises(ValueError, match=r"2-D array \[n, dim\], got shape \(2, 5, 3\)"):
        clean_queries(np.ones((2, 5, 3)), dim=3)       # a 3-D list names its shape


def test_clean_queries_drops_zero_and_constant_rows_and_says_how_many(caplog, rng):
    good = rng.standard_normal((5, 4)).astype(np.float32)
    mixed = np.vstack([good, np.zeros((3, 4)), np.full((2, 4), 0.25), [[np.nan, 1, 2, 3]]])
    out = clean_queries(mixed, dim=4, name="query file q.npy")
    np.testing.assert_array_equal(out, good)
    assert "query file q.npy: dropped 5 all-zero or constant rows" in caplog.text
    assert "query file q.npy: dropped 1 rows with NaN or inf" in caplog.text
    assert clean_queries(np.zeros((300, 4)), dim=4).shape == (0, 4)
    # one-dimensional vectors: only zero carries no direction
    np.testing.assert_array_equal(clean_queries(np.array([[0.0], [2.0], [-1.0]])), [[2.0], [-1.0]])


def test_exact_knn_flags_top1_ties_across_partitions_even_beyond_top_k():
    # query [1, 0]: docs 0-2 (partition 0) and doc 7 (partition 3, in a later block) all score 2
    docs = np.array([[2, 0], [2, 1], [2, -1], [1, 0], [0, 1], [0, 2], [1, 1], [2, 5]], np.float32)
    parts = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    queries = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    for block_rows in (1, 3, 8):
        nb = exact_knn(queries, array_blocks(docs, parts, block_rows=block_rows), k=2)
        # query 0: top-2 both in partition 0, but doc 7 of partition 3 ties them: tied
        # query 1: top-1 doc 7 (score 5) alone; query 2: doc 7 (7) alone
        np.testing.assert_array_equal(nb.top1_tied, [True, False, False], err_msg=str(block_rows))
    # ties inside one partition are no ambiguity about the label
    same = exact_knn(queries[:1], array_blocks(docs[:3], parts[:3], block_rows=1), k=1)
    assert not same.top1_tied.any()
    # an all-zero query ties every row of every partition
    zero = exact_knn(np.zeros((2, 2), np.float32), array_blocks(docs, parts, block_rows=3), k=3)
    assert zero.top1_tied.all()
    assert nb.subset(np.array([0, 2])).top1_tied.tolist() == [True, False]
