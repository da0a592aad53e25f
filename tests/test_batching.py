"""Batch planning under a cost model (pure): which queries of a batch share one request."""
import json

import numpy as np
import pytest

from milvus_ltr_router.batching import (DEFAULT_COST_MODEL, BatchPlan, CostModel, StorageFacts,
                                        max_queries_for, plan_batch, plan_batches, probe_matrix,
                                        resolve_cost_model)
from milvus_ltr_router.errors import InputError
from milvus_ltr_router.storage import make_storage

ZERO_REQUEST = dict(request_ms=0.0, cluster_ms=0.0, segment_ms=0.0, row_walked_ms=0.0)


def random_batch(rng, Q, L, nprobe, topics=4):
    """Queries around a few topics, as a batch of rewrites would be: each probes the nprobe
    clusters nearest to a noisy copy of its topic's point."""
    centroids = rng.normal(size=(L, 16))
    centers = rng.normal(size=(topics, 16))
    q = centers[rng.integers(0, topics, Q)] + 0.6 * rng.normal(size=(Q, 16))
    return np.argsort(-(q @ centroids.T), axis=1)[:, :nprobe]


def facts_for(kind, sizes, rng):
    if kind == "single":
        return StorageFacts.single(sizes, segments=3)
    if kind == "partition":
        return StorageFacts.partition(sizes)
    return StorageFacts.grouped(sizes, rng.integers(0, 5, len(sizes)), rows_per_segment=2000)


def check_plan(plan: BatchPlan, probed, facts, model):
    X = probe_matrix(probed, facts.n_clusters)
    Q = len(X)
    seen = np.concatenate([r.queries for r in plan.requests])
    assert sorted(seen.tolist()) == list(range(Q))                  # each query exactly once
    for k, r in enumerate(plan.requests):
        assert np.all(plan.request_of[r.queries] == k)
        assert np.all(np.diff(r.queries) > 0) and np.all(np.diff(r.clusters) > 0)
        union = np.flatnonzero(X[r.queries].any(axis=0))
        assert np.array_equal(r.clusters, union)                    # superset of each query's
        assert r.cost_ms == pytest.approx(model.request_cost(len(r.queries), r.clusters, facts))
        for q in r.queries:
            own = np.flatnonzero(X[q])
            assert plan.extra_clusters[q] == len(union) - len(own)
            assert plan.extra_rows[q] == pytest.approx(facts.sizes[union].sum() - facts.sizes[own].sum())
    assert plan.predicted_ms == pytest.approx(sum(r.cost_ms for r in plan.requests))
    per_query = sum(model.request_cost(1, np.flatnonzero(x), facts) for x in X)
    assert plan.per_query_ms == pytest.approx(per_query)
    # merging only where it saves: never worse than one request per distinct set or per query
    assert plan.predicted_ms <= plan.per_set_ms * (1 + 1e-9) + 1e-9
    assert plan.per_set_ms <= plan.per_query_ms * (1 + 1e-9) + 1e-9
    assert plan.stats["requests"] == len(plan) and plan.stats["queries"] == Q


