"""Every benchmark runs on tiny data, so none can rot. Numbers are not checked here."""
import json


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
    assert {r["router"] for r in out["adaptive_savings"]} == {
        "learned top-10 mixed", "learned top-10 mixed, prob. threshold"}
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
