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

    python -m benchmarks.bench_end_to_end [--dataset fixture|small|medium|large] [--quick]

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
    return {"partition": "partition/cluster", "grouped": "grouped+filter", "single": "cid filter"}[mode]


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
    parser.add_argument("--storage", nargs="+", default=["auto"], choices=STORAGE_CHOICES,
                        help="storage modes to build from the same clusters and time side by side "
                             "(the first also carries centroid and paper routing; default: auto)")
    parser.add_argument("--groups", type=int, default=None, help="G for --storage grouped")
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
    docs, queries = data.docs, data.queries
    # held-out queries drawn at random: the query files come in topic order, and the last
    # topic alone (MS MARCO) is not the mix the router is trained and calibrated on
    perm = np.random.default_rng(0).permutation(len(queries))
    test_idx, train_idx = np.sort(perm[:args.queries]), np.sort(perm[args.queries:])
    if args.unit_norm:
        docs, queries = normalize_rows(docs), normalize_rows(queries)
    train_q, test_q = queries[train_idx], queries[test_idx]
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
        src, ivf = f"e2e_src_{tag}", f"e2e_ivf_{tag}"
        create_vector_collection(client, src, docs)
        client.load_collection(src)
        layouts, first = {}, None
        for mode in dict.fromkeys(args.storage):
            t0 = time.perf_counter()
            report = build_layout(client, src, f"e2e_{mode}_{tag}", storage=mode, groups=args.groups,
                                  clusters_from=first)
            first = first or report.layout
            lay = report.layout
            load_s, segments = load_seconds(client, lay.collection)
            layouts[lay.storage.mode] = lay.collection
            storage_rows.append({"storage": lay.storage.mode, "collection": lay.collection,
                                 "partitions": lay.storage.n_groups, "build_s": time.perf_counter() - t0,
                                 "load_s": load_s, "segments": segments})
        n_parts = first.n_partitions
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
        learned = RoutedMilvusClient(uri, model_dir=f"{tmp}/models", log_rate=0)
        centroid = RoutedMilvusClient(uri, model_dir=f"{tmp}/none", log_rate=0)
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
        for n in [n for n in nprobes if n <= n_parts]:
            for name, c, coll in routed:
                configs.append((name, f"nprobe={n}", n, lambda q, c=c, n=n, coll=coll: c.search(
                    coll, data=[q.tolist()], limit=10, nprobe=n)[0]))
            configs.append(("native IVF_FLAT", f"nprobe={n}", n, lambda q, n=n: client.search(
                ivf, data=[q.tolist()], limit=10,
                search_params={"metric_type": "IP", "params": {"nprobe": n}})[0]))
        for t in (args.recall_targets if result.decision == "published" else []):
            probed = np.mean([len(p) for p in learned.route(base, test_q, recall_target=t)])
            for m in modes:
                name = f"learned adaptive ({storage_label(m)})" if multi else "learned adaptive"
                configs.append((name, f"target={t} (mean {probed:.1f})", probed,
                                lambda q, t=t, coll=layouts[m]: learned.search(
                                    coll, data=[q.tolist()], limit=10, recall_target=t)[0]))
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
        timings["load_average_before_timing"] = load_avg
        timings["load_average_after"] = os.getloadavg()
        for _, c, _ in routed:
            c.close()
        extra = [bounded.collection] if bounded is not None else []
        for name in [src, ivf] + [x for coll in list(layouts.values()) + extra
                                  for x in (coll, f"{coll}__ltr_layout")]:
            client.drop_collection(name)
        client.close()
    print(f"\n{label} ({server_version}); N={len(docs)}, L={n_parts}, {len(test_q)} held-out queries; "
          f"{'unit-norm' if args.unit_norm else 'unnormalised'} vectors; router decision: "
          f"{result.decision}; load average {load_avg[0]:.2f} before timing, "
          f"{timings['load_average_after'][0]:.2f} after")
    print_table(storage_rows, ["storage", "partitions", "segments", "build_s", "load_s"],
                "collections: partitions, loaded segments, build and load seconds")
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
                            "qps_vs_ivf"],
                "goals: routed vs native IVF_FLAT at equal recall@10 (cheapest configuration reaching "
                "it; bound = IVF_FLAT at nprobe = the clusters the routed search probes)")
    # every fixed sweep at the recall each adaptive target reached: the like-for-like comparison
    adaptive = [r for r in rows if r["method"].startswith("learned adaptive")]
    first_adaptive = sorted({r["method"] for r in adaptive})[:1]
    reached = sorted(r["recall@10"] for r in adaptive if r["method"] in first_adaptive)
    fixed_rows = [r for r in rows if not r["method"].startswith("learned adaptive") and r["method"] != "FLAT"]
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
                "fixed_at_adaptive_recall": equal,
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
              for m in sorted({r["method"] for r in rows} - {"FLAT"})}
    plot_lines(out / f"{name}_partitions.png", probed, "mean partitions (IVF: lists) probed",
               "recall@10", f"{args.dataset}: N={len(docs)}, L={n_parts}", logx=True)
    return 0


def goals(rows: list[dict], configs, queries, args, learned_methods: list[str],
          targets=(0.9, 0.95)) -> tuple[list[dict], list[dict]]:
    """At each recall@10 target: every learned method's cheapest configuration reaching it
    against native IVF_FLAT's - median latency, the native-cost bound, and (with
    ``--concurrency``) QPS with that many concurrent clients."""
    fns = {(m, p): fn for m, p, _, fn in configs}
    out, tput = [], []
    for t in targets:
        ivf = cheapest_reaching(rows, "native IVF_FLAT", t)
        picks = [r for r in (cheapest_reaching(rows, m, t) for m in sorted(set(learned_methods) |
                 {r["method"] for r in rows if r["method"].startswith("learned adaptive")})) if r]
        if ivf is None or not picks:
            continue
        qps = {}
        if args.concurrency > 0:
            chosen = [(r["method"], r["param"], fns[(r["method"], r["param"])]) for r in picks + [ivf]]
            for res in throughput(chosen, queries, args.concurrency, args.throughput_seconds):
                qps[res["method"]] = res["qps"]
                tput.append({"recall@10": t, **res})
        for r in picks:
            bound = native_cost_bound(rows, "native IVF_FLAT", r["partitions"])
            out.append({"recall@10": t, "method": r["method"], "param": r["param"],
                        "reached": r["recall@10"], "median_ms": r["median_ms"],
                        "ivf_param": ivf["param"], "ivf_median_ms": ivf["median_ms"],
                        "speedup_vs_ivf": ivf["median_ms"] / r["median_ms"],
                        "native_cost_bound_ms": bound,
                        "within_bound_x": r["median_ms"] / bound if bound else None,
                        "qps_conc": qps.get(r["method"]), "ivf_qps_conc": qps.get("native IVF_FLAT"),
                        "qps_vs_ivf": qps[r["method"]] / qps["native IVF_FLAT"] if qps else None})
    return out, tput


if __name__ == "__main__":
    raise SystemExit(main())
