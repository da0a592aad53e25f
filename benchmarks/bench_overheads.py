"""Label throughput vs numpy BLAS, and routing latency vs numpy, in the same run.

Targets (issue 7): labels >= 50% of numpy's matmul throughput; routing a batch of
1000 queries at L=1024, d=384 within 2x numpy ``Q @ W.T`` + argpartition; one
query under 100 microseconds.

Issue 20: the routing cost of the moment router served by onnxruntime (one thread), one
query and a batch of 32 per call, at L = 256 / 1024 / 4096 and d = 256 / 768, for sketch
rank 16 and 32 and a second stage re-scoring the top 32 / 64 / every cluster, next to the
linear router's (goal: <= 0.3 ms per query at L = 1024, d = 768). Random moments: the cost
does not depend on the values.

    python -m benchmarks.bench_overheads [--quick] [--moments-only]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import best_of, call_seconds, print_table, save, setup_logging


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


def random_moments(n_parts: int, dim: int, rank: int, seed: int = 0):
    """Moments of the right shapes for timing: random means, orthonormal-ish random bases,
    decreasing variances above a residual, uneven sizes."""
    from milvus_ltr_router.moments import ClusterMoments
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_parts, dim), dtype=np.float32) / np.sqrt(dim)
    bases = rng.standard_normal((n_parts, rank, dim), dtype=np.float32) / np.sqrt(dim)
    variances = np.sort(rng.uniform(0.002, 0.02, (n_parts, rank)).astype(np.float32), axis=1)[:, ::-1]
    return ClusterMoments(rng.integers(50, 2000, n_parts), means, bases, variances,
                          np.full(n_parts, 0.001, np.float32))


def _per_query_ms(router, queries: np.ndarray, nprobe: int, budget_s: float = 0.3) -> dict:
    """Milliseconds per query of ``router.rank(queries, nprobe)``: each call timed on its own
    (as many as fill ``budget_s``, 5 to 300), median and fastest, divided by the batch."""
    router.rank(queries, nprobe)                                   # warm-up
    t0 = time.perf_counter()
    router.rank(queries, nprobe)
    calls = int(max(5, min(300, budget_s / max(time.perf_counter() - t0, 1e-6))))
    t = call_seconds([lambda: router.rank(queries, nprobe)] * calls, 1)
    return {"ms_per_query": 1e3 * t["median"] / len(queries),
            "min_ms_per_query": 1e3 * t["min"] / len(queries)}


def moment_routing_cost(n_parts: int, dim: int, ranks=(16, 32), rescore=(32, 96, None),
                        batches=(1, 32)) -> list[dict]:
    """Per-query cost through onnxruntime (one thread) of the linear router and of the moment
    router at each rank and second-stage size (``None``: every cluster re-scored, one stage),
    at ``L = n_parts`` and ``d = dim``; multiply-adds per query beside it."""
    from milvus_ltr_router.export import export_moment_router, export_router
    from milvus_ltr_router.layout import Layout, partition_names_for
    from milvus_ltr_router.moments import MomentScorer
    from milvus_ltr_router.router import Router
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((max(batches), dim), dtype=np.float32)
    nprobe = max(1, n_parts // 100)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def measure(path, label, rank, m, macs):
            router = Router.load(path, num_threads=1)
            for batch in batches:
                rows.append({"L": n_parts, "dim": dim, "router": label, "rank": rank,
                             "rescore_top": m, "batch": batch, "nprobe": nprobe,
                             "mmac_per_query": macs / 1e6,
                             **_per_query_ms(router, queries[:batch], nprobe)})
            del router
            Path(path).unlink()

        moments = random_moments(n_parts, dim, max(ranks))
        layout = Layout("bench", moments.means, partition_names_for(n_parts),
                        moments.sizes, "IP", "spherical", dim, "bench")
        path = Path(tmp) / "linear.onnx"
        export_router(moments.means, np.zeros(n_parts, np.float32), layout, "bench", path)
        measure(path, "linear", None, None, n_parts * dim)
        for rank in ranks:
            sketch = moments if rank == moments.rank else moments.subset(rank)
            for m in dict.fromkeys(n_parts if top is None else min(top, n_parts) for top in rescore):
                scorer = MomentScorer.from_moments(sketch, rescore_top=m)
                path = Path(tmp) / f"m{rank}_{m}.onnx"
                export_moment_router(scorer, layout, "bench", path)
                # stage one: W q, the first directions and the diagonal of the rest
                # ((2 + f) L d); stage two: m r d (every cluster: L d + L r d, one stage)
                macs = n_parts * dim * (1 + rank) if m >= n_parts else \
                    (2 + scorer.first_rank) * n_parts * dim + m * rank * dim
                measure(path, f"moments r{rank}/" + ("all" if m >= n_parts else f"m{m}"),
                        rank, "all" if m >= n_parts else m, macs)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--moments-only", action="store_true",
                        help="only the moment routers' cost (issue 20), not labels and linear routing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.quick:
        label_cfg = [(2000, 100, 32, 500)]
        route_cfg = [(64, 32, 1), (64, 32, 100)]
        moment_cfg = [(64, 32)]
    else:
        label_cfg = [(200_000, 2000, 384, 4096), (200_000, 2000, 384, 16384)]
        route_cfg = [(1024, 384, 1), (1024, 384, 1000)]
        moment_cfg = [(L, d) for L in (256, 1024, 4096) for d in (256, 768)]
    labels = routing = []
    if not args.moments_only:
        labels = [label_throughput(*c) for c in label_cfg]
        print_table(labels, ["n_docs", "n_queries", "dim", "block", "numpy_matmul_gflops",
                             "exact_knn_gflops", "ratio"], "exact labels vs numpy BLAS (same run)")
        routing = [routing_latency(*c) for c in route_cfg]
        print_table(routing, ["L", "dim", "batch", "nprobe", "numpy_us_per_call",
                              "router_us_per_call", "router_us_per_query", "ratio_vs_numpy"],
                    "routing: onnxruntime Router.rank vs numpy Q @ W.T + argpartition")
    moments = [row for c in moment_cfg for row in moment_routing_cost(*c)]
    print_table(moments, ["L", "dim", "router", "batch", "nprobe", "mmac_per_query", "ms_per_query",
                          "min_ms_per_query"],
                "routing cost per query: linear and moment routers through onnxruntime, one thread "
                "(rank r, second stage re-scoring the top m or all clusters; median and fastest call)")
    name = "overheads" + ("_moments" if args.moments_only else "") + ("_quick" if args.quick else "")
    save(name, {"labels": labels, "routing": routing, "moment_routing": moments,
                "time": time.time()}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
