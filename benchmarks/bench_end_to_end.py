"""End to end through a real Milvus server: learned vs centroid routing vs native IVF_FLAT vs FLAT.

Same server, same run, same held-out real queries, one query per request:
(a) RoutedMilvusClient with the learned router over the layout's partitions,
(b) the same client with centroid routing over the same partitions,
(c) Milvus's own IVF_FLAT on an unpartitioned copy, nlist = L, nprobe sweep,
(d) FLAT (exact). recall@10 against exact MIPS neighbours, QPS and mean/median/p99 latency,
every configuration timed on every query in a random order per query (server drift spreads
evenly). ``--paper-baseline`` adds a router trained on top-1 labels only (the paper's);
``--max-cluster-ratio R`` adds the same clusters built with that size bound (own router),
timed beside the unbounded layout, with median and p99 latency at recall@10 0.9 and 0.95.
``--hnsw`` adds Milvus's HNSW (M 16, efConstruction 200) on a third copy, ef swept, reported
wherever IVF_FLAT is.

Batches and concurrency (issue 21): ``--batches 1 8 32 128`` times batch searches of that many
held-out queries and ``--clients 1 8 32`` that many threads sending one query per request,
for each method's cheapest configuration reaching recall@10 0.9 and 0.95 in the single-query
sweep - routed (the batch planner on; and off: one request per distinct cluster set),
IVF_FLAT and HNSW - every configuration in a fresh random order per batch (per round of the
concurrency runs), with the routed plans' statistics (requests per batch, extra clusters
scanned per query).

    python -m benchmarks.bench_end_to_end [--dataset fixture|small|medium|large] [--quick]
        [--hnsw] [--batches 1 8 32 128] [--clients 1 8 32]

``large`` (~289k model2vec vectors) is the set for latency at scale; its
recall figures compare methods with each other, not with the paper.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.bench_quality import fixed_nprobe_for
from benchmarks.common import RESULTS, plot_lines, print_table, save, setup_logging
from milvus_ltr_router.calibration import ranks_in
from milvus_ltr_router.clustering import assign_clusters
from benchmarks.datasets import DATASETS
from milvus_ltr_router.progress import progress

log = logging.getLogger("benchmarks.end_to_end")

NPROBES = (1, 2, 4, 8, 16, 32)


def summarise(lat_ms: list[float], recalls: list[float]) -> dict:
    lat = np.asarray(lat_ms)
    return {"recall@10": float(np.mean(recalls)), "qps": float(1000 / lat.mean()),
            "mean_ms": float(lat.mean()), "median_ms": float(np.median(lat)),
            "p99_ms": float(np.percentile(lat, 99))}


def timed_interleaved(configs: list[tuple[str, str, float, object]], queries, exact_ids,
                      seed: int = 0, warmup: int = 20) -> list[dict]:
    """Time every ``(method, param, mean partitions, fn)`` on every query, each query's
    configurations in a fresh random order, so server drift (compaction, caches, a busy
    neighbour) spreads over all methods instead of landing on whichever ran in that minute."""
    rng = np.random.default_rng(seed)
    for q in queries[:warmup]:
        for *_, fn in configs:
            fn(q)
    lat = [[] for _ in configs]
    rec = [[] for _ in configs]
    for q, truth in progress(zip(queries, exact_ids), total=len(queries), desc="timed queries",
                             unit="queries"):
        truth = set(truth.tolist())
        for j in rng.permutation(len(configs)):
            t0 = time.perf_counter()
            hits = configs[j][3](q)
            lat[j].append((time.perf_counter() - t0) * 1000)
            rec[j].append(len({h["id"] for h in hits} & truth) / len(truth))
    return [{"method": m, "param": p, "partitions": n, **summarise(lat[j], rec[j])}
            for j, (m, p, n, _) in enumerate(configs)]


def winners(rows: list[dict], target: float) -> list[dict]:
    out = []
    for method in sorted({r["method"] for r in rows}):
        best = cheapest_reaching(rows, method, target)
        if best:
            out.append({"recall_target": target, "method": method, "param": best["param"],
                        "recall@10": best["recall@10"], "median_ms": best["median_ms"],
                        "mean_ms": best["mean_ms"],
                        "qps": best["qps"]})
    out.sort(key=lambda r: r["median_ms"])
    for r in out:
        r["slower_than_best_x"] = r["median_ms"] / out[0]["median_ms"]
    return out


def latency_at_recall(rows: list[dict], targets, key: str = "median_ms", label: str = "ms"
                      ) -> list[dict]:
    """Each method's ``key`` (latency, partitions) at each recall@10, interpolated linearly
    between the two sweep points around it (none outside the swept range), so a coarse grid
    favours no method."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["recall@10"], r[key]) for r in rows if r["method"] == method)
        row = {"method": method}
        for t in targets:
            above = [p for p in pts if p[0] >= t]
            below = [p for p in pts if p[0] < t]
            if not above:
                row[f"{label}@{t}"] = None
            elif not below:             # a single-point method (FLAT) reaches every lower recall
                row[f"{label}@{t}"] = above[0][1] if len(pts) == 1 else None
            else:
                (r0, m0), (r1, m1) = below[-1], above[0]     # pts sorted by recall
                row[f"{label}@{t}"] = m0 + (t - r0) / (r1 - r0) * (m1 - m0)
        out.append(row)
    return out


