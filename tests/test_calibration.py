import numpy as np
import pytest

from milvus_ltr_router.calibration import fit_temperature, mass_cutoff, softmax, target_distribution
from milvus_ltr_router.evaluate import evaluate_adaptive, pad_routes, routing_quality
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.router import CentroidRouter


def test_fit_temperature_recovers_the_generating_temperature(rng):
    scores = rng.standard_normal((4000, 20)) * 3
    p = softmax(scores, 2.0)
    labels = np.array([rng.choice(20, p=row) for row in p])
    t = fit_temperature(scores, target_distribution(labels, 20))
    assert 1.7 < t < 2.4


def test_mass_cutoff_counts_and_bounds():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.3, 0.3, 0.2, 0.2]])
    order, counts = mass_cutoff(probs, 0.85)
    np.testing.assert_array_equal(counts, [2, 4])
    assert list(order[0][:2]) == [0, 1]
    _, counts = mass_cutoff(probs, 0.85, min_nprobe=1, max_nprobe=3)
    np.testing.assert_array_equal(counts, [2, 3])
    _, counts = mass_cutoff(probs, 0.5, min_nprobe=2)
    np.testing.assert_array_equal(counts, [2, 2])
    with pytest.raises(ValueError, match="recall_target"):
        mass_cutoff(probs, 1.5)


def test_adaptive_routing_trades_partitions_for_recall(small_layout_arrays):
    docs, queries, centroids, parts, nb = small_layout_arrays
    layout = Layout("d", centroids, partition_names_for(32), np.ones(32, np.int64), "IP",
                    "spherical", centroids.shape[1], "x")
    base = CentroidRouter(layout)
    t = fit_temperature(base.scores(queries[:1000]), target_distribution(nb.partitions[:1000], 32))
    router = CentroidRouter(layout, temperature=t)
    rows = evaluate_adaptive(router, queries[1000:], type(nb)(*(a[1000:] for a in
                             (nb.ids, nb.scores, nb.partitions))), [0.5, 0.8, 0.95])
    probed = [q.mean_probed for _, q in rows]
    recall = [q.recall for _, q in rows]
    assert probed == sorted(probed) and recall == sorted(recall)
    assert probed[0] < probed[-1] and recall[0] < recall[-1]
    routes = router.route(queries[:5], recall_target=0.9, max_nprobe=6)
    assert all(1 <= len(r) <= 6 for r in routes)
    padded = pad_routes(routes)
    assert padded.shape[0] == 5 and (padded[:, 0] >= 0).all()
    assert routing_quality(padded, type(nb)(*(a[:5] for a in (nb.ids, nb.scores, nb.partitions))))\
        .mean_probed == np.mean([len(r) for r in routes])
