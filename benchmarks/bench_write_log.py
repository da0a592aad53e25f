"""What the layout's write log (``<collection>__ltr_writes``, read by ``maintain-layout``) costs
a routed insert: the same inserts into two copies of one layout, one with its write log and
one whose log was dropped, interleaved, on an embedded Milvus 2.3.5 (or ``MILVUS_URI``).

    python -m benchmarks.bench_write_log [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(argv=None) -> int:
    from pymilvus import MilvusClient

    from benchmarks.common import setup_logging
    from benchmarks.server import milvus_uri
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.fixture import load_fixture
    from milvus_ltr_router.layout import drop_layout, write_log_name
    from milvus_ltr_router.writer import create_vector_collection

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (A/B, then B/A)")
    args = p.parse_args(argv)
    setup_logging()
    data = load_fixture()
    docs = data.docs
    with milvus_uri() as (uri, label), tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(uri)
        create_vector_collection(client, "wlog_src", docs[:5000])
        for name in ("wlog_with", "wlog_without"):
            build_layout(client, "wlog_src", name, n_clusters=32, storage="single", seed=0)
        client.drop_collection(write_log_name("wlog_without"))
        rc = RoutedMilvusClient(uri, model_dir=f"{tmp}/models", log_rate=0)
        rc.insert("wlog_without", [{"id": 999_999, "vector": docs[0].tolist()}])  # log found missing
        times = {(name, n): [] for name in ("wlog_with", "wlog_without") for n in (1, 100)}
        key = 1_000_000
        for rnd in range(args.rounds):
            order = ("wlog_with", "wlog_without") if rnd % 2 == 0 else ("wlog_without", "wlog_with")
            for name in order:
                for n, reps in ((1, 40), (100, 8)):
                    for _ in range(reps):
                        rows = [{"id": key + j, "vector": docs[(key + j) % len(docs)].tolist()}
                                for j in range(n)]
                        key += n
                        t0 = time.perf_counter()
                        rc.insert(name, rows)
                        times[(name, n)].append(time.perf_counter() - t0)
        rc.close()
        for name in ("wlog_with", "wlog_without"):
            drop_layout(client, name)
        client.drop_collection("wlog_src")
        client.close()
    print(f"\n{label}; routed inserts into a 5,000-row single-storage layout (L 32), interleaved")
    for n in (1, 100):
        a = statistics.median(times[("wlog_with", n)]) * 1000
        b = statistics.median(times[("wlog_without", n)]) * 1000
        print(f"{n:>3}-row insert: median {a:.2f} ms with the write log, {b:.2f} ms without "
              f"({a / b:.2f}x, +{a - b:.2f} ms; {len(times[('wlog_with', n)])} each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