def coverage_curve(router, queries: np.ndarray, neighbour_parts: np.ndarray,
                   max_nprobe: int = 256) -> list[float]:
    """Recall@k of a partition-restricted exact search at nprobe = 1, 2, ...: the share of
    each query's exact neighbours whose partition is among its first nprobe."""
    hit_rank = ranks_in(router.rank(queries, router.n_partitions), neighbour_parts)
    return [float((hit_rank < n).mean()) for n in range(1, min(max_nprobe, router.n_partitions) + 1)]


def storage_label(mode: str) -> str:
    return {"partition": "partition/cluster", "grouped": "grouped+filter", "single": "cid filter",
            GEOMETRIC: "grouped by centroids+filter"}.get(mode, mode)


# --storage choice of this benchmark only: grouped storage whose groups come from centroid
# geometry even with --coprobe-groups (to time both groupings side by side)
GEOMETRIC = "grouped-centroids"


def throughput(configs: list[tuple[str, str, object]], queries: np.ndarray, clients: int,
               seconds: float, seed: int = 0) -> list[dict]:
    """QPS of each ``(method, param, fn)`` with ``clients`` threads each sending one query per
    request back to back for ``seconds`` (methods in a random order, one at a time)."""
    import threading
    rng = np.random.default_rng(seed)
    out = []
    for j in rng.permutation(len(configs)):
        method, param, fn = configs[j]
        done = [0] * clients
        stop = time.perf_counter() + seconds

        def worker(w: int):
            i = w
            while time.perf_counter() < stop:
                fn(queries[i % len(queries)])
                done[w] += 1
                i += clients

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.append({"method": method, "param": param, "clients": clients,
                    "qps": sum(done) / (time.perf_counter() - t0)})
    return out


def cheapest_reaching(rows: list[dict], method: str, target: float) -> dict | None:
    ok = [r for r in rows if r["method"] == method and r["recall@10"] >= target]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def native_cost_bound(rows: list[dict], ivf_method: str, partitions: float, key: str = "median_ms"
                      ) -> float | None:
    """IVF_FLAT's ``key`` at nprobe = ``partitions`` (interpolated along its sweep): what a routed
    search probing that many clusters would cost if a cluster cost what a native list costs."""
    pts = sorted((r["partitions"], r[key]) for r in rows if r["method"] == ivf_method)
    for (n0, m0), (n1, m1) in zip(pts, pts[1:]):
        if n0 <= partitions <= n1:
            return m0 + (partitions - n0) / max(n1 - n0, 1e-12) * (m1 - m0)
    return None


def latency_with_bound(rows: list[dict], methods: list[str], targets=(0.9, 0.95)) -> list[dict]:
    """Median and p99 ms of ``methods`` at each recall@10, each interpolated along the method's
    nprobe sweep (:func:`latency_at_recall`): the layout with and without the size bound."""
    med = {r["method"]: r for r in latency_at_recall(rows, targets)}
    p99 = {r["method"]: r for r in latency_at_recall(rows, targets, "p99_ms", "p99_ms")}
    return [{"method": m, **{k: v for t in targets for k, v in
                             ((f"median_ms@{t}", med[m][f"ms@{t}"]), (f"p99_ms@{t}", p99[m][f"p99_ms@{t}"]))}}
            for m in methods]


BATCH_TARGETS = (0.9, 0.95)


