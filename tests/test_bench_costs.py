"""benchmarks/bench_costs.py without a server: the fit recovers a known cost model, and the
planner table runs on its output."""
import numpy as np
import pytest

from benchmarks.bench_costs import TERMS, cluster_sets, design_row, fit_costs, planner_rows
from milvus_ltr_router.costs import CostModel


def synthetic_points(true: dict, noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    points = []
    for N, segments in ((5000, 1), (20000, 1), (40000, 1), (20000, 4)):
        for nq in (1, 8, 32):
            for k, rows_per in ((1, 40), (1, 300), (4, 60), (4, 280), (16, 70), (16, 230), (64, 100),
                                (64, 180)):
                scanned = k * rows_per * N / 20000
                ms = float(np.dot(design_row(k, segments, N, nq, scanned), [true[t] for t in TERMS]))
                points.append({"k": k, "segments": segments, "walked": float(N), "nq": nq,
                               "scanned": scanned, "median_ms": ms * (1 + noise * rng.normal())})
    return points


def test_fit_recovers_known_coefficients():
    true = {"request_ms": 2.0, "cluster_ms": 0.005, "segment_ms": 0.05, "row_walked_ms": 2e-6,
            "query_ms": 0.03, "row_scanned_ms": 4e-5, "query_row_walked_ms": 5e-7}
    coef, pred = fit_costs(synthetic_points(true))
    for t in TERMS:
        assert coef[t] == pytest.approx(true[t], rel=1e-4, abs=1e-12)
    noisy, _ = fit_costs(synthetic_points(true, noise=0.05))
    assert all(v >= 0 for v in noisy.values())                       # non-negative least squares
    assert noisy["request_ms"] == pytest.approx(2.0, rel=0.15)
    assert noisy["row_scanned_ms"] == pytest.approx(4e-5, rel=0.15)
    CostModel(**coef)                                                # a valid model


def test_cluster_sets_and_planner_rows():
    sizes = np.array([5, 50, 10, 40, 20, 30])
    sets = dict(cluster_sets(sizes, [1, 2, 10]))
    assert sets["1 small"].tolist() == [0] and sets["1 large"].tolist() == [1]
    assert sets["2 small"].tolist() == [0, 2] and sets["2 large"].tolist() == [1, 3]
    assert "10 small" not in sets                                    # more than L clusters
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(30, 8))
    rows = planner_rows(CostModel(), rng.integers(50, 500, 30), 1, centroids, rng.normal(size=(200, 8)),
                        batches=(8, 32), nprobes=(4, 40), repeat=3)
    assert [(r["nprobe"], r["nq"]) for r in rows] == [(4, 8), (4, 32)]   # nprobe 40 > L skipped
    for r in rows:
        assert 1 <= r["requests"] <= r["nq"] and r["predicted_ms"] <= r["per_set_ms"] + 1e-9
