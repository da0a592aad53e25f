import numpy as np
import pytest

from milvus_ltr_router.calibration import (fit_temperature, neighbour_ranks, recall_table, softmax,
                                           target_distribution, threshold_counts, threshold_for)
from milvus_ltr_router.evaluate import evaluate_adaptive, pad_routes, routing_quality
from milvus_ltr_router.labels import Neighbours
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.router import CentroidRouter


def test_fit_temperature_recovers_the_generating_temperature(rng):
    scores = rng.standard_normal((4000, 20)) * 3
    p = softmax(scores, 2.0)
    labels = np.array([rng.choice(20, p=row) for row in p])
    t = fit_temperature(scores, target_distribution(labels, 20))
    assert 1.7 < t < 2.4


def test_threshold_counts_ranks_and_recall_table():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.3, 0.3, 0.2, 0.2]])
    np.testing.assert_array_equal(threshold_counts(probs, 0.15), [2, 4])
    np.testing.assert_array_equal(threshold_counts(probs, 0.15, max_nprobe=3), [2, 3])
    np.testing.assert_array_equal(threshold_counts(probs, 0.9, min_nprobe=1), [1, 1])
    parts = np.array([[1, 0, -1], [3, 0, 0]])
    np.testing.assert_array_equal(neighbour_ranks(probs, parts), [[1, 0, 4], [3, 0, 0]])
    table = recall_table(probs, parts, grid=(0.5, 0.15, 0.01))
    # threshold 0.5: one partition each -> query 0 covers 1 of 2, query 1 covers 2 of 3
    assert table[0][1] == pytest.approx((1 / 2 + 2 / 3) / 2) and table[0][2] == 1
    assert table[-1][1] == 1.0
    assert threshold_for(table, 0.99) == 0.15 and threshold_for(table, 0.5) == 0.5
    with pytest.raises(ValueError, match="recall_target"):
        threshold_for(table, 1.5)
    with pytest.raises(ValueError, match="no recall calibration"):
        threshold_for([], 0.9)


def test_adaptive_routing_meets_its_target_and_spends_fewer_partitions(small_layout_arrays):
    docs, queries, centroids, parts, nb = small_layout_arrays
    layout = Layout("d", centroids, partition_names_for(32), np.ones(32, np.int64), "IP",
                    "spherical", centroids.shape[1], "x")
    router = CentroidRouter(layout).calibrate(queries[:2000], nb.partitions[:2000])
    test = Neighbours(*(a[2000:] for a in (nb.ids, nb.scores, nb.partitions)))
    rows = evaluate_adaptive(router, queries[2000:], test, [0.5, 0.7, 0.9])
    for target, q in rows:
        assert q.recall >= target - 0.03       # calibrated on held-out queries, checked on others
    probed = [q.mean_probed for _, q in rows]
    assert probed == sorted(probed)
    # at the same mean budget, the threshold rule is at least as good as a fixed nprobe
    target, q = rows[1]
    n = int(np.floor(q.mean_probed))
    fixed = routing_quality(router.rank(queries[2000:], n), test)
    assert q.recall >= fixed.recall
    routes = router.route(queries[:5], recall_target=0.9, max_nprobe=6)
    assert all(1 <= len(r) <= 6 for r in routes)
    assert routing_quality(pad_routes(routes), Neighbours(*(a[:5] for a in (nb.ids, nb.scores,
                                                                            nb.partitions)))) \
        .mean_probed == np.mean([len(r) for r in routes])


def test_stopping_model_predicts_observed_shares(small_layout_arrays):
    """Fitted on one half of the queries, its predicted shares match the other half's."""
    from milvus_ltr_router.calibration import StoppingModel
    docs, queries, centroids, parts, nb = small_layout_arrays
    layout = Layout("d", centroids, partition_names_for(32), np.ones(32, np.int64), "IP",
                    "spherical", centroids.shape[1], "x")
    router = CentroidRouter(layout)
    probs = router.probabilities(queries)
    model = StoppingModel.fit(probs[:2000], nb.partitions[:2000])
    order, shares = model.shares(probs[2000:])
    assert (np.diff(shares, axis=1) <= 0).all()             # a threshold selects a prefix
    observed = np.take_along_axis(target_distribution(nb.partitions[2000:], 32), order, 1)
    # calibrated: over bins of predicted share, the mean prediction tracks the mean observation
    bins = np.digitize(shares, [0.01, 0.05, 0.2, 0.5])
    for b in np.unique(bins):
        sel = bins == b
        if sel.sum() > 200:
            assert abs(shares[sel].mean() - observed[sel].mean()) < 0.05
    # the rank-1 partition is predicted to hold more of the neighbours than rank 10
    assert shares[:, 0].mean() > 3 * shares[:, 9].mean()
    again = StoppingModel.from_json(model.to_json())
    np.testing.assert_array_equal(again.shares(probs[:5])[1], model.shares(probs[:5])[1])
    with pytest.raises(ValueError, match="coefficients"):
        StoppingModel.from_json({"coef": [1.0, 2.0], "intercept": 0.0})
    assert StoppingModel.from_json(None) is None


def test_stopping_model_serving_path_equals_its_features():
    """The folded serving computation gives the logistic model over :func:`ranked_profile`."""
    from milvus_ltr_router.calibration import StoppingModel, ranked_profile, softmax
    rng = np.random.default_rng(3)
    probs = softmax(rng.standard_normal((50, 40)) * 3)
    model = StoppingModel(list(rng.standard_normal(8)), -1.5)
    order, feats = ranked_profile(probs)
    expected = 1 / (1 + np.exp(-(feats @ np.asarray(model.coef) + model.intercept)))
    got_order, got = model.shares(probs)
    np.testing.assert_array_equal(got_order, order)
    np.testing.assert_allclose(got, np.minimum.accumulate(expected, axis=1), rtol=1e-9, atol=1e-12)


def test_stopping_model_needs_fewer_partitions_than_probability_threshold(small_layout_arrays):
    """On held-out queries, at a matched recall, the stopping model probes no more partitions."""
    from milvus_ltr_router.calibration import StoppingModel
    docs, queries, centroids, parts, nb = small_layout_arrays
    layout = Layout("d", centroids, partition_names_for(32), np.ones(32, np.int64), "IP",
                    "spherical", centroids.shape[1], "x")
    router = CentroidRouter(layout).calibrate(queries[:2000], nb.partitions[:2000])
    probs = router.probabilities(queries[2000:])
    model = StoppingModel.fit(router.probabilities(queries[:2000]), nb.partitions[:2000])
    with_model = np.array(recall_table(probs, nb.partitions[2000:], model=model))
    plain = np.array(recall_table(probs, nb.partitions[2000:]))

    def probed_at(table, recall):            # mean partitions where the curve reaches recall
        table = table[np.argsort(table[:, 2])]
        return float(np.interp(recall, np.maximum.accumulate(table[:, 1]), table[:, 2]))

    for recall in (0.7, 0.8, 0.9):
        assert probed_at(with_model, recall) <= probed_at(plain, recall) * 1.02