def batches_of(n_queries: int, nq: int, min_queries: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of ``nq`` query indices covering at least ``min_queries`` queries (and at least
    two batches): consecutive slices of random permutations of ``range(n_queries)``, so every
    query is used about equally often and a batch holds unrelated queries (the hard case
    for sharing requests)."""
    rng = np.random.default_rng(seed)
    nq = min(nq, n_queries)
    n_batches = max(2, -(-min_queries // nq))
    order = np.concatenate([rng.permutation(n_queries)
                            for _ in range(-(-n_batches * nq // n_queries))])
    return [order[b * nq:(b + 1) * nq] for b in range(n_batches)]


def timed_batches(configs: list[tuple[str, str, object, object]], queries: np.ndarray,
                  exact_ids: np.ndarray, nq: int, min_queries: int, seed: int = 0,
                  warmup: int = 2) -> list[dict]:
    """Time every ``(method, param, batch_fn, plan_fn)`` on the same batches of ``nq`` queries,
    each batch's configurations in a fresh random order. ``batch_fn(Q)`` returns one hit list
    per query; ``plan_fn()`` (None: not routed) the routed client's ``last_plan`` after it.
    Per configuration: per-query ms (median batch ms / nq), QPS over all batches, recall@10,
    and for routed ones the mean requests per batch and extra clusters per query."""
    rng = np.random.default_rng(seed)
    batches = batches_of(len(queries), nq, min_queries, seed)
    for b in batches[:warmup]:
        for _, _, fn, _ in configs:
            fn(queries[b])
    lat = [[] for _ in configs]
    rec = [[] for _ in configs]
    reqs = [[] for _ in configs]
    extra = [[] for _ in configs]
    for b in progress(batches, total=len(batches), desc=f"batches of {nq}", unit="batches"):
        Q = queries[b]
        for j in rng.permutation(len(configs)):
            _, _, fn, plan_fn = configs[j]
            t0 = time.perf_counter()
            hits = fn(Q)
            lat[j].append((time.perf_counter() - t0) * 1000)
            for row, truth in zip(hits, exact_ids[b]):
                rec[j].append(len({h["id"] for h in row} & set(truth.tolist())) / len(truth))
            if plan_fn is not None:
                plan = plan_fn()
                reqs[j].append(plan["requests"])
                extra[j].append(float(np.mean(plan.get("extra_clusters") or [0.0])))
    out = []
    for j, (method, param, _, plan_fn) in enumerate(configs):
        ms = np.asarray(lat[j])
        out.append({"nq": len(batches[0]), "method": method, "param": param,
                    "batches": len(batches), "recall@10": float(np.mean(rec[j])),
                    "per_query_ms": float(np.median(ms)) / len(batches[0]),
                    "batch_median_ms": float(np.median(ms)),
                    "qps": len(batches) * len(batches[0]) * 1000 / float(ms.sum()),
                    "requests_per_batch": float(np.mean(reqs[j])) if plan_fn else None,
                    "extra_clusters_per_query": float(np.mean(extra[j])) if plan_fn else None})
    return out


def concurrent_qps(configs: list[tuple[str, str, object]], queries: np.ndarray, clients: int,
                   seconds: float, rounds: int = 3, seed: int = 0) -> list[dict]:
    """QPS of each ``(method, param, fn)`` with ``clients`` threads sharing its client, each
    sending one query per request back to back: ``rounds`` rounds of ``seconds / rounds``
    per configuration, configurations in a fresh random order per round (drift spreads over
    all). Also the client process's CPU per query (all its threads: routing, pymilvus, gRPC)
    and the whole machine's busy share while it ran (server and neighbours included)."""
    import threading
    rng = np.random.default_rng(seed)
    done_total = np.zeros(len(configs))
    wall = np.zeros(len(configs))
    cpu = np.zeros(len(configs))
    busy = [[] for _ in configs]
    for _ in range(rounds):
        for j in rng.permutation(len(configs)):
            fn = configs[j][2]
            done = [0] * clients
            stop = time.perf_counter() + seconds / rounds

            def worker(w: int):
                i = w * 7919
                while time.perf_counter() < stop:
                    fn(queries[i % len(queries)])
                    done[w] += 1
                    i += 1

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
            stat0, c0, t0 = machine_busy(), time.process_time(), time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall[j] += time.perf_counter() - t0
            cpu[j] += time.process_time() - c0
            busy[j].append(machine_busy(stat0))
            done_total[j] += sum(done)
    return [{"clients": clients, "method": m, "param": p, "qps": float(done_total[j] / wall[j]),
             "queries": int(done_total[j]),
             "client_cpu_ms_per_query": float(cpu[j] * 1000 / max(done_total[j], 1)),
             "machine_busy": float(np.mean([b for b in busy[j] if b is not None]))
             if any(b is not None for b in busy[j]) else None}
            for j, (m, p, _) in enumerate(configs)]


def machine_busy(since=None):
    """``/proc/stat``'s CPU counters now, or (given an earlier reading) the share of all
    CPUs' time busy since then (None where /proc/stat is missing)."""
    try:
        fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return None
    if since is None:
        return fields
    delta = np.subtract(fields, since)
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0.0)     # idle + iowait
    return float(1.0 - idle / delta.sum()) if delta.sum() > 0 else None


def pick_configs(rows: list[dict], methods: list[str], targets=BATCH_TARGETS) -> list[tuple[float, dict]]:
    """Each ``methods`` entry's cheapest single-query configuration reaching each target
    (``methods`` entries may be lists of method names: the cheapest among them)."""
    out = []
    for t in targets:
        for group in methods:
            names = [group] if isinstance(group, str) else group
            picks = [r for r in (cheapest_reaching(rows, m, t) for m in names) if r]
            if picks:
                out.append((t, min(picks, key=lambda r: r["median_ms"])))
    return out


def load_seconds(client, collection: str) -> tuple[float, int]:
    """Release and load ``collection`` again: seconds, and segments loaded."""
    client.release_collection(collection)
    t0 = time.perf_counter()
    client.load_collection(collection)
    seconds = time.perf_counter() - t0
    return seconds, len(client.list_loaded_segments(collection))


