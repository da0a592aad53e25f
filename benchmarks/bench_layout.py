"""Layout build throughput: rows/s for read-out, clustering and write-back (issue 3).

Vectors: the real MiniLM fixture, tiled with small noise to the requested size
(throughput depends on size and dimension, not on where vectors came from).
Runs against ``MILVUS_URI`` or the embedded Milvus 2.3.5 server; milvus-lite with ``--lite``.

    python -m benchmarks.bench_layout [--rows 100000] [--clusters 64] [--lite] [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import numpy as np

from benchmarks.common import peak_rss_mib, print_table, save, setup_logging


def tiled_vectors(n_rows: int, seed: int = 0) -> np.ndarray:
    from milvus_ltr_router.fixture import load_fixture
    base = load_fixture().docs
    rng = np.random.default_rng(seed)
    reps = int(np.ceil(n_rows / len(base)))
    out = np.concatenate([base] * reps)[:n_rows]
    out += rng.normal(0, 0.02, out.shape).astype(np.float32)
    return out


def run(uri: str, label: str, n_rows: int, n_clusters: int) -> dict:
    from pymilvus import MilvusClient
    from milvus_ltr_router.layout import build_layout, drop_layout
    from milvus_ltr_router.milvus_io import create_vector_collection
    vecs = tiled_vectors(n_rows)
    client = MilvusClient(uri)
    src, dst = f"bench_src_{uuid.uuid4().hex[:6]}", f"bench_ivf_{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    create_vector_collection(client, src, vecs, scalars={"tag": [int(i % 97) for i in range(n_rows)]})
    client.load_collection(src)
    load_s = time.perf_counter() - t0
    try:
        report = build_layout(client, src, dst, n_clusters=n_clusters)
    finally:
        drop_layout(client, dst)
        client.drop_collection(src)
        client.close()
    s = report.seconds
    return {"backend": label, "rows": n_rows, "dim": vecs.shape[1], "L": n_clusters,
            "insert_source_s": load_s, "read_rows_per_s": n_rows / s["read"],
            "cluster_s": s["cluster"], "write_rows_per_s": n_rows / s["write"],
            "index_load_s": s["index_load"], "verify_s": s["verify"],
            "total_s": sum(s.values()), "peak_rss_mib": peak_rss_mib()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--lite", action="store_true", help="milvus-lite instead of a server")
    parser.add_argument("--quick", action="store_true", help="3,000 rows, 8 clusters, milvus-lite")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.quick:
        args.rows, args.clusters, args.lite = 3000, 8, True
    if args.lite:
        from milvus_ltr_router.milvus_io import release_lite
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"{tmp}/bench.db"
            rows = [run(uri, "milvus-lite", args.rows, args.clusters)]
            release_lite(uri)
    else:
        from benchmarks.server import milvus_uri
        with milvus_uri() as (uri, label):
            rows = [run(uri, label, args.rows, args.clusters)]
    print_table(rows, ["backend", "rows", "dim", "L", "read_rows_per_s", "cluster_s",
                       "write_rows_per_s", "index_load_s", "verify_s", "total_s", "peak_rss_mib"],
                "layout build throughput")
    save("layout" + ("_quick" if args.quick else ""), {"runs": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
