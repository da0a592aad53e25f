"""bench_end_to_end's batch and concurrency timing (issue 21) on stand-in searches: every
configuration sees the same batches in a fresh order per batch, recall is measured per query,
routed plans' statistics are collected, and each method is compared with the native indexes."""
import types

import numpy as np
import pytest

from benchmarks.bench_end_to_end import (batches_and_clients, batches_of, concurrent_qps,
                                         machine_busy, pick_configs, timed_batches)


def test_batches_cover_the_queries_evenly():
    bs = batches_of(10, 4, 10)
    assert len(bs) == 3 and all(len(b) == 4 for b in bs)
    counts = np.bincount(np.concatenate(bs), minlength=10)
    assert counts.min() >= 1 and counts.max() <= 2
    assert len(batches_of(10, 32, 5)) == 2 and len(batches_of(10, 32, 5)[0]) == 10   # nq <= Q
    assert len(batches_of(100, 1, 7)) == 7


def test_timed_batches_interleave_and_measure_recall_and_plans():
    calls = []
    queries = np.arange(40, dtype=np.float32)[:, None]
    exact = np.tile(np.arange(10), (40, 1))

    def search(name, ids):
        def fn(Q):
            calls.append((name, tuple(int(q[0]) for q in Q)))
            return [[{"id": i} for i in ids] for _ in Q]
        return fn
    plans = iter(range(1000))
    rows = timed_batches([("a", "-", search("a", range(10)), None),
                          ("b", "-", search("b", range(5, 15)),
                           lambda: {"requests": 2 + next(plans) % 2, "extra_clusters": [1, 3]})],
                         queries, exact, nq=8, min_queries=40, warmup=1)
    a, b = rows
    assert a["recall@10"] == 1.0 and b["recall@10"] == 0.5
    assert a["nq"] == b["nq"] == 8 and a["batches"] == 5
    assert a["requests_per_batch"] is None and b["requests_per_batch"] == pytest.approx(2.4)
    assert b["extra_clusters_per_query"] == 2.0
    assert a["per_query_ms"] == pytest.approx(a["batch_median_ms"] / 8) and a["qps"] > 0
    timed = calls[2:]                                   # after one warm-up batch x 2 configs
    assert sorted(c[1] for c in timed if c[0] == "a") == sorted(c[1] for c in timed if c[0] == "b")
    assert {timed[2 * i][0] for i in range(5)} == {"a", "b"}      # neither always first


def test_concurrent_qps_counts_every_threads_queries():
    seen = []

    def fn(q):
        seen.append(float(q[0]))
        return []
    rows = concurrent_qps([("m", "-", fn), ("n", "-", lambda q: [])], np.arange(5.0)[:, None],
                          clients=3, seconds=0.2, rounds=2)
    assert [r["method"] for r in rows] == ["m", "n"] and all(r["clients"] == 3 for r in rows)
    assert rows[0]["queries"] == len(seen) and rows[0]["qps"] > 0
    assert rows[0]["client_cpu_ms_per_query"] >= 0
    assert rows[0]["machine_busy"] is None or 0 <= rows[0]["machine_busy"] <= 1
    before = machine_busy()                  # /proc/stat counters (None: not on Linux)
    if before is not None:
        busy = machine_busy(before)
        assert busy is None or 0.0 <= busy <= 1.0


def test_pick_and_compare_with_the_native_indexes():
    rows = [{"method": "learned routing", "param": "nprobe=8", "recall@10": 0.92, "median_ms": 5.0},
            {"method": "learned routing", "param": "nprobe=16", "recall@10": 0.96, "median_ms": 7.0},
            {"method": "learned adaptive", "param": "target=0.9", "recall@10": 0.91, "median_ms": 4.0},
            {"method": "native IVF_FLAT", "param": "nprobe=32", "recall@10": 0.97, "median_ms": 6.0},
            {"method": "HNSW", "param": "ef=64", "recall@10": 0.9, "median_ms": 2.0}]
    picks = pick_configs(rows, [["learned routing", "learned adaptive"], "native IVF_FLAT", "HNSW"])
    assert [(t, r["param"]) for t, r in picks] == [
        (0.9, "target=0.9"), (0.9, "nprobe=32"), (0.9, "ef=64"), (0.95, "nprobe=16"), (0.95, "nprobe=32")]

    class Client:
        def __init__(self, requests):
            self.requests = requests
            self.last_plan = None

        def search(self, coll, data, limit, **kw):
            self.last_plan = {"requests": self.requests, "extra_clusters": [1] * len(data)}
            return [[{"id": i} for i in range(10)] for _ in data]
    planned, unplanned = Client(1), Client(4)
    native = lambda Q: [[{"id": i} for i in range(10)] for _ in Q]     # noqa: E731
    configs = [(m, p, None, lambda q: [{"id": i} for i in range(10)])
               for m, p in (("learned routing", "nprobe=16"), ("learned adaptive", "target=0.9"),
                            ("native IVF_FLAT", "nprobe=32"), ("HNSW", "ef=64"))]
    args = types.SimpleNamespace(batches=[1, 4], clients=[2], batch_queries=8, client_seconds=0.1,
                                 client_rounds=1)
    kw = {("learned routing", "nprobe=16"): (planned, "c", {"nprobe": 16}),
          ("learned adaptive", "target=0.9"): (planned, "c", {"recall_target": 0.9})}
    queries = np.zeros((8, 2), np.float32)
    b, c = batches_and_clients(rows, configs, {("native IVF_FLAT", "nprobe=32"): native,
                                               ("HNSW", "ef=64"): native}, kw,
                               ["learned routing", "learned adaptive"], planned, unplanned,
                               queries, np.tile(np.arange(10), (8, 1)), args)
    methods = {(r["recall_target"], r["nq"], r["method"]) for r in b}
    assert (0.9, 4, "routed, batch planner") in methods and (0.95, 4, "routed, one request per set") in methods
    assert (0.9, 1, "HNSW") in methods and (0.95, 4, "HNSW") not in methods      # ef 64 < 0.95
    planner = [r for r in b if r["method"] == "routed, batch planner"]
    assert all(r["requests_per_batch"] == 1 and r["extra_clusters_per_query"] == 1 for r in planner)
    assert all(r["requests_per_batch"] == 4 for r in b if r["method"] == "routed, one request per set")
    assert all(r["vs_ivf"] is not None for r in b)
    assert {r["method"] for r in c} == {"routed", "native IVF_FLAT", "HNSW"}
    assert all(r["clients"] == 2 and r["qps"] > 0 for r in c)
    ivf = [r for r in c if r["method"] == "native IVF_FLAT"]
    assert all(r["vs_ivf"] == pytest.approx(1.0) for r in ivf)
