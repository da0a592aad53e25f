"""Co-probe groups and the storage choice (milvus_ltr_router.grouping): pure, no server."""
import numpy as np
import pytest

from milvus_ltr_router.costs import CostModel, StorageFacts
from milvus_ltr_router.errors import InputError
from milvus_ltr_router.grouping import (centroid_probes, choose_storage, coprobe_groups, default_group_candidates,
                                        mean_request_ms, rows_per_segment)
from milvus_ltr_router.storage import group_clusters


def walked_rows(probed, sizes, group_of) -> float:
    """Mean rows of the groups a query's clusters fall in (what its filter walks)."""
    rows = np.bincount(group_of, weights=sizes)
    return float(np.mean([rows[np.unique(group_of[np.asarray(p)])].sum() for p in probed]))


def blocks(n_blocks=4, per_block=6, queries=400, probe=3, seed=0):
    """Clusters in blocks; every query probes clusters of one block only. Block b holds
    clusters b, b + n_blocks, ... (interleaved ids, so grouping by id order cannot be right)."""
    rng = np.random.default_rng(seed)
    L = n_blocks * per_block
    block_of = np.arange(L) % n_blocks
    probed = []
    for _ in range(queries):
        members = np.flatnonzero(block_of == rng.integers(n_blocks))
        probed.append(rng.choice(members, probe, replace=False))
    return probed, block_of, L


def test_clusters_probed_together_share_a_group():
    probed, block_of, L = blocks()
    of = coprobe_groups(probed, np.full(L, 100), 4)
    # the partition of clusters into groups is exactly the blocks
    assert len(set(zip(of.tolist(), block_of.tolist()))) == 4
    assert sorted(np.bincount(of).tolist()) == [6, 6, 6, 6]
    # every query then touches one group
    assert all(len(set(of[p].tolist())) == 1 for p in probed)


def test_group_ids_follow_the_first_cluster_and_are_deterministic():
    probed, _, L = blocks(seed=3)
    a = coprobe_groups(probed, np.full(L, 100), 4)
    b = coprobe_groups(probed, np.full(L, 100), 4)
    assert np.array_equal(a, b)
    firsts = [int(np.flatnonzero(a == g)[0]) for g in range(4)]
    assert firsts == sorted(firsts) and a[0] == 0


def test_fewer_rows_walked_than_groups_from_centroids():
    # where centroid geometry says nothing about which clusters are probed together
    probed, _, L = blocks(n_blocks=4, per_block=8)
    rng = np.random.default_rng(0)
    cent = rng.normal(size=(L, 16)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    sizes = np.full(L, 100.0)
    ours = coprobe_groups(probed, sizes, 4)
    geometric = group_clusters(cent, 4, "spherical", seed=0)
    assert walked_rows(probed, sizes, ours) == 800.0      # one group of 8 clusters a query
    assert walked_rows(probed, sizes, geometric) > 1.5 * 800.0


def test_no_more_rows_walked_than_groups_from_centroids_on_geometric_probes():
    # real-ish geometry: queries near some clusters, probing the top 8 by inner product
    rng = np.random.default_rng(1)
    L, Q, d = 64, 1500, 16
    cent = rng.normal(size=(L, d))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    q = cent[rng.integers(0, 16, Q)] + 0.6 * rng.normal(size=(Q, d))   # traffic on a quarter
    probed = np.argsort(-(q @ cent.T), axis=1)[:, :8]
    sizes = rng.integers(50, 150, L).astype(float)
    ours = coprobe_groups(probed, sizes, 8)
    geometric = group_clusters(cent.astype(np.float32), 8, "spherical", seed=0)
    assert walked_rows(probed, sizes, ours) <= walked_rows(probed, sizes, geometric)


def test_groups_stay_within_the_size_cap():
    rng = np.random.default_rng(2)
    L = 40
    probed = [rng.choice(L, 5, replace=False) for _ in range(300)]
    sizes = rng.integers(10, 100, L).astype(float)
    for ratio in (1.5, 3.0):
        of = coprobe_groups(probed, sizes, 5, max_group_ratio=ratio)
        assert of.max() + 1 == 5 and set(of.tolist()) == set(range(5))
        assert np.bincount(of, weights=sizes).max() <= ratio * sizes.sum() / 5 + 1e-9
    # a cap no greedy packing meets rises until the groups can be formed
    of = coprobe_groups(probed, sizes, 5, max_group_ratio=1.0)
    assert of.max() + 1 == 5


def test_unprobed_clusters_and_edge_counts():
    sizes = np.array([10, 10, 10, 10, 10, 10.0])
    probed = [[0, 1], [0, 1], [2, 3]]
    one = coprobe_groups(probed, sizes, 1)
    assert one.tolist() == [0] * 6
    every = coprobe_groups(probed, sizes, 6)
    assert sorted(every.tolist()) == list(range(6))
    three = coprobe_groups(probed, sizes, 3)
    assert three[0] == three[1] and three[2] == three[3] and three[4] == three[5]


@pytest.mark.parametrize("bad", [0, 7, 2.5, "3"])
def test_bad_group_counts_are_refused(bad):
    with pytest.raises(InputError, match="n_groups"):
        coprobe_groups([[0, 1]], np.ones(6), bad)


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="sizes"):
        coprobe_groups([[0]], np.array([1.0, -1.0]), 1)
    with pytest.raises(InputError, match="at least one query"):
        coprobe_groups([], np.ones(3), 1)
    with pytest.raises(InputError, match="cluster ids"):
        coprobe_groups([[5]], np.ones(3), 1)
    with pytest.raises(InputError, match="max_group_ratio"):
        coprobe_groups([[0]], np.ones(3), 1, max_group_ratio=0.5)
    with pytest.raises(InputError, match="dim"):
        rows_per_segment(0)


