import numpy as np

from milvus_ltr_router.evaluate import coverage, nprobe_grid, routing_quality
from milvus_ltr_router.labels import Neighbours


def test_routing_quality_on_a_hand_example():
    parts = np.array([[0, 1, 1, 2], [3, 3, 0, -1]])
    nb = Neighbours(ids=np.zeros_like(parts), scores=np.zeros(parts.shape, np.float32), partitions=parts)
    probed = np.array([[1, 2], [0, 5]])
    np.testing.assert_array_equal(coverage(probed, parts),
                                  [[False, True, True, True], [False, False, True, False]])
    q = routing_quality(probed, nb, k=4)
    assert q.top1_accuracy == 0.0
    assert np.isclose(q.recall, (3 / 4 + 1 / 3) / 2)    # -1 (no neighbour) is not counted
    assert q.nprobe == 2 and q.mean_probed == 2


def test_nprobe_grid_covers_paper_fractions():
    assert nprobe_grid(1000) == [1, 2, 10, 20, 50, 100]
    assert nprobe_grid(1) == [1]