@pytest.mark.parametrize("kind", ["single", "partition", "grouped"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_properties(kind, seed):
    rng = np.random.default_rng(seed)
    L = 60
    sizes = rng.integers(50, 2000, L)
    facts = facts_for(kind, sizes, rng)
    models = [DEFAULT_COST_MODEL, CostModel(request_ms=3.0, cluster_ms=0.01, segment_ms=0.2,
                                            row_walked_ms=1e-5, query_ms=0.02, row_scanned_ms=4e-5,
                                            query_row_walked_ms=1e-6)]
    for model in models:
        for Q, nprobe in ((1, 5), (7, 3), (40, 8), (64, 20)):
            probed = random_batch(rng, Q, L, nprobe)
            plan = plan_batch(probed, facts, model)
            check_plan(plan, probed, facts, model)
            again = plan_batch(probed, facts, model)                # deterministic
            assert np.array_equal(plan.request_of, again.request_of)
            assert all(np.array_equal(a.clusters, b.clusters) for a, b in zip(plan.requests, again.requests))


def test_huge_request_cost_merges_everything():
    rng = np.random.default_rng(3)
    sizes = rng.integers(100, 1000, 50)
    for facts in (StorageFacts.single(sizes), StorageFacts.partition(sizes)):
        probed = random_batch(rng, 100, 50, 6, topics=10)
        plan = plan_batch(probed, facts, CostModel(request_ms=1e9))
        assert len(plan) == 1
        assert np.array_equal(plan.requests[0].clusters, np.unique(probed))
        check_plan(plan, probed, facts, CostModel(request_ms=1e9))


def test_zero_request_cost_keeps_one_request_per_query():
    rng = np.random.default_rng(4)
    sizes = rng.integers(100, 1000, 30)
    probed = random_batch(rng, 50, 30, 5, topics=2)
    probed[1] = probed[0]                                           # identical sets stay apart too
    for facts in (StorageFacts.single(sizes), StorageFacts.partition(sizes),
                  StorageFacts.grouped(sizes, np.arange(30) % 4)):
        model = CostModel(**ZERO_REQUEST, query_ms=0.05, row_scanned_ms=1e-4, query_row_walked_ms=1e-6)
        plan = plan_batch(probed, facts, model)
        assert len(plan) == 50
        assert [r.queries.tolist() for r in plan.requests] == [[q] for q in range(50)]
        assert not plan.extra_clusters.any()
        check_plan(plan, probed, facts, model)


def test_identical_sets_share_a_request_when_requests_cost_something():
    sizes = np.full(10, 100)
    probed = [[1, 2], [3], [2, 1], [1, 2]]
    plan = plan_batch(probed, StorageFacts.single(sizes),
                      CostModel(request_ms=0.5, row_scanned_ms=1.0, query_ms=0.0, segment_ms=0.0,
                                row_walked_ms=0.0))           # scanning dwarfs a request: no other merge
    assert [r.queries.tolist() for r in plan.requests] == [[0, 2, 3], [1]]
    assert plan.stats["distinct_sets"] == 2 and plan.stats["merges"] == 0


def test_hand_computed_case():
    """L = 4 clusters of 100, 100, 100, 1000 rows, one segment, requests 1 ms, 0.001 ms per row
    scanned per query. q0, q1 probe {0, 1}, q2 {0, 2}, q3 {3}.

    q0 and q1 share a request (same set). Then A = {0, 1} (2 queries, 200 rows), B = {0, 2}
    (1 query, 200 rows), C = {3} (1 query, 1000 rows):
    saving(A, B) = 1 + (2 + 1) * 0.1 - 2 * 0.2 - 1 * 0.2 = 0.7   (they share cluster 0: 0.1 ms)
    saving(A, C) = 1 - 2 * 1.0 - 1 * 0.2 = -1.2;  saving(B, C) = 1 - 1.0 - 0.2 = -0.2
    so A and B merge into {0, 1, 2} (3 queries: 1 + 3 * 0.3 = 1.9 ms); then
    saving(AB, C) = 1 - 3 * 1.0 - 0.3 < 0 and C stays alone (1 + 1.0 = 2.0 ms). Total 3.9 ms,
    against 1.4 + 1.2 + 2.0 = 4.6 ms per distinct set and 3 * 1.2 + 2.0 = 5.6 ms per query."""
    facts = StorageFacts.single([100, 100, 100, 1000])
    model = CostModel(request_ms=1.0, cluster_ms=0.0, segment_ms=0.0, row_walked_ms=0.0, query_ms=0.0,
                      row_scanned_ms=0.001, query_row_walked_ms=0.0)
    plan = plan_batch([[0, 1], [1, 0], [0, 2], [3]], facts, model)
    assert [r.queries.tolist() for r in plan.requests] == [[0, 1, 2], [3]]
    assert [r.clusters.tolist() for r in plan.requests] == [[0, 1, 2], [3]]
    assert [r.cost_ms for r in plan.requests] == pytest.approx([1.9, 2.0])
    assert plan.predicted_ms == pytest.approx(3.9)
    assert plan.per_set_ms == pytest.approx(4.6)
    assert plan.per_query_ms == pytest.approx(5.6)
    assert plan.extra_clusters.tolist() == [1, 1, 1, 0]
    assert plan.extra_rows.tolist() == pytest.approx([100, 100, 100, 0])
    assert plan.request_of.tolist() == [0, 0, 0, 1]
    assert plan.stats["merges"] == 1 and plan.stats["rounds"] == 1


def test_segments_and_walk_make_partition_merges_cheaper():
    """In partition storage a shared cluster is also a shared segment: merging saves its
    segment cost too, so two queries that would stay apart without segment cost merge."""
    sizes = [100, 100, 100]
    probed = [[0, 1], [0, 2]]
    base = dict(request_ms=0.1, cluster_ms=0.0, row_walked_ms=0.0, query_ms=0.0,
                row_scanned_ms=0.002, query_row_walked_ms=0.0)
    # saving without segments: 0.1 + 2 * 0.2 - 0.2 - 0.2 ... = 0.1 + 0.4 - 0.8 < 0
    apart = plan_batch(probed, StorageFacts.partition(sizes), CostModel(segment_ms=0.0, **base))
    assert len(apart) == 2
    together = plan_batch(probed, StorageFacts.partition(sizes), CostModel(segment_ms=0.5, **base))
    assert len(together) == 1                                   # + 0.5 ms: the shared segment


def test_max_queries_caps_requests():
    rng = np.random.default_rng(5)
    sizes = rng.integers(100, 1000, 20)
    probed = np.tile([[1, 2, 3]], (10, 1))
    plan = plan_batch(probed, StorageFacts.single(sizes), CostModel(request_ms=1e6), max_queries=4)
    assert [len(r.queries) for r in plan.requests] == [4, 4, 2]
    probed = random_batch(rng, 30, 20, 4)
    plan = plan_batch(probed, StorageFacts.single(sizes), CostModel(request_ms=1e6), max_queries=7)
    assert max(len(r.queries) for r in plan.requests) <= 7 and len(plan) == 5
    check_plan(plan, probed, StorageFacts.single(sizes), CostModel(request_ms=1e6))
    with pytest.raises(InputError):
        plan_batch(probed, StorageFacts.single(sizes), max_queries=0)


def test_input_forms_agree_and_are_checked():
    rng = np.random.default_rng(6)
    facts = StorageFacts.single(rng.integers(100, 1000, 25))
    probed = random_batch(rng, 20, 25, 5)
    plans = [plan_batch(p, facts) for p in (probed, list(probed), probe_matrix(probed, 25))]
    assert all(np.array_equal(p.request_of, plans[0].request_of) for p in plans)
    ragged = [[0, 1, 2], [2], [0, 1, 2, 3, 4]]                   # adaptive nprobe: lengths differ
    check_plan(plan_batch(ragged, facts), ragged, facts, DEFAULT_COST_MODEL)
    with pytest.raises(InputError, match="cluster ids"):
        plan_batch([[0, 25]], facts)
    with pytest.raises(InputError, match="probe matrix"):
        plan_batch(np.zeros((2, 24), bool), facts)


def test_query_without_clusters_gets_its_own_request():
    facts = StorageFacts.single([10, 10, 10])
    plan = plan_batch([[0], [], [0], []], facts, CostModel(request_ms=1e6))
    assert [r.queries.tolist() for r in plan.requests] == [[0, 2], [1], [3]]
    assert plan.requests[1].clusters.tolist() == []
    assert len(plan_batch([], facts)) == 0


def test_cost_model_json_round_trip(tmp_path):
    model = CostModel(request_ms=1.5, cluster_ms=0.001, segment_ms=0.2, row_walked_ms=3e-6,
                      query_ms=0.04, row_scanned_ms=2.5e-5, query_row_walked_ms=1e-7, dim=384,
                      source="test")
    assert CostModel.from_json(model.to_json()) == model
    model.write(tmp_path / "m.json")
    assert CostModel.read(tmp_path / "m.json") == model
    # a bench_costs result file carries the model under "cost_model"
    (tmp_path / "bench.json").write_text(json.dumps({"fits": [], "cost_model": model.to_dict()}))
    assert CostModel.read(tmp_path / "bench.json") == model
    with pytest.raises(InputError, match="unknown CostModel keys"):
        CostModel.from_dict({"request": 1.0})
    with pytest.raises(InputError, match="request_ms"):
        CostModel(request_ms=-1.0)


def test_request_cost_formula():
    model = CostModel(request_ms=1.0, cluster_ms=0.1, segment_ms=0.5, row_walked_ms=0.001, query_ms=0.2,
                      row_scanned_ms=0.01, query_row_walked_ms=0.0001)
    sizes = [10, 20, 30, 40]
    # grouped: clusters 0, 1 in part 0 (30 rows, 1 segment), 2, 3 in part 1 (70 rows, 1 segment)
    facts = StorageFacts.grouped(sizes, [0, 0, 1, 1])
    assert facts.part_rows.tolist() == [30, 70]
    cost = model.request_cost(3, [0, 2], facts)
    walked, scanned = 100, 40
    assert cost == pytest.approx(1.0 + 0.1 * 2 + 0.5 * 2 + 0.001 * walked
                                 + 3 * (0.2 + 0.01 * scanned + 0.0001 * walked))
    part = StorageFacts.partition(sizes)                       # no filter: nothing walked
    assert model.request_cost(1, [1], part) == pytest.approx(1.0 + 0.1 + 0.5 + 0.2 + 0.01 * 20)


def test_storage_facts_from_storage_and_segments():
    names = [f"c{i:04d}" for i in range(6)]
    sizes = np.array([100, 200, 300, 400, 500, 600])
    single = StorageFacts.from_storage(make_storage("single", names), sizes, rows_per_segment=1000)
    assert single.n_parts == 1 and single.part_segments.tolist() == [3] and single.filtered
    part = StorageFacts.from_storage(make_storage("partition", names), sizes)
    assert part.n_parts == 6 and part.part_segments.tolist() == [1] * 6 and not part.filtered
    grouped = StorageFacts.from_storage(make_storage("grouped", names, np.array([0, 1, 0, 1, 2, 2])),
                                        sizes, segments=2)
    assert grouped.part_rows.tolist() == [400, 600, 1100] and grouped.part_segments.tolist() == [2, 2, 2]
    with pytest.raises(InputError):
        StorageFacts(np.ones(3), np.array([0, 0, 3]), np.ones(2), np.ones(2))


def test_large_batches_are_planned_in_chunks_joined_into_one_plan():
    rng = np.random.default_rng(7)
    L = 40
    facts = StorageFacts.single(rng.integers(100, 2000, L), segments=2)
    probed = random_batch(rng, 70, L, 6)
    whole = plan_batches(probed, facts, chunk=1000)               # one chunk: plan_batch itself
    assert np.array_equal(whole.request_of, plan_batch(probed, facts).request_of)
    plan = plan_batches(probed, facts, chunk=32)                  # 32 + 32 + 6 queries
    check_plan(plan, probed, facts, DEFAULT_COST_MODEL)
    assert plan.stats["chunks"] == 3 and plan.stats["queries"] == 70
    for r in plan.requests:                                       # no request spans two chunks
        assert len(set((r.queries // 32).tolist())) == 1
    first = plan_batch(probed[:32], facts)
    assert [r.queries.tolist() for r in plan.requests[:len(first)]] == \
        [r.queries.tolist() for r in first.requests]
    share = plan.extra_rows.sum() / probe_matrix(probed, L).astype(float).dot(facts.sizes).sum()
    assert plan.stats["extra_rows_share"] == pytest.approx(share)
    assert plan.stats["mean_extra_clusters"] == pytest.approx(plan.extra_clusters.mean())
    # groups() is what plan_search's group hook takes: (clusters, rows) per request
    assert plan.groups() == [(tuple(r.clusters.tolist()), r.queries.tolist()) for r in plan.requests]
    with pytest.raises(InputError):
        plan_batches(probed, facts, chunk=0)


def test_request_limits_and_cost_model_sources(tmp_path):
    assert max_queries_for(256) == 16384 and max_queries_for(2048) == 4096
    assert max_queries_for(10 ** 9) == 1
    assert resolve_cost_model(None) is DEFAULT_COST_MODEL
    model = CostModel(request_ms=3.0, source="mine")
    assert resolve_cost_model(model) is model
    model.write(tmp_path / "m.json")
    assert resolve_cost_model(str(tmp_path / "m.json")) == model
    assert resolve_cost_model(tmp_path / "m.json") == model
    assert resolve_cost_model({"request_ms": 3.0, "source": "mine"}) == model
    with pytest.raises(InputError, match="cannot read"):
        resolve_cost_model(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not a cost model"):
        resolve_cost_model(tmp_path / "bad.json")
    with pytest.raises(InputError, match="cost_model must be"):
        resolve_cost_model(3.0)
