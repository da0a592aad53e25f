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
    assert bench_quality.main(["--quick", "--rows", "labels", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "quality_fixture_quick_labels.json").read_text())
    routers = {r["router"] for r in out["results"][0]["fixed"]}
    assert routers == {"centroid", "learned top-1", "learned top-10", "learned top-10 mixed"}
    adaptive = {r["router"] for r in out["results"][0]["adaptive"]}
    assert "learned top-10 mixed, prob. threshold" in adaptive
    assert {(r["router"], r["fixed_router"]) for r in out["adaptive_savings"]} >= {
        ("learned top-10 mixed", "learned top-10 mixed"),
        ("learned top-10", "learned top-1")}
    assert (tmp_path / "quality_fixture_quick_labels_spherical.png").exists()
    assert "moments" not in out["results"][0]


def test_quality_benchmark_moment_rows(tmp_path):
    """Issue 20's rows on a tiny unit-norm slice of the fixture: every router at every nprobe,
    clusters needed, served cost, and ONNX routing as numpy does."""
    from threadpoolctl import threadpool_limits
    from benchmarks import bench_quality
    with threadpool_limits(1):      # per-cluster eigh / small matmuls: extra BLAS threads only contend
        assert bench_quality.main(["--quick", "--rows", "moments", "--normalize", "--algorithm",
                                   "spherical", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "quality_fixture_unit_quick_moments_spherical.json").read_text())
    assert out["normalize"] and out["rows"] == "moments"
    res = out["results"][0]
    m = res["moments"]
    routers = {"centroid", "learned (retrain)", "moments c=1", "moments c tuned", "learned+moments",
               "moments c=1, full covariance", "moments c=1, r32 every cluster",
               "moments c=1, r32/m32", "moments c=1, r32/m64", "moments c=1, r16"}
    assert {r["router"] for r in m["fixed"]} == routers
    assert {r["nprobe"] for r in m["fixed"]} >= {1, 2, m["val_nprobe"]}
    assert str(m["optimism"]) in m["optimism_grid"]           # JSON keys are strings
    needed = {r["router"]: r for r in m["needed"]}
    assert set(needed) == routers
    for name in ("centroid", "learned (retrain)", "moments c=1", "moments c tuned", "learned+moments"):
        row = needed[name]
        assert 1 <= row["fixed@0.9"] <= row["fixed@0.95"] <= res["L"]
        assert row["onnx_ms"] > 0 and row["onnx_ms_batch32"] > 0 and row["numpy_ms"] > 0
        assert row["onnx_same_clusters"] >= 0.95          # what is served routes as numpy does
        assert row["adaptive@0.9"] > 0
    assert needed["learned (retrain)"]["vs_learned@0.9"] == 0
    assert "onnx_ms" not in needed["moments c=1, full covariance"]
    # the curves agree with routing_quality at the fixed nprobes
    fixed = {(r["router"], r["nprobe"]): r for r in res["fixed"]}
    for r in m["fixed"]:
        if r["router"] == "centroid" and ("centroid", r["nprobe"]) in fixed:
            assert r["recall@10"] == pytest.approx(fixed["centroid", r["nprobe"]]["recall@10"])
            assert r["top1"] == pytest.approx(fixed["centroid", r["nprobe"]]["top1"])
    assert (tmp_path / "quality_fixture_unit_quick_moments_spherical_spherical_moments.png").exists()


def test_quality_curves_match_routing_quality():
    import numpy as np
    from benchmarks.bench_quality import quality_curves
    from milvus_ltr_router.evaluate import routing_quality
    from milvus_ltr_router.labels import Neighbours
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((50, 12))
    parts = rng.integers(0, 12, (50, 10))
    parts[3, 5:] = -1                                  # a query with fewer neighbours
    tied = np.zeros(50, bool)
    tied[7] = True
    nb = Neighbours(np.zeros_like(parts), np.zeros(parts.shape, np.float32), parts, tied)
    top1, recall = quality_curves(scores, nb)
    order = np.argsort(-scores, axis=1)
    for n in range(1, 13):
        q = routing_quality(order[:, :n], nb)
        assert top1[n - 1] == pytest.approx(q.top1_accuracy)
        assert recall[n - 1] == pytest.approx(q.recall)


def test_overheads_benchmark_moment_routers(tmp_path):
    from benchmarks import bench_overheads
    assert bench_overheads.main(["--quick", "--moments-only", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "overheads_moments_quick.json").read_text())
    rows = out["moment_routing"]
    assert {r["router"] for r in rows} == {"linear", "moments r16/m32", "moments r16/all",
                                           "moments r32/m32", "moments r32/all"}
    assert {r["batch"] for r in rows} == {1, 32}
    assert all(r["ms_per_query"] > 0 for r in rows)


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


def test_async_benchmark_runs_on_lite(tmp_path):
    """bench_async on a milvus-lite file: every method answers every query, and the two
    routed clients (async, sync + thread pool) return the same ids."""
    from benchmarks import bench_async
    payload = bench_async.main(["--uri", str(tmp_path / "a.db"), "--docs", "2000", "--clusters",
                                "8", "--queries", "24", "--nprobe", "2", "--concurrency", "4",
                                "--rounds", "2", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == set(bench_async.METHODS)
    assert payload["same_ids"] == 1.0
    assert rows["async_plain"]["recall@10"] == rows["sync_plain_pool"]["recall@10"] == 1.0
    assert 0 < rows["async_routed"]["recall@10"] < 1.0            # 2 of 8 clusters: a real routing
    assert all(r["qps"] > 0 for r in rows.values()) and len(payload["qps_by_round"]["async_routed"]) == 2
    assert (tmp_path / "bench_async.json").exists()
