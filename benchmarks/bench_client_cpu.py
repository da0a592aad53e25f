"""Client CPU per query of routed search, without concurrency noise (issue 21 item 2).

Under many concurrent clients the GIL makes the client's CPU per query the throughput
ceiling, so this measures process CPU time (``time.process_time``: every thread of this
process, gRPC's included; and ``time.thread_time``: the calling thread) per query of:

* ``routing``: the served router's :meth:`~.router.BaseRouter.rank` alone;
* ``plan``: routing plus the request plan (:meth:`.search_planning.SearchPlanner.plan`);
* ``routed``: the whole ``RoutedMilvusClient.search`` call;
* ``routing+plain``: ``routing`` followed by ``plain`` (below): what ``routed`` would cost if
  the plugin added nothing but the router;
* ``plain``: ``MilvusClient.search`` of the same collection sending the very requests the
  routed plan sends (same vectors, same ``_ltr_cluster in [...]`` filters), i.e. the Milvus
  client's own share; ``routed - plain`` is what the plugin adds;

for single queries and batches (``--batch``), then profiles the routed path with cProfile
(top self-time functions of the calling thread).

``--serve`` starts the embedded Milvus 2.3.5 server, builds the layout and publishes the
router into ``--state`` and keeps the server running; measuring runs with the same
``--state`` reuse it, so before/after comparisons (e.g. a checkout of the old code running
this file) search the same data::

    python -m benchmarks.bench_client_cpu --dataset medium --unit-norm --state /tmp/ltr-cpu --serve &
    python -m benchmarks.bench_client_cpu --dataset medium --unit-norm --state /tmp/ltr-cpu

Without a running ``--serve`` (no ``state.json``) a run builds its own state and stops the
server at the end.

The published router is the layout's moment scorer exported to ONNX as a
``learned-moments`` router (the graph a trained learned-moments router has: only its weights
differ); ``--router numpy`` serves the numpy :class:`~.router.MomentRouter` fallback instead
(an empty model dir).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
import uuid
from pathlib import Path

import numpy as np


def _state(args):
    from pymilvus import MilvusClient
    from benchmarks.datasets import load_or_build
    from benchmarks.embedded_server import start_embedded_server
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.clustering import normalize_rows
    from milvus_ltr_router.export import export_moment_router
    from milvus_ltr_router.moments import MomentScorer
    from milvus_ltr_router.registry import ModelRegistry
    from milvus_ltr_router.writer import create_vector_collection

    state = Path(args.state)
    meta_path = state / "state.json"
    data = load_or_build(args.dataset)
    docs, queries = data.docs, data.queries
    if args.docs:
        docs = docs[:args.docs]
    if args.unit_norm:
        docs, queries = normalize_rows(docs), normalize_rows(queries)
    queries = np.ascontiguousarray(queries[np.random.default_rng(0).permutation(len(queries))
                                           [:args.queries]], np.float32)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return None, meta, queries
    state.mkdir(parents=True, exist_ok=True)
    server = start_embedded_server(state / "server")
    client = MilvusClient(server.uri)
    tag = uuid.uuid4().hex[:6]
    src, dst = f"cpu_src_{tag}", f"cpu_{tag}"
    create_vector_collection(client, src, docs)
    client.load_collection(src)
    layout = build_layout(client, src, dst, storage=args.storage).layout
    client.release_collection(src)
    registry = ModelRegistry(str(state / "models"))
    version = "v1"
    path = registry.version_path(dst, version)
    os.makedirs(path.parent, exist_ok=True)
    export_moment_router(MomentScorer.from_moments(layout.moments), layout, dst, path,
                         router_kind="learned-moments", nprobe=args.nprobe)
    registry.publish(dst, path, version, {})
    meta = {"uri": server.uri, "collection": dst, "source": src,
            "dataset": args.dataset, "unit_norm": args.unit_norm, "docs": len(docs),
            "n_clusters": layout.n_partitions, "dim": layout.dim, "storage": layout.storage.mode}
    meta_path.write_text(json.dumps(meta, indent=2))
    return server, meta, queries


def _cpu(fn, calls, per):
    """(process ms, thread ms, wall ms) per query over ``calls``, each ``fn(arg)``."""
    p0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
    for c in calls:
        fn(c)
    p1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
    n = len(calls) * per
    return {"process_ms": 1e3 * (p1 - p0) / n, "thread_ms": 1e3 * (t1 - t0) / n,
            "wall_ms": 1e3 * (w1 - w0) / n}


def main(argv=None) -> int:
    from pymilvus import MilvusClient
    from milvus_ltr_router.client import RoutedMilvusClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="medium")
    parser.add_argument("--unit-norm", action="store_true")
    parser.add_argument("--docs", type=int, default=0, help="first N documents (0: all)")
    parser.add_argument("--storage", default="single")
    parser.add_argument("--state", default="/tmp/ltr-cpu-bench")
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--router", choices=["onnx", "numpy"], default="onnx")
    parser.add_argument("--rounds", type=int, default=3, help="passes; the lowest CPU is kept")
    parser.add_argument("--profile", type=int, default=30, help="top N of the profile (0: none)")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    parser.add_argument("--serve", action="store_true",
                        help="build (or reuse) the state, then keep its server running until "
                             "stopped, for measuring runs with the same --state")
    args = parser.parse_args(argv)

    server, meta, queries = _state(args)
    if args.serve:          # keep the server for later runs, until this process is stopped
        print(f"serving {meta} from {args.state}; stop this process (SIGINT or SIGTERM) to end",
              flush=True)
        import signal
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a background job ignores SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        finally:
            server.stop()
            (Path(args.state) / "state.json").unlink()
    if server is None:
        from pymilvus import MilvusClient as _Probe
        _Probe(meta["uri"]).load_collection(meta["collection"])
    try:
        uri = meta["uri"]
        coll = meta["collection"]
        model_dir = str(Path(args.state) / ("models" if args.router == "onnx" else "no-models"))
        routed = RoutedMilvusClient(uri, model_dir=model_dir, log_rate=0, nprobe=args.nprobe)
        plain = MilvusClient(uri)
        router = routed.router(coll)
        print(f"collection {coll}: {meta['docs']} rows, L {meta['n_clusters']}, d {meta['dim']}, "
              f"storage {meta['storage']}; router {type(router).__name__} ({router.kind}); "
              f"nprobe {args.nprobe}; load {os.getloadavg()}")
        layout = routed.layout(coll)
        rows = []
        profiles = {}
        for b in args.batch:
            batches = [queries[s:s + b] for s in range(0, len(queries) - b + 1, b)]
            lists = [q.tolist() for q in batches]
            # the requests the routed client sends, for the plain client to send the same
            plans = []
            for q in batches:
                probed = router.rank(q, args.nprobe)
                plan, _ = routed._planner.plan(layout, probed, "", 10, None)
                plans.append([(r.take(q).tolist(), r.filter, r.partition_names)
                              for r in plan.requests])

            def routing(i):
                router.rank(batches[i], args.nprobe)

            def planning(i):
                routed._planner.plan(layout, routed.route(coll, lists[i], nprobe=args.nprobe),
                                     "", 10, None)

            def routed_search(i):
                routed.search(coll, lists[i], limit=10, nprobe=args.nprobe)

            def plain_search(i):
                for data, filt, parts in plans[i]:
                    plain.search(coll, data, filter=filt, limit=10, partition_names=parts)

            def routing_plain(i):
                router.rank(batches[i], args.nprobe)
                plain_search(i)

            idx = list(range(len(batches)))
            for fn in (routed_search, plain_search):       # warm up connections, caches
                for i in idx[:5]:
                    fn(i)
            best = {}
            for _ in range(args.rounds):
                for name, fn in (("routing", routing), ("route+plan", planning),
                                 ("routed search", routed_search), ("plain search", plain_search),
                                 ("routing+plain", routing_plain)):
                    m = _cpu(fn, idx, b)
                    if name not in best or m["process_ms"] < best[name]["process_ms"]:
                        best[name] = m
            for name, m in best.items():
                rows.append({"batch": b, "what": name, **{k: round(v, 4) for k, v in m.items()}})
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for i in idx:
                    routed_search(i)
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile)
                profiles[b] = s.getvalue()
        print(f"\nCPU per query (lowest of {args.rounds} passes over {len(queries)} queries), "
              f"load {os.getloadavg()}")
        print(f"{'batch':>5}  {'what':<14} {'process_ms':>10} {'thread_ms':>10} {'wall_ms':>9}")
        for r in rows:
            print(f"{r['batch']:>5}  {r['what']:<14} {r['process_ms']:>10.4f} "
                  f"{r['thread_ms']:>10.4f} {r['wall_ms']:>9.4f}")
        for b, text in profiles.items():
            print(f"\n=== cProfile of routed search, batch {b} (calling thread; by self time)")
            print("\n".join(text.splitlines()[:args.profile + 12]))
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows,
                                                  "load": os.getloadavg()}, indent=2))
        routed.close()
        plain.close()
    finally:
        if server is not None:      # a state built by this run: gone with its server
            server.stop()
            (Path(args.state) / "state.json").unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
