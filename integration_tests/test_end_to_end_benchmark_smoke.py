"""The end-to-end benchmark on tiny data against the session's real server."""
import json


def test_end_to_end_benchmark_runs(milvus_server, tmp_path, monkeypatch):
    from benchmarks import bench_end_to_end
    monkeypatch.setenv("MILVUS_URI", milvus_server.uri)
    assert bench_end_to_end.main(["--quick", "--paper-baseline", "--hnsw", "--batches", "1", "8",
                                  "--clients", "1", "4", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "end_to_end_fixture_k10_quick.json").read_text())
    methods = {r["method"] for r in out["rows"]}
    fixed = {"learned routing", "centroid routing", "paper routing (top-1 labels)",
             "native IVF_FLAT", "HNSW", "FLAT"}
    # adaptive rows appear when the quick router was good enough to publish
    assert fixed <= methods <= fixed | {"learned adaptive"}
    assert all(r["mean_ms"] > 0 for r in out["rows"])
    for r in out["rows"]:                    # partitions probed: nprobe for fixed sweeps, L for FLAT
        if r["param"].startswith("nprobe="):
            assert r["partitions"] == int(r["param"].split("=")[1])
    assert (tmp_path / "end_to_end_fixture_k10_quick_partitions.png").exists()
    # batches and concurrent clients (issue 21) for whatever reached recall@10 0.9 / 0.95 on
    # the quick sweep: routed with and without the batch planner, IVF_FLAT, HNSW
    for r in out["batches"]:
        assert r["nq"] in (1, 8) and r["per_query_ms"] > 0 and 0 <= r["recall@10"] <= 1
        routed = r["method"].startswith("routed")
        assert (r["requests_per_batch"] is not None) == routed
        if r["method"] == "routed, batch planner" and r["nq"] == 1:
            assert r["requests_per_batch"] == 1 and r["extra_clusters_per_query"] == 0
    for r in out["clients"]:
        assert r["clients"] in (1, 4) and r["qps"] > 0
    planned = [r for r in out["batches"] if r["method"] == "routed, batch planner" and r["nq"] == 8]
    per_set = {(r["recall_target"], r["param"]): r for r in out["batches"]
               if r["method"] == "routed, one request per set" and r["nq"] == 8}
    for r in planned:           # the planner never sends more requests, never loses recall
        other = per_set[(r["recall_target"], r["param"])]
        assert r["requests_per_batch"] <= other["requests_per_batch"]
        assert r["recall@10"] >= other["recall@10"] - 1e-9
    flat = next(r for r in out["rows"] if r["method"] == "FLAT")
    assert flat["recall@10"] > 0.99          # exact search finds the exact neighbours
    assert flat["partitions"] == out["L"]


def test_label_path_benchmark_runs(milvus_server, tmp_path, monkeypatch):
    from benchmarks import bench_labels
    monkeypatch.setenv("MILVUS_URI", milvus_server.uri)
    assert bench_labels.main(["--dataset", "fixture", "--sizes", "3000", "--queries", "200",
                              "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "labels_fixture.json").read_text())["runs"]
    assert {r["path"] for r in runs} == {"milvus", "local"}
    # the local path reads every vector (3000 x 384 float32 = 4.4 MiB at least); Milvus sends ids
    local = next(r for r in runs if r["path"] == "local")
    remote = next(r for r in runs if r["path"] == "milvus")
    assert local["moved_mib"] > 4.3 and remote["moved_mib"] < local["moved_mib"]
    assert all(r["top1_labels_equal"] > 0.99 for r in runs)