def main(argv=None) -> int:
    import os
    import shutil
    from pymilvus import MilvusClient
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.clustering import normalize_rows
    from benchmarks.datasets import EmbeddingDataset, load_or_build
    from milvus_ltr_router.labels import array_blocks, exact_knn
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.schema import vector_index_params
    from milvus_ltr_router.writer import create_vector_collection
    from milvus_ltr_router.registry import ModelRegistry
    from milvus_ltr_router.retrain import RetrainConfig, retrain
    from milvus_ltr_router.storage import STORAGE_CHOICES
    from benchmarks.server import milvus_uri

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fixture", choices=list(DATASETS))
    parser.add_argument("--unit-norm", action="store_true",
                        help="normalise documents and queries to unit length (cosine data, the "
                             "common production case); exact neighbours recomputed")
    parser.add_argument("--storage", nargs="+", default=["auto"],
                        choices=list(STORAGE_CHOICES) + [GEOMETRIC],
                        help="storage modes to build from the same clusters and time side by side "
                             "(the first also carries centroid and paper routing; default: auto)")
    parser.add_argument("--groups", type=int, default=None, help="G for --storage grouped")
    parser.add_argument("--coprobe-groups", action="store_true",
                        help="give build-layout up to 5000 training queries as the query log: "
                             "'grouped' groups clusters they probe together (nprobe 16) and "
                             "'auto' chooses by the cost model (--cost-model); "
                             f"'{GEOMETRIC}' keeps centroid groups for comparison")
    parser.add_argument("--train-queries", type=int, default=None,
                        help="train the router on this many of the training queries (default all; "
                             "labels over 1M rows take ~17 min for all 58k here)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries to time")
    parser.add_argument("--nprobes", type=int, nargs="*", default=list(NPROBES),
                        help="nprobe values to sweep for every method")
    parser.add_argument("--label-k", type=int, default=10,
                        help="train the router on the top-k neighbours' partitions (1 = the paper)")
    parser.add_argument("--top1-weight", type=float, default=0.5,
                        help="with --label-k > 1, weight of the top-1 term in the training loss")
    parser.add_argument("--paper-baseline", action="store_true",
                        help="also route with a router trained on top-1 labels only (the paper)")
    parser.add_argument("--recall-targets", type=float, nargs="*", default=[0.7, 0.8, 0.9, 0.95],
                        help="recall_target values for the learned router's adaptive nprobe")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="clients for the throughput test (0: skip it)")
    parser.add_argument("--throughput-seconds", type=float, default=5.0,
                        help="seconds each method runs in the throughput test")
    parser.add_argument("--max-cluster-ratio", type=float, default=None, metavar="R",
                        help="also build the first storage mode's clusters with this size bound "
                             "(same centroids), train its own router and time its learned and "
                             "centroid routing beside the unbounded layout's")
    parser.add_argument("--hnsw", action="store_true",
                        help="also time Milvus's HNSW on a third copy (ef swept by --hnsw-efs)")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=200)
    parser.add_argument("--hnsw-efs", type=int, nargs="*", default=[16, 24, 32, 48, 64, 96, 128, 192, 256],
                        help="HNSW ef values to sweep (at least the limit, 10)")
    parser.add_argument("--batches", type=int, nargs="*", default=[],
                        help="batch sizes (queries per request) to time at recall@10 0.9 / 0.95, "
                             "e.g. 1 8 32 128 (none: skip)")
    parser.add_argument("--batch-queries", type=int, default=None,
                        help="queries each batch size covers (default: the held-out queries)")
    parser.add_argument("--clients", type=int, nargs="*", default=[],
                        help="concurrent clients (threads, one query per request) to time at "
                             "recall@10 0.9 / 0.95, e.g. 1 8 32 (none: skip)")
    parser.add_argument("--client-seconds", type=float, default=6.0,
                        help="seconds each configuration runs per client count (in --client-rounds)")
    parser.add_argument("--client-rounds", type=int, default=3)
    parser.add_argument("--cost-model", default=None,
                        help="the routed client's batch-planning cost model (JSON from "
                             "benchmarks.bench_costs; default: the library's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    data = load_or_build(args.dataset)
    nprobes = tuple(args.nprobes)
    if args.quick:
        data = EmbeddingDataset("quick", data.docs[:3000], data.queries[:900])
        args.queries, nprobes = 50, (1, 4)
        args.throughput_seconds = min(args.throughput_seconds, 0.5)
        args.hnsw_efs = [16, 64]
        args.client_seconds, args.client_rounds = min(args.client_seconds, 0.6), 2
    docs, queries = data.docs, data.queries
    # held-out queries drawn at random: the query files come in topic order, and the last
    # topic alone (MS MARCO) is not the mix the router is trained and calibrated on
    perm = np.random.default_rng(0).permutation(len(queries))
    test_idx, train_idx = np.sort(perm[:args.queries]), np.sort(perm[args.queries:])
    if args.unit_norm:
        docs, queries = normalize_rows(docs), normalize_rows(queries)
    train_q, test_q = queries[train_idx], queries[test_idx]
    if args.train_queries is not None and args.train_queries < len(train_q):
        keep = np.random.default_rng(1).choice(len(train_q), args.train_queries, replace=False)
        train_q = train_q[np.sort(keep)]
    # row index = primary key: create_vector_collection numbers rows 0..N-1
    if args.unit_norm or args.quick:
        exact = exact_knn(test_q, array_blocks(docs, np.zeros(len(docs), int)), k=10).ids
    else:
        exact = data.exact_neighbours(10)[test_idx]
    tag = uuid.uuid4().hex[:6]
    timings: dict = {}
    storage_rows = []
    with milvus_uri() as (uri, label), tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(uri)
        server_version = client.get_server_version()
        src, ivf, hnsw = f"e2e_src_{tag}", f"e2e_ivf_{tag}", f"e2e_hnsw_{tag}"
        create_vector_collection(client, src, docs)
        client.load_collection(src)
        layouts, first = {}, None
        for mode in dict.fromkeys(args.storage):
            t0 = time.perf_counter()
            traffic = {}
            if args.coprobe_groups and mode != GEOMETRIC:
                traffic = dict(queries=train_q[:5000], probe_nprobe=16, cost_model=args.cost_model)
            report = build_layout(client, src, f"e2e_{mode.replace('-', '_')}_{tag}",
                                  storage="grouped" if mode == GEOMETRIC else mode,
                                  groups=args.groups, clusters_from=first, **traffic)
            first = first or report.layout
            lay = report.layout
            load_s, segments = load_seconds(client, lay.collection)
            key = GEOMETRIC if mode == GEOMETRIC else lay.storage.mode
            layouts[key] = lay.collection
            choice = report.storage_choice
            if choice is not None:
                log.info("%s: %s", mode, choice.summary())
            storage_rows.append({"storage": key, "collection": lay.collection,
                                 "partitions": lay.storage.n_groups, "build_s": time.perf_counter() - t0,
                                 "load_s": load_s, "segments": segments,
                                 "choice": choice.summary() if choice is not None else ""})
        n_parts = first.n_partitions
        if args.coprobe_groups:     # what --storage auto would choose here (decided, not built)
            from milvus_ltr_router.grouping import centroid_probes, choose_storage
            from milvus_ltr_router.costs import resolve_cost_model
            auto = choose_storage(centroid_probes(train_q[:5000], first.centroids, first.metric, 16),
                                  np.asarray(first.sizes, float), resolve_cost_model(args.cost_model),
                                  dim=first.dim, candidates=[args.groups] if args.groups else None)
            storage_rows.append({"storage": "auto (decided, not built)", "partitions": auto.n_groups or 1,
                                 "choice": auto.summary()})
        bounded, balance = None, {}
        if args.max_cluster_ratio is not None:      # same centroids, rows assigned under the bound
            from milvus_ltr_router.clustering import size_summary
            from milvus_ltr_router.layout import cluster_sizes
            t0 = time.perf_counter()
            bounded = build_layout(client, src, f"e2e_bal_{tag}", storage=first.storage.mode,
                                   groups=args.groups, clusters_from=first,
                                   max_cluster_ratio=args.max_cluster_ratio).layout
            build_s = time.perf_counter() - t0
            load_s, segments = load_seconds(client, bounded.collection)
            storage_rows.append({"storage": f"{bounded.storage.mode}, bound {args.max_cluster_ratio:g}",
                                 "collection": bounded.collection, "partitions": bounded.storage.n_groups,
                                 "build_s": build_s, "load_s": load_s, "segments": segments})
            t0 = time.perf_counter()
            cluster_sizes(client, bounded)          # what a routed writer reads before writing
            balance = {"max_cluster_ratio": args.max_cluster_ratio, "size_read_s": time.perf_counter() - t0,
                       "sizes": size_summary(first.sizes), "sizes_bounded": size_summary(bounded.sizes)}
        t0 = time.perf_counter()
        create_vector_collection(client, ivf, docs)
        client.release_collection(ivf)
        client.drop_index(ivf, "vector")
        client.create_index(ivf, vector_index_params(client, "vector", "IP", {
            "index_type": "IVF_FLAT", "params": {"nlist": n_parts}}))
        client.load_collection(ivf)
        timings["ivf_build_s"] = time.perf_counter() - t0
        load_s, segments = load_seconds(client, ivf)
        storage_rows.append({"storage": "native IVF_FLAT", "collection": ivf, "partitions": 1,
                             "build_s": timings["ivf_build_s"], "load_s": load_s, "segments": segments})
        if args.hnsw:
            t0 = time.perf_counter()
            create_vector_collection(client, hnsw, docs)
            client.release_collection(hnsw)
            client.drop_index(hnsw, "vector")
            client.create_index(hnsw, vector_index_params(client, "vector", "IP", {
                "index_type": "HNSW", "params": {"M": args.hnsw_m,
                                                 "efConstruction": args.hnsw_ef_construction}}))
            client.load_collection(hnsw)
            timings["hnsw_build_s"] = time.perf_counter() - t0
            load_s, segments = load_seconds(client, hnsw)
            storage_rows.append({"storage": f"HNSW (M {args.hnsw_m}, efConstruction "
                                            f"{args.hnsw_ef_construction})", "collection": hnsw,
                                 "partitions": 1, "build_s": timings["hnsw_build_s"],
                                 "load_s": load_s, "segments": segments})
        np.save(Path(tmp) / "train.npy", train_q)
        modes = list(layouts)
        base = layouts[modes[0]]

        def train_router(model_dir: str, label_k: int, collection: str = base):
            result = retrain(client, RetrainConfig(
                collection=collection, model_dir=model_dir, queries_file=f"{tmp}/train.npy", nprobe=2,
                min_queries=10, sample=len(train_q), label_k=label_k,
                top1_weight=args.top1_weight, metric="recall"))
            registry = ModelRegistry(model_dir)
            live = registry.current(base)
            for other in modes[1:]:      # same clusters: the same router serves every storage mode
                if live is not None and collection == base:
                    dest = registry.version_path(layouts[other], live.version)
                    os.makedirs(dest.parent, exist_ok=True)
                    shutil.copyfile(live.path, dest)
                    registry.publish(layouts[other], dest, live.version, live.metrics)
            return result

        t0 = time.perf_counter()
        result = train_router(f"{tmp}/models", args.label_k)
        timings["retrain_s"] = time.perf_counter() - t0
        learned = RoutedMilvusClient(uri, model_dir=f"{tmp}/models", log_rate=0,
                                     cost_model=args.cost_model)
        centroid = RoutedMilvusClient(uri, model_dir=f"{tmp}/none", log_rate=0,
                                      cost_model=args.cost_model)
        assert result.decision != "published" or \
            learned.router_status(base)["mode"] == result.training["router_kind"]
        # (method, client, collection): every storage mode with the learned router, the first
        # also with centroid (and the paper's) routing
        multi = len(modes) > 1
        routed = [(f"learned routing ({storage_label(m)})" if multi else "learned routing", learned,
                   layouts[m]) for m in modes]
        routed.append((f"centroid routing ({storage_label(modes[0])})" if multi else "centroid routing",
                       centroid, base))
        if bounded is not None:             # its own router, trained on its own rows' clusters
            balance["router"] = train_router(f"{tmp}/models", args.label_k, bounded.collection).decision
            bound = f"bound {args.max_cluster_ratio:g}"
            routed += [(f"learned routing ({bound})", learned, bounded.collection),
                       (f"centroid routing ({bound})", centroid, bounded.collection)]
        if args.paper_baseline:
            train_router(f"{tmp}/paper", 1)
            routed.append(("paper routing (top-1 labels)",
                           RoutedMilvusClient(uri, model_dir=f"{tmp}/paper", log_rate=0), base))
        configs = []   # (method, param, mean partitions, one-query search); defaults bind loop values
        # (method, param) -> batch search: a list of query lists in, one hit list per query out;
        # routed ones as (client, collection, search kwargs) to run on any routed client
        batch_fns, routed_kw = {}, {}
        for n in [n for n in nprobes if n <= n_parts]:
            for name, c, coll in routed:
                configs.append((name, f"nprobe={n}", n, lambda q, c=c, n=n, coll=coll: c.search(
                    coll, data=[q.tolist()], limit=10, nprobe=n)[0]))
                routed_kw[(name, f"nprobe={n}")] = (c, coll, {"nprobe": n})
            ivf_params = {"metric_type": "IP", "params": {"nprobe": n}}
            configs.append(("native IVF_FLAT", f"nprobe={n}", n, lambda q, p=ivf_params: client.search(
                ivf, data=[q.tolist()], limit=10, search_params=p)[0]))
            batch_fns[("native IVF_FLAT", f"nprobe={n}")] = lambda Q, p=ivf_params: client.search(
                ivf, data=Q, limit=10, search_params=p)
        for ef in (args.hnsw_efs if args.hnsw else []):
            hnsw_params = {"metric_type": "IP", "params": {"ef": max(ef, 10)}}
            configs.append(("HNSW", f"ef={max(ef, 10)}", None, lambda q, p=hnsw_params: client.search(
                hnsw, data=[q.tolist()], limit=10, search_params=p)[0]))
            batch_fns[("HNSW", f"ef={max(ef, 10)}")] = lambda Q, p=hnsw_params: client.search(
                hnsw, data=Q, limit=10, search_params=p)
        for t in (args.recall_targets if result.decision == "published" else []):
            probed = np.mean([len(p) for p in learned.route(base, test_q, recall_target=t)])
            for m in modes:
                name = f"learned adaptive ({storage_label(m)})" if multi else "learned adaptive"
                configs.append((name, f"target={t} (mean {probed:.1f})", probed,
                                lambda q, t=t, coll=layouts[m]: learned.search(
                                    coll, data=[q.tolist()], limit=10, recall_target=t)[0]))
                routed_kw[(name, f"target={t} (mean {probed:.1f})")] = (learned, layouts[m],
                                                                        {"recall_target": t})
        # exact partition counts: with FLAT partitions recall@10 equals routing coverage, so each
        # fixed router's recall at every integer nprobe comes from its ranking, no server needed
        doc_parts = assign_clusters(docs, first.centroids, first.algorithm)
        coverage_curves = {name: coverage_curve(c.router(coll), test_q, doc_parts[exact])
                           for name, c, coll in routed if coll == base}
        configs.append(("FLAT", "-", n_parts, lambda q: client.search(src, data=[q.tolist()], limit=10)[0]))
        load_avg = os.getloadavg()
        log.info("timing %d configurations x %d queries, interleaved (load average %.2f %.2f %.2f)",
                 len(configs), len(test_q), *load_avg)
        rows = timed_interleaved(configs, test_q, exact)
        goal_rows, tput = goals(rows, configs, test_q, args, learned_methods=[n for n, *_ in routed
                                                                              if n.startswith("learned")])
        batch_rows, client_rows = [], []
        if args.batches or args.clients:
            adaptive_name = f"learned adaptive ({storage_label(modes[0])})" if multi else "learned adaptive"
            unplanned = RoutedMilvusClient(uri, model_dir=f"{tmp}/models", log_rate=0,
                                           batch_planning=False)
            batch_rows, client_rows = batches_and_clients(
                rows, configs, batch_fns, routed_kw, [routed[0][0], adaptive_name], learned, unplanned,
                test_q, exact, args)
            unplanned.close()
            timings["load_average_after_batches"] = os.getloadavg()
        timings["load_average_before_timing"] = load_avg
        timings["load_average_after"] = os.getloadavg()
        for _, c, _ in routed:
            c.close()
        extra = [bounded.collection] if bounded is not None else []
        for name in [src, ivf] + ([hnsw] if args.hnsw else []) + \
                [x for coll in list(layouts.values()) + extra
                                  for x in (coll, f"{coll}__ltr_layout")]:
            client.drop_collection(name)
        client.close()
    print(f"\n{label} ({server_version}); N={len(docs)}, L={n_parts}, {len(test_q)} held-out queries; "
          f"{'unit-norm' if args.unit_norm else 'unnormalised'} vectors; router decision: "
          f"{result.decision}; load average {load_avg[0]:.2f} before timing, "
          f"{timings['load_average_after'][0]:.2f} after")
    print_table(storage_rows, ["storage", "partitions", "segments", "build_s", "load_s"],
                "collections: partitions, loaded segments, build and load seconds")
    for row in storage_rows:
        if row.get("choice"):
            print(f"  {row['storage']}: {row['choice']}")
    print_table(rows, ["method", "param", "recall@10", "qps", "mean_ms", "median_ms", "p99_ms"],
                "recall@10 vs latency, single-query requests")
    win = [w for t in (0.7, 0.8, 0.9, 0.95) for w in winners(rows, t)]
    print_table(win, ["recall_target", "method", "param", "recall@10", "median_ms", "mean_ms", "qps",
                      "slower_than_best_x"], "fastest configuration reaching each recall@10")
    targets = (0.7, 0.8, 0.9, 0.95)
    interp = latency_at_recall(rows, targets)
    print_table(interp, ["method"] + [f"ms@{t}" for t in targets],
                "median ms at each recall@10, interpolated along each method's sweep")
    print_table(goal_rows, ["recall@10", "method", "param", "median_ms", "ivf_median_ms", "speedup_vs_ivf",
                            "native_cost_bound_ms", "within_bound_x", "qps_conc", "ivf_qps_conc",
                            "qps_vs_ivf"] + (["hnsw_param", "hnsw_median_ms", "speedup_vs_hnsw",
                                              "hnsw_qps_conc", "qps_vs_hnsw"] if args.hnsw else []),
                "goals: routed vs native IVF_FLAT at equal recall@10 (cheapest configuration reaching "
                "it; bound = IVF_FLAT at nprobe = the clusters the routed search probes)")
    print_batches_and_clients(batch_rows, client_rows)
    # every fixed sweep at the recall each adaptive target reached: the like-for-like comparison
    adaptive = [r for r in rows if r["method"].startswith("learned adaptive")]
    first_adaptive = sorted({r["method"] for r in adaptive})[:1]
    reached = sorted(r["recall@10"] for r in adaptive if r["method"] in first_adaptive)
    fixed_rows = [r for r in rows if not r["method"].startswith("learned adaptive")
                  and r["method"] not in ("FLAT", "HNSW")]
    equal = [{**a, **b} for a, b in zip(latency_at_recall(fixed_rows, reached, "partitions", "parts"),
                                         latency_at_recall(fixed_rows, reached, "mean_ms", "mean_ms"))]
    if reached:
        print_table(equal, ["method"] + [f"{k}@{t}" for t in reached for k in ("parts", "mean_ms")],
                    "fixed nprobe at the recall@10 each adaptive target reached: mean partitions "
                    "and mean ms")
    if bounded is not None:
        pairs = [r[0] for r in routed if r[2] in (base, bounded.collection)]
        balance["latency"] = latency_with_bound(rows, pairs)
        print_table(balance["latency"], list(balance["latency"][0]),
                    f"with and without --max-cluster-ratio {args.max_cluster_ratio:g} (bounded router: "
                    f"{balance['router']}; largest cluster {balance['sizes']['max_over_mean']:.2f} -> "
                    f"{balance['sizes_bounded']['max_over_mean']:.2f} x the mean; sizes read in "
                    f"{balance['size_read_s']:.2f} s): ms at recall@10, interpolated along each sweep")
    name = f"end_to_end_{args.dataset}{'_unit' if args.unit_norm else ''}_k{args.label_k}" + \
        ("_quick" if args.quick else "")
    exact_equal = [{"method": m, **{f"nprobe@{a['recall@10']:.3f}": fixed_nprobe_for(curve, a["recall@10"])
                                    for a in adaptive if a["method"] in first_adaptive}}
                   for m, curve in coverage_curves.items()]
    if reached:
        print_table(exact_equal, list(exact_equal[0]),
                    "fixed nprobe reaching each adaptive recall@10 exactly (routing coverage at "
                    "every integer nprobe, interpolated between integers)")
    save(name, {"server": label, "server_version": server_version, "N": len(docs), "L": n_parts,
                "unit_norm": args.unit_norm, "storage": storage_rows, "rows": rows, "winners": win,
                "median_ms_at_recall": interp, "goals": goal_rows, "throughput": tput,
                "fixed_at_adaptive_recall": equal, "batches": batch_rows, "clients": client_rows,
                "exact_fixed_nprobe_at_adaptive_recall": exact_equal,
                "timings": timings, "router": result.reason, "balance": balance}, args.out)
    out = Path(args.out) if args.out else RESULTS
    series = {}
    for method in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == method]
        series[method] = ([r["median_ms"] for r in rs], [r["recall@10"] for r in rs])
    plot_lines(out / f"{name}.png", series, "median latency (ms)", "recall@10",
               f"{args.dataset}: N={len(docs)}, L={n_parts}")
    probed = {m: ([r["partitions"] for r in rows if r["method"] == m],
                  [r["recall@10"] for r in rows if r["method"] == m])
              for m in sorted({r["method"] for r in rows} - {"FLAT", "HNSW"})}
    plot_lines(out / f"{name}_partitions.png", probed, "mean partitions (IVF: lists) probed",
               "recall@10", f"{args.dataset}: N={len(docs)}, L={n_parts}", logx=True)
    return 0


