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


def test_tied_top1_is_never_a_hit():
    # every query probes the partition of its (arbitrary) top-1 label; the first two are tied
    parts = np.array([[4, 4], [2, 1], [3, 3]])
    tied = np.array([True, True, False])
    probed = parts[:, :1]
    untied = Neighbours(np.zeros_like(parts), np.zeros(parts.shape, np.float32), parts)
    assert routing_quality(probed, untied, k=2).top1_accuracy == 1.0
    q = routing_quality(probed, Neighbours(untied.ids, untied.scores, parts, top1_tied=tied), k=2)
    assert q.top1_accuracy == 1 / 3           # only the untied query counts as a hit
    assert np.isclose(q.recall, (1 + 0.5 + 1) / 3)   # recall@k is unchanged


def test_all_zero_queries_give_no_router_a_free_top1_hit(rng):
    """The gate once published a router at 'top-1 1.0000 vs centroid 0.0000' on zero queries."""
    from milvus_ltr_router.labels import array_blocks, exact_knn
    docs = rng.standard_normal((200, 8)).astype(np.float32)
    doc_parts = np.arange(200) % 5
    nb = exact_knn(np.zeros((30, 8), np.float32), array_blocks(docs, doc_parts, block_rows=64), k=3)
    learned_the_tie_break = nb.partitions[:, :1]        # a router that memorised the label
    assert routing_quality(learned_the_tie_break, nb, k=3).top1_accuracy == 0.0
