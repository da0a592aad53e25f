"""Label throughput vs numpy BLAS, and routing latency vs numpy, in the same run.

Targets (issue 7): labels >= 50% of numpy's matmul throughput; routing a batch of
1000 queries at L=1024, d=384 within 2x numpy ``Q @ W.T`` + argpartition; one
query under 100 microseconds.

    python -m benchmarks.bench_overheads [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import best_of, print_table, save, setup_logging


def label_throughput(n_docs: int, n_queries: int, dim: int, block: int, k: int = 10) -> dict:
    from milvus_ltr_router.labels import array_blocks, exact_knn
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((n_docs, dim), dtype=np.float32)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    parts = rng.integers(0, 100, n_docs)
    flops = 2.0 * n_docs * n_queries * dim

    def matmul_only():
        for s in range(0, n_docs, block):
            queries @ docs[s:s + block].T

    t_blas = best_of(matmul_only, 3)
    t_knn = best_of(lambda: exact_knn(queries, array_blocks(docs, parts, block_rows=block), k=k), 3)
    return {"n_docs": n_docs, "n_queries": n_queries, "dim": dim, "block": block,
            "numpy_matmul_gflops": flops / t_blas / 1e9, "exact_knn_gflops": flops / t_knn / 1e9,
            "ratio": t_blas / t_knn, "exact_knn_s": t_knn}


def routing_latency(n_parts: int, dim: int, batch: int) -> dict:
    from milvus_ltr_router.export import export_router
    from milvus_ltr_router.layout import Layout, partition_names_for
    from milvus_ltr_router.router import Router
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_parts, dim), dtype=np.float32)
    b = rng.standard_normal(n_parts, dtype=np.float32)
    layout = Layout("bench", w, partition_names_for(n_parts), np.ones(n_parts, np.int64), "IP",
                    "spherical", dim, "bench")
    q = rng.standard_normal((batch, dim), dtype=np.float32)
    nprobe = max(1, n_parts // 100)
    with tempfile.TemporaryDirectory() as tmp:
        router = Router.load(export_router(w, b, layout, "bench", Path(tmp) / "r.onnx"))
        wt = np.ascontiguousarray(w.T)

        def numpy_route():
            s = q @ wt + b
            np.argpartition(-s, nprobe - 1, axis=1)[:, :nprobe]

        reps = 200 if batch == 1 else 20
        t_np = best_of(lambda: [numpy_route() for _ in range(reps)], 3) / reps
        t_rt = best_of(lambda: [router.rank(q, nprobe) for _ in range(reps)], 3) / reps
    return {"L": n_parts, "dim": dim, "batch": batch, "nprobe": nprobe,
            "numpy_us_per_call": t_np * 1e6, "router_us_per_call": t_rt * 1e6,
            "router_us_per_query": t_rt * 1e6 / batch, "ratio_vs_numpy": t_rt / t_np}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.quick:
        label_cfg = [(2000, 100, 32, 500)]
        route_cfg = [(64, 32, 1), (64, 32, 100)]
    else:
        label_cfg = [(200_000, 2000, 384, 4096), (200_000, 2000, 384, 16384)]
        route_cfg = [(1024, 384, 1), (1024, 384, 1000)]
    labels = [label_throughput(*c) for c in label_cfg]
    print_table(labels, ["n_docs", "n_queries", "dim", "block", "numpy_matmul_gflops",
                         "exact_knn_gflops", "ratio"], "exact labels vs numpy BLAS (same run)")
    routing = [routing_latency(*c) for c in route_cfg]
    print_table(routing, ["L", "dim", "batch", "nprobe", "numpy_us_per_call", "router_us_per_call",
                          "router_us_per_query", "ratio_vs_numpy"],
                "routing: onnxruntime Router.rank vs numpy Q @ W.T + argpartition")
    save("overheads" + ("_quick" if args.quick else ""), {"labels": labels, "routing": routing,
                                                          "time": time.time()}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
