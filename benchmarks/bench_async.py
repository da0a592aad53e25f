"""An asyncio service against a thread pool: queries per second with many requests in flight
(issue 25's goal: ``AsyncRoutedMilvusClient`` with 64 concurrent requests reaches at least the
QPS of the sync ``RoutedMilvusClient`` driven by a thread pool of the same size).

On one laid-out collection (the 20k WordNet fixture, MiniLM, spherical k-means), every query
is one request of one vector at a fixed nprobe. A pass sends all queries with
``--concurrency`` requests in flight: through the async routed client (``asyncio.gather``
under a semaphore), the sync routed client (a ``ThreadPoolExecutor`` of that many threads),
and as references pymilvus's own ``AsyncMilvusClient`` / ``MilvusClient`` searching every row.
Passes of the four run in a random order, ``--rounds`` times; each reports its wall-clock
QPS and the client process's CPU per query; the table gives medians over rounds.

    python -m benchmarks.bench_async [--uri URI | --server] [--docs 20000] [--clusters 64]
                                     [--queries 640] [--nprobe 4] [--concurrency 64] [--rounds 5]
                                     [--router onnx|numpy]

``--server`` (default when neither is given): ``MILVUS_URI`` if set, else the embedded Milvus
2.3.5 server. The routed answers of the two clients are compared query by query.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.bench_integrations import build, drop, recall
from benchmarks.common import print_table, save

METHODS = ("async_routed", "sync_routed_pool", "async_plain", "sync_plain_pool")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--uri", default=None, help="a Milvus server (default: --server)")
    where.add_argument("--server", action="store_true")
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--queries", type=int, default=640)
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for the JSON (default: results/)")
    p.add_argument("--router", choices=["onnx", "numpy"], default="onnx",
                   help="onnx: the layout's moment router published as a router file (served by "
                        "onnxruntime, as after a retrain; needs the [train] extra's onnx); numpy: "
                        "none published, the client's numpy moment router (cold start)")
    args = p.parse_args(argv)
    if args.uri:
        return run(args, args.uri, args.uri)
    from benchmarks.server import milvus_uri
    with milvus_uri() as (uri, description):
        print(f"server: {description}")
        return run(args, uri, description)


class Methods:
    """The four ways of sending every query with ``concurrency`` requests in flight."""

    def __init__(self, uri: str, collection: str, model_dir: str, queries: np.ndarray,
                 nprobe: int, concurrency: int):
        from pymilvus import AsyncMilvusClient, MilvusClient
        from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
        from milvus_ltr_router.client import RoutedMilvusClient
        self.collection, self.nprobe, self.concurrency = collection, nprobe, concurrency
        self.vectors = [q.tolist() for q in queries]
        self.loop = asyncio.new_event_loop()
        opts = dict(model_dir=model_dir, log_rate=0)

        async def make():
            return AsyncRoutedMilvusClient(uri=uri, **opts), AsyncMilvusClient(uri=uri)
        self.async_routed, self.async_plain = self.loop.run_until_complete(make())
        self.sync_routed = RoutedMilvusClient(uri=uri, **opts)
        self.sync_plain = MilvusClient(uri=uri)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench")

    def _kwargs(self, routed: bool) -> dict:
        return dict(limit=10, output_fields=["id"],
                    **({"nprobe": self.nprobe} if routed else {}))

    def run(self, method: str) -> list[list[int]]:
        routed = "routed" in method
        kwargs = self._kwargs(routed)
        if method.startswith("async"):
            client = self.async_routed if routed else self.async_plain
            gate = asyncio.Semaphore(self.concurrency)

            async def one(v):
                async with gate:
                    res = await client.search(self.collection, data=[v], **kwargs)
                return [h["id"] for h in res[0]]

            async def every():
                return await asyncio.gather(*[one(v) for v in self.vectors])
            return self.loop.run_until_complete(every())
        client = self.sync_routed if routed else self.sync_plain

        def one(v):
            return [h["id"] for h in client.search(self.collection, data=[v], **kwargs)[0]]
        return list(self.pool.map(one, self.vectors))

    def close(self) -> None:
        self.pool.shutdown()
        self.sync_routed.close()
        self.sync_plain.close()

        async def shut():
            await self.async_routed.close()
            await self.async_plain.close()
        self.loop.run_until_complete(shut())
        self.loop.close()


def publish_moment_router(uri: str, collection: str, model_dir: str) -> None:
    """The layout's moment router as a published router file (what a retrain publishes when
    the moment router wins its gate; no training here)."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.export import export_moment_router
    from milvus_ltr_router.layout import read_layout
    from milvus_ltr_router.moments import MomentScorer
    from milvus_ltr_router.registry import ModelRegistry
    client = MilvusClient(uri=uri)
    layout = read_layout(client, collection)
    client.close()
    registry = ModelRegistry(model_dir)
    path = registry.version_path(collection, "v1")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_moment_router(MomentScorer.from_moments(layout.moments), layout, collection, path,
                         router_kind="moments")
    registry.publish(collection, path, "v1", {})


