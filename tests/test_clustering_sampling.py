import numpy as np
import pytest

from milvus_ltr_router.clustering import assign_clusters, default_n_clusters, fit_centroids
from milvus_ltr_router.sampling import reservoir_sample


def test_default_clusters_is_sqrt_n():
    assert default_n_clusters(20_000) == 141
    assert default_n_clusters(1) == 1


@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
def test_assignment_rule(fixture_data, algorithm):
    x = fixture_data.docs[:2000]
    c = fit_centroids(x, 16, algorithm, seed=1)
    got = assign_clusters(x, c, algorithm, block_rows=300)
    if algorithm == "spherical":
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
        want = np.argmax(x @ c.T, axis=1)
    else:
        want = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    assert (got == want).mean() > 0.999      # float ties aside
    assert len(np.unique(got)) == 16


def test_fit_centroids_is_seeded_and_validates(fixture_data):
    x = fixture_data.docs[:1000]
    np.testing.assert_array_equal(fit_centroids(x, 8, seed=3), fit_centroids(x, 8, seed=3))
    with pytest.raises(ValueError, match="unknown clustering algorithm"):
        fit_centroids(x, 8, "dbscan")
    with pytest.raises(ValueError, match="at least n_clusters"):
        fit_centroids(x[:5], 8)


def test_reservoir_sample_is_uniform_and_bounded():
    stream = [np.arange(i, i + 100, dtype=np.float32)[:, None] for i in range(0, 10_000, 100)]
    counts = np.zeros(10_000)
    for seed in range(200):
        s = reservoir_sample(iter(stream), 100, seed=seed)
        assert s.shape == (100, 1)
        assert len(np.unique(s)) == 100
        counts[s[:, 0].astype(int)] += 1
    # each row is picked with probability 1/100: 200 draws -> about 2 per row; first and
    # last thousand rows should be picked equally often (a biased reservoir fails this)
    assert abs(counts[:1000].sum() - counts[-1000:].sum()) < 0.25 * counts[:1000].sum()
    short = reservoir_sample(iter(stream[:1]), 500)
    assert short.shape == (100, 1)


# --------------------------------------------------------------------------- sample size
from milvus_ltr_router.clustering import (DEFAULT_MAX_SAMPLE_ROWS, array_block_source,  # noqa: E402
                                          assign_balanced, balanced_capacity, kmeans_objective,
                                          lloyd_pass, refine_centroids, resolve_sample_size,
                                          size_summary)


def test_resolve_sample_size_specs():
    assert resolve_sample_size(5000, 100_000, 100) == 5000
    assert resolve_sample_size("5000", 100_000, 100) == 5000
    assert resolve_sample_size(np.int64(5000), 100_000, 100) == 5000
    assert resolve_sample_size("39x", 100_000, 100) == 3900
    assert resolve_sample_size(" 2.5X ", 100_000, 100) == 250
    assert resolve_sample_size("all", 100_000, 100) == 100_000
    assert resolve_sample_size("ALL", 100_000, 100) == 100_000
    assert resolve_sample_size(10**9, 100_000, 100) == 100_000      # clipped to the collection
    assert resolve_sample_size("1000x", 100_000, 100) == 100_000
    # default: 256 per cluster, capped, never below 39 per cluster, never above N
    assert resolve_sample_size(None, 10**7, 100) == 25_600
    assert resolve_sample_size(None, 10**7, 1000) == DEFAULT_MAX_SAMPLE_ROWS
    assert resolve_sample_size(None, 10**7, 1000, max_rows=1000) == 39_000
    assert resolve_sample_size(None, 20_000, 141) == 20_000
    # ... and at 512 MiB of float32 rows when the dimension is known
    assert resolve_sample_size(None, 10**7, 1000, dim=384) == DEFAULT_MAX_SAMPLE_ROWS
    assert resolve_sample_size(None, 10**7, 1000, dim=1536) == (512 << 20) // (4 * 1536)
    assert resolve_sample_size(None, 10**7, 1000, dim=10**6) == 39_000
    # explicit specs are not capped by the default's budget
    assert resolve_sample_size("1000x", 10**7, 1000) == 1_000_000


