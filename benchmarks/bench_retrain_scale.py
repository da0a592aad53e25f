"""How retraining cost scales with N: label time, training time and peak memory.

Synthetic clustered vectors (a Gaussian mixture around L centres, generated
block by block so memory stays bounded, as when streaming from Milvus); each
size runs in a fresh subprocess so its peak RSS is its own. Milvus read-out is
measured separately (bench_layout: read rows/s) and is added to the estimate.
Target (issue 7): 1M x 384, L=1024, 100k queries under 10 minutes and 4 GiB.

    python -m benchmarks.bench_retrain_scale [--sizes 100000 300000] [--queries 20000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import peak_rss_mib, print_table, save, setup_logging


def mixture_blocks(n_rows: int, centres: np.ndarray, block: int, seed: int):
    for start in range(0, n_rows, block):
        rng = np.random.default_rng(seed + start)
        m = min(block, n_rows - start)
        which = rng.integers(0, len(centres), m)
        x = centres[which] + rng.standard_normal((m, centres.shape[1]), dtype=np.float32) * 0.6
        yield np.arange(start, start + m), x.astype(np.float32), which


def one_size(n_rows: int, n_queries: int, n_parts: int, dim: int, epochs: int) -> dict:
    from milvus_ltr_router.labels import exact_knn
    from milvus_ltr_router.train import LinearRouterTrainer, split_indices
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n_parts, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    queries = next(mixture_blocks(n_queries, centres, n_queries, seed=10**9))[1]
    t0 = time.perf_counter()
    nb = exact_knn(queries, mixture_blocks(n_rows, centres, 65536, seed=0), k=10)
    t_label = time.perf_counter() - t0
    tr, va, _ = split_indices(n_queries)
    t0 = time.perf_counter()
    model = LinearRouterTrainer(n_partitions=n_parts, centroids=centres, max_epochs=epochs).fit(
        queries[tr], nb.labels[tr], eval_set=(queries[va], nb.labels[va]))
    t_train = time.perf_counter() - t0
    return {"N": n_rows, "queries": n_queries, "L": n_parts, "dim": dim, "label_s": t_label,
            "train_s": t_train, "epochs_run": max(h.epoch for h in model.history_),
            "total_s": t_label + t_train, "peak_rss_mib": peak_rss_mib()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # child process: one size
    args = parser.parse_args(argv)
    setup_logging()
    if args.one:
        print(json.dumps(one_size(args.one, args.queries, args.clusters, args.dim, args.epochs)))
        return 0
    if args.quick:
        args.sizes, args.queries, args.clusters, args.dim, args.epochs = [5000], 1000, 16, 32, 3
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "benchmarks.bench_retrain_scale", "--one", str(n), "--queries",
               str(args.queries), "--clusters", str(args.clusters), "--dim", str(args.dim),
               "--epochs", str(args.epochs)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(rows[-1:], list(rows[-1]), f"N={n}")
    print_table(rows, ["N", "queries", "L", "dim", "label_s", "train_s", "epochs_run", "total_s",
                       "peak_rss_mib"], "retrain cost vs N (labels in memory-bounded blocks + training)")
    save("retrain_scale" + ("_quick" if args.quick else ""), {"runs": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