def run(args, uri: str, where: str) -> dict:
    from milvus_ltr_router.fixture import load_fixture
    fx = load_fixture()
    docs, queries = fx.docs[:args.docs], fx.queries[:args.queries]
    exact = np.argsort(-(queries @ docs.T), axis=1)[:, :10]        # ids are row numbers
    tmp = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    src, collection = build(uri, docs, args.clusters)
    print(f"laid out {len(docs)} documents in {args.clusters} clusters ({time.perf_counter() - t0:.0f} s)")
    model_dir = str(Path(tmp.name) / "models")
    if args.router == "onnx":
        publish_moment_router(uri, collection, model_dir)
    methods = Methods(uri, collection, model_dir, queries, args.nprobe, args.concurrency)
    answers = {m: methods.run(m) for m in METHODS}                   # warm-up, and the answers
    same = float(np.mean([a == b for a, b in zip(answers["async_routed"],
                                                 answers["sync_routed_pool"])]))
    rng = random.Random(args.seed)
    qps = {m: [] for m in METHODS}
    cpu = {m: [] for m in METHODS}
    loads = []
    for r in range(args.rounds):
        order = list(METHODS)
        rng.shuffle(order)
        for m in order:
            c0, t0 = time.process_time(), time.perf_counter()
            methods.run(m)
            wall, used = time.perf_counter() - t0, time.process_time() - c0
            qps[m].append(len(queries) / wall)
            cpu[m].append(1000 * used / len(queries))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {qps[m][-1]:.0f} QPS" for m in METHODS),
              flush=True)
    methods.close()
    drop(uri, src, collection)
    rows = [{"method": m, "qps": statistics.median(qps[m]), "qps_min": min(qps[m]),
             "qps_max": max(qps[m]), "client_cpu_ms_per_query": statistics.median(cpu[m]),
             "recall@10": recall(answers[m], exact)} for m in METHODS]
    ratio = statistics.median(qps["async_routed"]) / statistics.median(qps["sync_routed_pool"])
    print_table(rows, ["method", "qps", "qps_min", "qps_max", "client_cpu_ms_per_query", "recall@10"],
                title=f"{len(queries)} queries, one per request, {args.concurrency} in flight, "
                      f"nprobe {args.nprobe} of {args.clusters} (routed, {args.router} moment "
                      f"router); median of {args.rounds} "
                      f"interleaved rounds; load average {min(loads):.1f}-{max(loads):.1f} on "
                      f"{os.cpu_count()} cores")
    print(f"async routed / sync routed with a pool of {args.concurrency}: {ratio:.2f}x QPS; "
          f"the two routed clients return the same ids for {same:.0%} of queries")
    payload = {"milvus": where, "docs": len(docs), "clusters": args.clusters,
               "queries": len(queries), "nprobe": args.nprobe, "concurrency": args.concurrency,
               "rounds": args.rounds, "router": args.router, "rows": rows, "async_over_sync": ratio, "same_ids": same,
               "load": loads, "qps_by_round": qps}
    save("bench_async", payload, Path(args.out) if args.out else None)
    return payload


if __name__ == "__main__":
    main()