@pytest.mark.parametrize("spec", ["", "x", "abc", "-3x", "0x", "nanx", "infx", "12.5", 1.5, True,
                                  [100], "all rows"])
def test_resolve_sample_size_rejects_malformed(spec):
    with pytest.raises(ValueError, match="sample size"):
        resolve_sample_size(spec, 100_000, 100)


def test_resolve_sample_size_rejects_too_small():
    with pytest.raises(ValueError, match="fewer than the 100 clusters"):
        resolve_sample_size(99, 100_000, 100)
    with pytest.raises(ValueError, match="fewer than the 100 clusters"):
        resolve_sample_size("0.5x", 100_000, 100)
    with pytest.raises(ValueError, match="sample size"):
        resolve_sample_size(0, 100_000, 100)
    with pytest.raises(ValueError, match="cannot fill"):
        resolve_sample_size("all", 50, 100)
    with pytest.raises(ValueError, match="n_clusters"):
        resolve_sample_size(None, 50, 0)


# --------------------------------------------------------------------------- refinement
def _full_batch_lloyd(x, c, algorithm):
    """One textbook Lloyd step on all rows at once (the reference for the blockwise pass)."""
    x = x.astype(np.float64)
    if algorithm == "spherical":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        assign = np.argmax(x @ c.T, axis=1)
    else:
        assign = np.argmin(((x[:, None, :] - c[None].astype(np.float64)) ** 2).sum(-1), axis=1)
    new = c.astype(np.float64).copy()
    for j in np.unique(assign):
        new[j] = x[assign == j].mean(axis=0)
    if algorithm == "spherical":
        new /= np.linalg.norm(new, axis=1, keepdims=True)
    return new, assign


@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
def test_blockwise_refinement_equals_full_batch_lloyd(fixture_data, algorithm):
    x = fixture_data.docs[:3000]
    c = fit_centroids(x[:800], 24, algorithm, seed=2, max_iter=3)
    want, assign = _full_batch_lloyd(x, c, algorithm)
    counts = np.bincount(assign, minlength=24)
    for block_rows in (3000, 1000, 257):
        got = refine_centroids(array_block_source(x, block_rows), c, algorithm, passes=1, empty="keep")
        assert got.dtype == np.float32 and got.shape == c.shape
        np.testing.assert_allclose(got, want, atol=2e-6)
        new, stats = lloyd_pass(array_block_source(x, block_rows), c, algorithm)
        np.testing.assert_allclose(new, want, atol=2e-6)
        np.testing.assert_array_equal(stats.counts, counts)
        assert stats.rows == 3000 and stats.reseeded == []
    # a list of blocks is re-iterable too; a one-shot iterator is refused
    blocks = list(array_block_source(x, 1000)())
    np.testing.assert_allclose(refine_centroids(blocks, c, algorithm, passes=1), want, atol=2e-6)
    with pytest.raises(TypeError, match="one-shot"):
        refine_centroids(iter(blocks), c, algorithm, passes=1)


