"""Every benchmark runs on tiny data, so none can rot. Numbers are not checked here."""
import json

import pytest


def test_overheads_benchmark_runs(tmp_path):
    from benchmarks import bench_overheads
    assert bench_overheads.main(["--quick", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "overheads_quick.json").read_text())
    assert out["labels"][0]["numpy_matmul_gflops"] > 0
    assert out["routing"][0]["router_us_per_query"] > 0


def test_quality_benchmark_runs(tmp_path):
    from benchmarks import bench_quality
    assert bench_quality.main(["--quick", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "quality_fixture_quick.json").read_text())
    routers = {r["router"] for r in out["results"][0]["fixed"]}
    assert routers == {"centroid", "learned top-1", "learned top-10", "learned top-10 mixed"}
    adaptive = {r["router"] for r in out["results"][0]["adaptive"]}
    assert "learned top-10 mixed, prob. threshold" in adaptive
    assert {(r["router"], r["fixed_router"]) for r in out["adaptive_savings"]} >= {
        ("learned top-10 mixed", "learned top-10 mixed"),
        ("learned top-10", "learned top-1")}
    assert (tmp_path / "quality_fixture_quick_spherical.png").exists()


def test_layout_benchmark_runs_on_lite(tmp_path):
    from benchmarks import bench_layout
    assert bench_layout.main(["--quick", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "layout_quick.json").read_text())["runs"][0]
    assert run["rows"] == 3000 and run["read_rows_per_s"] > 0


def test_retrain_scale_benchmark_runs(tmp_path):
    from benchmarks import bench_retrain_scale
    assert bench_retrain_scale.main(["--quick", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "retrain_scale_quick.json").read_text())["runs"][0]
    assert run["N"] == 5000 and run["label_s"] > 0 and run["peak_rss_mib"] > 0


def test_end_to_end_timing_interleaves_configurations():
    """Every configuration sees every query, in a different order per query, and its recall
    is measured against the exact ids."""
    import numpy as np
    from benchmarks.bench_end_to_end import latency_at_recall, timed_interleaved
    calls = []

    def search(name, ids):
        def fn(q):
            calls.append((name, int(q[0])))
            return [{"id": i} for i in ids]
        return fn
    queries = np.arange(30, dtype=np.float32)[:, None]
    exact = np.tile(np.arange(10), (30, 1))
    rows = timed_interleaved([("a", "-", 1, search("a", range(10))),
                              ("b", "-", 2, search("b", range(5, 15)))], queries, exact, warmup=2)
    assert [r["recall@10"] for r in rows] == [1.0, 0.5]
    assert [r["partitions"] for r in rows] == [1, 2]
    timed = calls[4:]                                   # after 2 warm-up queries x 2 configs
    assert sorted(timed) == sorted((n, i) for i in range(30) for n in "ab")
    firsts = {timed[2 * i][0] for i in range(30)}
    assert firsts == {"a", "b"}                         # neither always runs first
    # interpolation between sweep points, none outside the swept range
    sweep = [{"method": "m", "recall@10": 0.5, "partitions": 2},
             {"method": "m", "recall@10": 0.9, "partitions": 10}]
    assert latency_at_recall(sweep, [0.7], "partitions", "parts")[0]["parts@0.7"] == pytest.approx(6)
    assert latency_at_recall(sweep, [0.95], "partitions", "parts")[0]["parts@0.95"] is None


def test_coverage_curve_counts_neighbours_in_the_first_partitions():
    import numpy as np
    from benchmarks.bench_end_to_end import coverage_curve

    class Fixed:                                    # ranks partitions 3, 1, 0, 2 for every query
        n_partitions = 4

        def rank(self, queries, nprobe):
            return np.tile([3, 1, 0, 2], (len(queries), 1))[:, :nprobe]
    parts = np.array([[3, 3, 0, 2], [1, 1, 1, 1]])
    assert coverage_curve(Fixed(), np.zeros((2, 1)), parts) == [0.25, 0.75, 0.875, 1.0]