def test_mean_request_ms_is_the_mean_of_the_requests_costs():
    model = CostModel(request_ms=1.0, cluster_ms=0.1, segment_ms=0.5, row_walked_ms=0.01,
                      query_ms=0.0, row_scanned_ms=0.001, query_row_walked_ms=0.0)
    sizes = np.array([100.0, 200.0, 300.0, 400.0])
    facts = StorageFacts.grouped(sizes, [0, 0, 1, 1])
    probed = [[0], [0, 2]]
    # [0]: 1 + 0.1 + 0.5*1 + 0.01*300 + 0.001*100 ; [0, 2]: 1 + 0.2 + 0.5*2 + 0.01*1000 + 0.001*400
    expect = ((1 + 0.1 + 0.5 + 3.0 + 0.1) + (1 + 0.2 + 1.0 + 10.0 + 0.4)) / 2
    assert mean_request_ms(probed, facts, model) == pytest.approx(expect)


def test_choose_storage_follows_the_cost_model():
    probed, _, L = blocks(n_blocks=4, per_block=8)
    sizes = np.full(L, 50_000.0)
    walk_is_dear = CostModel(request_ms=1.0, cluster_ms=0.0, segment_ms=0.0, row_walked_ms=1e-4,
                             query_ms=0.0, row_scanned_ms=1e-6, query_row_walked_ms=0.0)
    choice = choose_storage(probed, sizes, walk_is_dear, dim=128)
    assert choice.mode == "grouped" and choice.n_groups in (2, 4)
    assert choice.predicted_ms[f"grouped:{choice.n_groups}"] < choice.predicted_ms["single"]
    assert "grouped" in choice.summary() and f"{len(probed)} logged queries" in choice.summary()
    assert "cost model" in choice.summary() and "single" in choice.summary()
    # queries spread over every cluster: groups add segments to each request and save few rows
    rng = np.random.default_rng(0)
    spread = [rng.choice(L, 8, replace=False) for _ in range(200)]
    segments_are_dear = CostModel(request_ms=1.0, cluster_ms=0.0, segment_ms=5.0,
                                  row_walked_ms=1e-7, query_ms=0.0, row_scanned_ms=1e-6,
                                  query_row_walked_ms=0.0)
    choice = choose_storage(spread, np.full(L, 1000.0), segments_are_dear, dim=128)
    assert choice.mode == "single" and choice.group_of_cluster is None
    assert set(choice.predicted_ms) == {"single"} | {f"grouped:{g}" for g in default_group_candidates(L)}


def test_a_tie_keeps_single():
    free = CostModel(request_ms=1.0, cluster_ms=0.0, segment_ms=0.0, row_walked_ms=0.0,
                     query_ms=0.0, row_scanned_ms=0.0, query_row_walked_ms=0.0)
    assert choose_storage([[0, 1], [2]], np.ones(8), free, dim=8).mode == "single"


def test_candidates_and_segments():
    assert default_group_candidates(1000) == [2, 4, 8, 16, 32]
    assert default_group_candidates(3) == [2]
    assert rows_per_segment(256) == 512 * 1024 * 1024 // 1024


def test_centroid_probes_rank_by_the_metric():
    cent = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=np.float32)
    q = np.array([[0.9, 0.1], [0.1, 2.0]], dtype=np.float32)
    # inner product: the big centroid wins for both; L2: the nearest
    assert centroid_probes(q, cent, "IP", 1).ravel().tolist() == [2, 2]
    assert centroid_probes(q, cent, "L2", 1).ravel().tolist() == [0, 1]
    assert centroid_probes(q, cent, "COSINE", 2).tolist() == [[0, 2], [1, 2]]
    assert centroid_probes(q, cent, "IP", 10).shape == (2, 3)       # clipped to L
    with pytest.raises(InputError, match="dimension"):
        centroid_probes(q[:, :1], cent, "IP", 1)