@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
def test_refinement_never_increases_objective(fixture_data, algorithm):
    x = fixture_data.docs                        # all 20k rows, 384 dims
    blocks = array_block_source(x, 4096)
    c = fit_centroids(x[:39 * 64], 64, algorithm, seed=0)   # a small-sample start, as builds do
    objectives = [kmeans_objective(blocks, c, algorithm)]
    history = []
    for _ in range(4):
        c = refine_centroids(blocks, c, algorithm, passes=1, history=history)
        objectives.append(kmeans_objective(blocks, c, algorithm))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] < objectives[0]
    # each pass reports the objective of the centroids it started from
    np.testing.assert_allclose([h.objective for h in history], objectives[:-1], rtol=1e-5)
    if algorithm == "spherical":
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
def test_empty_cluster_keep_or_split(fixture_data, algorithm):
    x = fixture_data.docs[:2000]
    c = fit_centroids(x, 8, algorithm, seed=0)
    far = -10 * np.abs(c[:1]) if algorithm == "kmeans" else -normalize_rows(x.mean(0, keepdims=True))
    c = np.vstack([c, far.astype(np.float32)])            # cluster 8 wins no row
    blocks = array_block_source(x, 500)
    kept, stats = lloyd_pass(blocks, c, algorithm, empty="keep")
    assert stats.counts[8] == 0 and stats.reseeded == []
    np.testing.assert_allclose(kept[8], c[8], rtol=1e-6)
    split, stats = lloyd_pass(blocks, c, algorithm, empty="split")
    assert stats.reseeded == [8]
    largest = int(np.argmax(stats.counts))
    np.testing.assert_allclose(split[8], split[largest], rtol=0.01, atol=1e-3)   # a near copy
    assert not np.array_equal(split[8], split[largest])
    # the next pass gives the re-seeded cluster rows taken from the largest one
    _, after = lloyd_pass(blocks, split, algorithm)
    assert after.counts[8] > 0 and after.counts.min() > 0
    assert after.counts[largest] < stats.counts[largest]
    with pytest.raises(ValueError, match="empty must be"):
        lloyd_pass(blocks, c, algorithm, empty="drop")


from milvus_ltr_router.clustering import normalize_rows  # noqa: E402


def test_refinement_validates(fixture_data):
    x = fixture_data.docs[:500]
    c = fit_centroids(x, 4, seed=0)
    with pytest.raises(ValueError, match="passes"):
        refine_centroids(array_block_source(x), c, "spherical", passes=-1)
    with pytest.raises(ValueError, match="does not match"):
        refine_centroids(array_block_source(x[:, :10]), c, "spherical", passes=1)
    with pytest.raises(ValueError, match="no rows"):
        refine_centroids(lambda: iter([]), c, "spherical", passes=1)
    np.testing.assert_array_equal(refine_centroids(array_block_source(x), c, "spherical", passes=0), c)

    class Counter:
        n = 0

        def update(self, n):
            self.n += n
    bar = Counter()
    refine_centroids(array_block_source(x, 128), c, "spherical", passes=2, progress=bar)
    assert bar.n == 1000


# --------------------------------------------------------------------------- balance
@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
def test_balanced_assignment_unbounded_equals_plain(fixture_data, algorithm):
    x = fixture_data.docs[:5000]
    c = fit_centroids(x[:2000], 32, algorithm, seed=0)
    plain = assign_clusters(x, c, algorithm, block_rows=700)
    for capacity in (None, 10**9, 5000):
        sizes = np.zeros(32, dtype=np.int64)
        got = assign_balanced(x, c, algorithm, capacity, sizes, block_rows=700)
        np.testing.assert_array_equal(got, plain)
        np.testing.assert_array_equal(sizes, np.bincount(plain, minlength=32))


@pytest.mark.parametrize("algorithm", ["spherical", "kmeans"])
@pytest.mark.parametrize("ratio", [1.0, 1.3, 2.0])
def test_balanced_assignment_respects_capacity_blockwise(fixture_data, algorithm, ratio):
    x = fixture_data.docs[:6000]
    k = 40
    c = fit_centroids(x[:2000], k, algorithm, seed=0)
    capacity = balanced_capacity(len(x), k, ratio)
    plain = assign_clusters(x, c, algorithm)
    assert np.bincount(plain, minlength=k).max() > capacity     # the bound binds
    sizes = np.zeros(k, dtype=np.int64)
    parts = np.concatenate([assign_balanced(x[s:s + 1000], c, algorithm, capacity, sizes, block_rows=300)
                            for s in range(0, len(x), 1000)])   # a layout build, block by block
    counts = np.bincount(parts, minlength=k)
    np.testing.assert_array_equal(sizes, counts)
    assert counts.max() <= capacity and counts.sum() == len(x)
    if ratio == 1.0:                                            # 6000 = 40 x 150: all exactly full
        assert (counts == capacity).all()
    # a row leaves its best cluster only when that cluster ended up full
    moved = np.flatnonzero(parts != plain)
    assert len(moved) and (counts[plain[moved]] == capacity).all()
    assert (parts == plain).mean() > 0.3