def goals(rows: list[dict], configs, queries, args, learned_methods: list[str],
          targets=(0.9, 0.95)) -> tuple[list[dict], list[dict]]:
    """At each recall@10 target: every learned method's cheapest configuration reaching it
    against native IVF_FLAT's (and HNSW's, when timed) - median latency, the native-cost
    bound, and (with ``--concurrency``) QPS with that many concurrent clients."""
    fns = {(m, p): fn for m, p, _, fn in configs}
    out, tput = [], []
    for t in targets:
        ivf = cheapest_reaching(rows, "native IVF_FLAT", t)
        hnsw = cheapest_reaching(rows, "HNSW", t)
        picks = [r for r in (cheapest_reaching(rows, m, t) for m in sorted(set(learned_methods) |
                 {r["method"] for r in rows if r["method"].startswith("learned adaptive")})) if r]
        if ivf is None or not picks:
            continue
        qps = {}
        if args.concurrency > 0:
            chosen = [(r["method"], r["param"], fns[(r["method"], r["param"])])
                      for r in picks + [ivf] + ([hnsw] if hnsw else [])]
            for res in throughput(chosen, queries, args.concurrency, args.throughput_seconds):
                qps[res["method"]] = res["qps"]
                tput.append({"recall@10": t, **res})
        for r in picks:
            bound = native_cost_bound(rows, "native IVF_FLAT", r["partitions"])
            vs_hnsw = {} if hnsw is None else {
                "hnsw_param": hnsw["param"], "hnsw_median_ms": hnsw["median_ms"],
                "speedup_vs_hnsw": hnsw["median_ms"] / r["median_ms"],
                "hnsw_qps_conc": qps.get("HNSW"),
                "qps_vs_hnsw": qps[r["method"]] / qps["HNSW"] if qps else None}
            out.append({"recall@10": t, "method": r["method"], "param": r["param"], **vs_hnsw,
                        "reached": r["recall@10"], "median_ms": r["median_ms"],
                        "ivf_param": ivf["param"], "ivf_median_ms": ivf["median_ms"],
                        "speedup_vs_ivf": ivf["median_ms"] / r["median_ms"],
                        "native_cost_bound_ms": bound,
                        "within_bound_x": r["median_ms"] / bound if bound else None,
                        "qps_conc": qps.get(r["method"]), "ivf_qps_conc": qps.get("native IVF_FLAT"),
                        "qps_vs_ivf": qps[r["method"]] / qps["native IVF_FLAT"] if qps else None})
    return out, tput


