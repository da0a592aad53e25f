"""Could one laid-out collection serve routed single queries and native batches? (issue 21)

A design probe for batches. Routed search sends one filtered request per cluster set, so a
batch costs several requests where native IVF_FLAT answers it in one. If the laid-out
collection carried an IVF_FLAT index (nlist = L) instead of FLAT, a client could send single
queries routed (the cluster filter, every list visited: ``nprobe = nlist``) and whole batches
natively (no filter, IVF's own nprobe). This measures what that costs, on one embedded Milvus
2.3.5, interleaved per query, recall@10 against exact neighbours:

* ``routed FLAT``: today's request (FLAT, ``_ltr_cluster in [...]``), the layout's own router;
* ``routed IVF``: the same requests on a copy of the layout (same clusters, same row order)
  indexed IVF_FLAT, ``nprobe = nlist`` so the filter alone restricts the rows;
* ``native IVF``: that copy searched without a filter at a sweep of IVF's nprobe;

then batches of ``--batch`` queries: routed (batch planner) on either copy against native IVF.

    python -m benchmarks.bench_index_filter --dataset medium --unit-norm
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid

import numpy as np

from benchmarks.bench_end_to_end import timed_interleaved
from benchmarks.common import print_table, save, setup_logging
from benchmarks.datasets import DATASETS

log = logging.getLogger("benchmarks.index_filter")


def main(argv=None) -> int:
    import os
    from pymilvus import MilvusClient
    from benchmarks.datasets import load_or_build
    from benchmarks.server import milvus_uri
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.clustering import normalize_rows
    from milvus_ltr_router.labels import array_blocks, exact_knn
    from milvus_ltr_router.writer import create_vector_collection

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="medium", choices=list(DATASETS))
    parser.add_argument("--unit-norm", action="store_true")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32],
                        help="clusters each routed query probes")
    parser.add_argument("--ivf-nprobes", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="batches timed per configuration")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    data = load_or_build(args.dataset)
    docs, queries = data.docs, data.queries
    pick = np.sort(np.random.default_rng(0).choice(len(queries), args.queries, replace=False))
    if args.unit_norm:
        docs, queries = normalize_rows(docs), normalize_rows(queries)
    test_q = np.asarray(queries[pick], dtype=np.float32)
    exact = exact_knn(test_q, array_blocks(docs, np.zeros(len(docs), int)), k=10).ids
    tag = uuid.uuid4().hex[:6]
    with milvus_uri() as (uri, label), tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(uri)
        src = f"if_src_{tag}"
        create_vector_collection(client, src, docs)
        client.load_collection(src)
        t0 = time.perf_counter()
        flat = build_layout(client, src, f"if_flat_{tag}", storage="single").layout
        flat_s = time.perf_counter() - t0
        L = flat.n_clusters
        t0 = time.perf_counter()
        ivf = build_layout(client, src, f"if_ivf_{tag}", storage="single", clusters_from=flat,
                           index={"index_type": "IVF_FLAT", "params": {"nlist": L}}).layout
        ivf_s = time.perf_counter() - t0
        routed = RoutedMilvusClient(uri, model_dir=f"{tmp}/none", log_rate=0)
        every_list = {"metric_type": flat.metric, "params": {"nprobe": L}}

        def routed_fn(coll, nprobe, params=None):
            return lambda q: routed.search(coll, data=[q.tolist()], limit=10, nprobe=nprobe,
                                           search_params=params)[0]

        def native_fn(nprobe):
            params = {"metric_type": flat.metric, "params": {"nprobe": nprobe}}
            return lambda q: client.search(ivf.collection, data=[q.tolist()], limit=10,
                                           search_params=params)[0]

        configs = []
        for n in args.nprobes:
            configs.append(("routed FLAT", f"nprobe={n}", n, routed_fn(flat.collection, n)))
            configs.append(("routed IVF (nprobe = nlist)", f"nprobe={n}", n,
                            routed_fn(ivf.collection, n, every_list)))
        for n in args.ivf_nprobes:
            configs.append(("native IVF", f"nprobe={n}", n, native_fn(n)))
        load = os.getloadavg()
        rows = timed_interleaved(configs, test_q, exact)
        # batches: every configuration on the same batches, in a fresh order per batch
        rng = np.random.default_rng(1)
        bconf = []
        for n in args.nprobes:
            bconf.append(("routed FLAT", n, lambda b, n=n: routed.search(
                flat.collection, data=b.tolist(), limit=10, nprobe=n)))
            bconf.append(("routed IVF (nprobe = nlist)", n, lambda b, n=n: routed.search(
                ivf.collection, data=b.tolist(), limit=10, nprobe=n, search_params=every_list)))
        for n in args.ivf_nprobes:
            params = {"metric_type": flat.metric, "params": {"nprobe": n}}
            bconf.append(("native IVF", n, lambda b, p=params: client.search(
                ivf.collection, data=b.tolist(), limit=10, search_params=p)))
        blat = [[] for _ in bconf]
        brec = [[] for _ in bconf]
        for _ in range(args.batches + 1):
            idx = rng.choice(len(test_q), args.batch, replace=False)
            for j in rng.permutation(len(bconf)):
                t0 = time.perf_counter()
                res = bconf[j][2](test_q[idx])
                ms = (time.perf_counter() - t0) * 1000
                blat[j].append(ms)
                brec[j].append(np.mean([len({h["id"] for h in hits} & set(exact[i].tolist())) / 10
                                        for hits, i in zip(res, idx)]))
        batch_rows = [{"method": m, "param": f"nprobe={n}", "nq": args.batch,
                       "recall@10": float(np.mean(brec[j][1:])),
                       "per_query_ms": float(np.median(blat[j][1:]) / args.batch)}
                      for j, (m, n, _) in enumerate(bconf)]
        load_after = os.getloadavg()
        routed.close()
        for c in (flat.collection, ivf.collection, src):
            client.drop_collection(c)
        client.close()
    print(f"\n{label}; {args.dataset}{' unit-norm' if args.unit_norm else ''}: N={len(docs)}, L={L}, "
          f"{args.queries} held-out queries; layout build {flat_s:.0f} s (FLAT), {ivf_s:.0f} s "
          f"(IVF_FLAT nlist {L}); load average {load[0]:.2f} before timing, {load_after[0]:.2f} after")
    print_table(rows, ["method", "param", "recall@10", "median_ms", "mean_ms", "p99_ms"],
                "single-query requests, interleaved")
    print_table(batch_rows, ["method", "param", "nq", "recall@10", "per_query_ms"],
                f"batches of {args.batch} (median batch ms / nq over {args.batches} batches)")
    save(f"index_filter_{args.dataset}" + ("_unit" if args.unit_norm else ""),
         {"server": label, "N": len(docs), "L": L, "rows": rows, "batches": batch_rows,
          "load_before": load, "load_after": load_after}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