def test_balanced_assignment_later_inserts_and_errors(fixture_data):
    x = fixture_data.docs[:1000]
    c = fit_centroids(x, 10, seed=0)
    sizes = np.full(10, 100, dtype=np.int64)
    sizes[3] = 90
    got = assign_balanced(x[:5], c, "spherical", 100, sizes)    # routed inserts: one cluster has room
    assert (got == 3).all()
    np.testing.assert_array_equal(sizes, [100, 100, 100, 95, 100, 100, 100, 100, 100, 100])
    with pytest.raises(ValueError, match="do not fit"):
        assign_balanced(x[:6], c, "spherical", 100, sizes)
    np.testing.assert_array_equal(sizes[3], 95)                  # untouched on error
    assert assign_balanced(x[:0], c, "spherical", 100, sizes).shape == (0,)
    with pytest.raises(ValueError, match="sizes"):
        assign_balanced(x[:5], c, "spherical", 100, np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="sizes"):
        assign_balanced(x[:5], c, "spherical", 100, np.zeros(10))
    assert balanced_capacity(1000, 10, 1.0) == 100
    assert balanced_capacity(1001, 10, 2.0) == 201
    with pytest.raises(ValueError, match="max_cluster_ratio"):
        balanced_capacity(1000, 10, 0.9)


def test_balanced_assignment_gives_room_to_the_best_scoring_rows():
    c = np.eye(3, dtype=np.float32)
    x = np.array([[0.9, 0.1, 0], [0.8, 0, 0.6], [0.1, 0.9, 0]], dtype=np.float32)
    sizes = np.zeros(3, dtype=np.int64)
    # rows 0 and 1 both want cluster 0, which has room for one: row 0 (score .9) beats
    # row 1 (.8), which moves to its next best cluster (2); row 2 keeps cluster 1
    got = assign_balanced(x[[1, 0, 2]], c, "spherical", 1, sizes)
    np.testing.assert_array_equal(got, [2, 0, 1])
    np.testing.assert_array_equal(sizes, [1, 1, 1])


def test_size_summary():
    s = size_summary(np.array([0, 2, 4, 10]))
    assert s == {"min": 0, "median": 3.0, "max": 10, "max_over_mean": 2.5, "empty": 1}
    with pytest.raises(ValueError):
        size_summary([])


def test_fit_centroids_seeds_from_a_subset_of_big_samples(fixture_data):
    x = fixture_data.docs[:3000]
    # up to 16 rows per cluster: seeded from every row, as before init_rows existed
    np.testing.assert_array_equal(fit_centroids(x[:16 * 20], 20, seed=1),
                                  fit_centroids(x[:16 * 20], 20, seed=1, init_rows=10**6))
    for algorithm in ("spherical", "kmeans"):
        sub = fit_centroids(x, 20, algorithm, seed=1)                 # seeds from 320 rows
        full = fit_centroids(x, 20, algorithm, seed=1, init_rows=len(x))
        assert not np.array_equal(sub, full)
        blocks = array_block_source(x)
        # Lloyd on the whole sample from either start reaches a similar objective
        assert kmeans_objective(blocks, sub, algorithm) < 1.05 * kmeans_objective(blocks, full, algorithm)
        np.testing.assert_array_equal(sub, fit_centroids(x, 20, algorithm, seed=1))   # seeded