def batches_and_clients(rows: list[dict], configs, batch_fns: dict, routed_kw: dict,
                        routed_methods: list[str], planned, unplanned, queries: np.ndarray,
                        exact: np.ndarray, args) -> tuple[list[dict], list[dict]]:
    """Issue 21's tables: at recall@10 0.9 and 0.95, the cheapest single-query configuration
    of routed search (``routed_methods``: fixed nprobe or adaptive, the first storage mode),
    IVF_FLAT and HNSW, timed on batches (``args.batches``; routed with the batch planner -
    the ``planned`` client - and without it, ``unplanned``) and with concurrent clients
    (``args.clients``, one query per request). A configuration reaching both targets is timed
    once and reported under each."""
    one = {(m, p): fn for m, p, _, fn in configs}
    picks = pick_configs(rows, [routed_methods, "native IVF_FLAT", "HNSW"])
    timed_b: dict = {}      # (label, param) -> batch config
    timed_c: dict = {}      # (label, param) -> one-query config
    chosen = []             # (target, label, param)
    for t, r in picks:
        key = (r["method"], r["param"])
        if key in routed_kw:
            _, coll, kw = routed_kw[key]
            for label, c in (("routed, batch planner", planned), ("routed, one request per set",
                                                                  unplanned)):
                timed_b[(label, r["param"])] = (
                    label, r["param"], lambda Q, c=c, coll=coll, kw=kw: c.search(coll, data=Q, limit=10, **kw),
                    lambda c=c: c.last_plan)
                chosen.append((t, label, r["param"]))
            timed_c[("routed", r["param"])] = ("routed", r["param"], one[key])
            chosen.append((t, "routed", r["param"]))
        else:
            timed_b[key] = (r["method"], r["param"], batch_fns[key], None)
            timed_c[key] = (r["method"], r["param"], one[key])
            chosen.append((t, r["method"], r["param"]))
    batch_rows, client_rows = [], []
    n_cover = args.batch_queries or len(queries)
    lists = [q.tolist() for q in queries]          # every method gets the same Python lists

    class Rows:                                    # queries[b] -> lists, for timed_batches
        def __len__(self):
            return len(lists)

        def __getitem__(self, idx):
            return [lists[i] for i in idx]
    configs_b = list(timed_b.values())
    for nq in args.batches:
        log.info("timing batches of %d: %d configurations (load average %.2f)", nq, len(configs_b),
                 __import__("os").getloadavg()[0])
        res = timed_batches(configs_b, Rows(), exact, nq, n_cover)
        by_key = {(r["method"], r["param"]): r for r in res}
        for t, label, param in chosen:
            if (label, param) in by_key:
                batch_rows.append({"recall_target": t, **by_key[(label, param)]})
    configs_c = list(timed_c.values())
    for clients in args.clients:
        log.info("timing %d concurrent clients: %d configurations", clients, len(configs_c))
        res = concurrent_qps(configs_c, queries, clients, args.client_seconds, args.client_rounds)
        by_key = {(r["method"], r["param"]): r for r in res}
        for t, label, param in chosen:
            if (label, param) in by_key:
                client_rows.append({"recall_target": t, **by_key[(label, param)]})
    for table, key in ((batch_rows, "nq"), (client_rows, "clients")):
        for r in table:
            for native, col in (("native IVF_FLAT", "ivf"), ("HNSW", "hnsw")):
                ref = next((x for x in table if x["method"] == native and x[key] == r[key]
                            and x["recall_target"] == r["recall_target"]), None)
                if ref is None:
                    r[f"vs_{col}"] = None
                elif key == "nq":       # > 1: cheaper per query than the native index
                    r[f"vs_{col}"] = ref["per_query_ms"] / r["per_query_ms"]
                else:                   # > 1: more QPS than the native index
                    r[f"vs_{col}"] = r["qps"] / ref["qps"]
    return batch_rows, client_rows


def print_batches_and_clients(batch_rows: list[dict], client_rows: list[dict]) -> None:
    if batch_rows:
        print_table(batch_rows, ["recall_target", "nq", "method", "param", "recall@10", "per_query_ms",
                                 "batch_median_ms", "qps", "requests_per_batch",
                                 "extra_clusters_per_query", "vs_ivf", "vs_hnsw"],
                    "batches: each method's cheapest single-query configuration reaching the target; "
                    "per-query ms = median batch ms / nq (vs_*: the native index's per-query ms / "
                    "this one's)")
    if client_rows:
        print_table(client_rows, ["recall_target", "clients", "method", "param", "qps", "vs_ivf",
                                  "vs_hnsw", "client_cpu_ms_per_query", "machine_busy"],
                    "concurrent clients (threads sharing one client, one query per request): QPS "
                    "(vs_*: this QPS / the native index's)")


if __name__ == "__main__":
    raise SystemExit(main())
