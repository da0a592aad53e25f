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
