"""What a search request costs on a Milvus server: fit the batch planner's CostModel.

Times filtered FLAT searches against cluster-ordered collections laid out like ``--storage
single`` (INT64 ``_ltr_cluster`` with STL_SORT, rows written in cluster order, a routed request
adds ``_ltr_cluster in [...]``), varying what the model says a request costs:

* the clusters named (``k``; the smallest or the largest clusters, so rows and count vary apart),
* queries per request (``nq``),
* collection size (N: a subsample of the documents, all of them, and tiled copies),
* sealed segments (the same rows flushed as one segment and as several),
* storage parts (the same rows as ``--parts`` partitions, laid out like ``--storage grouped``:
  a request names the partitions of its clusters, so it searches their segments and walks
  only their rows),

plus whole-collection searches without a filter (shown, not fitted: another code path). Every
configuration runs once per round in a fresh random order per round (server drift spreads
evenly), each time with other real queries. Then a non-negative least-squares fit of the
per-configuration medians, relative error weighted, gives::

    ms = request + cluster * k + segment * S + row_walked * W
         + nq * (query + row_scanned * R + query_row_walked * W)

(R: rows of the clusters named; S, W: sealed segments and rows of the collection), printed, saved as JSON (``cost_model`` in it reads back with
``CostModel.read(path)``) and compared with the measurements.

    python -m benchmarks.bench_costs [--dataset fixture|large|...] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
import uuid
from datetime import date

import numpy as np

from benchmarks.common import print_table, save, setup_logging
from benchmarks.datasets import DATASETS
from milvus_ltr_router.costs import CostModel
from milvus_ltr_router.storage import CLUSTER_FIELD, cluster_filter, group_names_for

log = logging.getLogger("benchmarks.costs")

TERMS = ("request_ms", "cluster_ms", "segment_ms", "row_walked_ms", "query_ms", "row_scanned_ms",
         "query_row_walked_ms")


def design_row(k: int, segments: int, walked: float, nq: int, scanned: float) -> list[float]:
    """The model's regressors for one request, in :data:`TERMS` order."""
    return [1.0, k, segments, walked, nq, nq * scanned, nq * walked]


def fit_costs(points: list[dict], key: str = "median_ms") -> tuple[dict, np.ndarray]:
    """Non-negative least squares of ``key`` on :func:`design_row`, each point weighted by
    1/its time (relative error). Returns the coefficients by term and the predictions."""
    from scipy.optimize import nnls
    A = np.array([design_row(p["k"], p["segments"], p["walked"], p["nq"], p["scanned"]) for p in points])
    y = np.array([p[key] for p in points])
    w = 1.0 / y
    scale = np.abs(A).max(axis=0)          # columns spanning 1 .. 1e6 rows: fit in unit scale
    scale[scale == 0] = 1.0
    coef, _ = nnls(A / scale * w[:, None], y * w)
    coef = coef / scale
    return dict(zip(TERMS, coef.tolist())), A @ coef


@contextlib.contextmanager
def server(no_compaction: bool = True):
    """``MILVUS_URI`` if set, else an embedded 2.3.5 with automatic compaction off (it would
    merge the deliberately separate segments while they are timed)."""
    uri = os.environ.get("MILVUS_URI")
    if uri:
        yield uri, f"MILVUS_URI={uri}"
        return
    from benchmarks.embedded_server import start_embedded_server
    extra = {"dataCoord.compaction.enableAutoCompaction": False} if no_compaction else {}
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as base:
        srv = start_embedded_server(base, extra_config=extra)
        try:
            yield srv.uri, f"embedded Milvus 2.3.5 at {srv.uri}"
        finally:
            srv.stop()


def write_collection(client, name: str, vectors: np.ndarray, clusters: np.ndarray, segments: int,
                     batch: int = 8192, group_of: np.ndarray | None = None) -> dict:
    """A ``single``-storage-like collection: rows in cluster order, FLAT (IP) on the vector,
    STL_SORT on the cluster id; flushed ``segments`` times (one sealed segment per part).
    With ``group_of`` (a group per cluster) a ``grouped``-like one instead: group ``g``'s rows
    in partition ``g000``... (``part_segments``: sealed segments per group)."""
    from pymilvus import DataType, MilvusClient
    order = np.argsort(clusters, kind="stable")
    vectors, clusters = vectors[order], clusters[order]
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    schema.add_field(CLUSTER_FIELD, DataType.INT64)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP", params={})
    index.add_index(field_name=CLUSTER_FIELD, index_type="STL_SORT")
    client.create_collection(name, schema=schema, index_params=index)
    client.release_collection(name)
    t0 = time.perf_counter()

    def put(lo, hi, partition=""):
        for s in range(lo, hi, batch):
            e = min(s + batch, hi)
            client.insert(name, [{"id": int(i), "vector": v, CLUSTER_FIELD: int(c)} for i, v, c in
                                 zip(range(s, e), vectors[s:e].tolist(), clusters[s:e].tolist())],
                          partition_name=partition)

    if group_of is None:
        bounds = np.linspace(0, len(vectors), segments + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            put(lo, hi)
            client.flush(name)
    else:
        row_group = np.asarray(group_of)[clusters]
        names = group_names_for(int(np.max(group_of)) + 1)
        for g, part in enumerate(names):
            client.create_partition(name, part)
            rows = np.flatnonzero(row_group == g)       # contiguous: rows are in cluster order
            if len(rows):                               # ... and groups are cluster-id ranges
                put(int(rows[0]), int(rows[-1]) + 1, part)
        client.flush(name)
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    client.load_collection(name)
    load_s = time.perf_counter() - t0
    out = {"collection": name, "rows": len(vectors), "insert_s": insert_s, "load_s": load_s,
           **segment_info(client, name)}
    if group_of is not None:
        out["group_of"] = np.asarray(group_of)
        out["part_rows"] = np.bincount(np.asarray(group_of)[clusters], minlength=len(names))
    return out


def segment_info(client, name: str) -> dict:
    segs = client.list_loaded_segments(name)
    # partitions are numbered in creation order: per-partition counts in that order (the
    # empty _default partition holds none)
    by_part = {}
    for s in segs:
        by_part[s.partition_id] = by_part.get(s.partition_id, 0) + 1
    return {"segments": len(segs), "segment_rows": sorted(int(s.num_rows) for s in segs),
            "part_segments": [by_part[p] for p in sorted(by_part)]}


def cluster_sets(sizes: np.ndarray, ks: list[int], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """For each k: the k smallest and the k largest clusters (rows vary apart from k)."""
    order = np.argsort(sizes, kind="stable")
    out = []
    for k in ks:
        if k > len(sizes):
            continue
        out.append((f"{k} small", np.sort(order[:k])))
        out.append((f"{k} large", np.sort(order[-k:])))
    return out


def planner_rows(model: CostModel, sizes: np.ndarray, segments: int, centroids: np.ndarray,
                 queries: np.ndarray, batches=(8, 32, 128), nprobes=(8, 24, 40), repeat: int = 20,
                 seed: int = 0) -> list[dict]:
    """:func:`plan_batch` under ``model`` on batches of real queries drawn at random (unrelated
    queries: the hard case for sharing), centroid-routed over a ``single`` layout with these
    cluster sizes: requests per batch, extra clusters per query, predicted server ms against
    one request per distinct set, and planning time (median CPU time of the calling thread)."""
    from milvus_ltr_router.batching import StorageFacts, plan_batch
    facts = StorageFacts.single(sizes, segments=segments)
    rng = np.random.default_rng(seed)
    order = np.argsort(-(queries @ centroids.T), axis=1)
    out = []
    for nprobe in nprobes:
        if nprobe > len(centroids):
            continue
        for nq in batches:
            plans, cpu = [], []
            for _ in range(repeat):
                probed = order[rng.choice(len(queries), nq, replace=False), :nprobe]
                t0 = time.thread_time()
                plans.append(plan_batch(probed, facts, model))
                cpu.append((time.thread_time() - t0) * 1000)
            out.append({"nprobe": nprobe, "nq": nq,
                        "requests": float(np.mean([len(p) for p in plans])),
                        "extra_clusters": float(np.mean([p.stats["mean_extra_clusters"] for p in plans])),
                        "predicted_ms": float(np.mean([p.predicted_ms for p in plans])),
                        "per_set_ms": float(np.mean([p.per_set_ms for p in plans])),
                        "saving": float(1 - np.sum([p.predicted_ms for p in plans]) /
                                        np.sum([p.per_set_ms for p in plans])),
                        "plan_cpu_ms": float(np.median(cpu))})
    return out


def main(argv=None) -> int:
    from pymilvus import MilvusClient
    from benchmarks.datasets import load_or_build
    from milvus_ltr_router.clustering import assign_clusters, default_n_clusters, fit_centroids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fixture", choices=list(DATASETS))
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 1.0, 2.0],
                        help="collection sizes as multiples of the dataset's documents (below 1: "
                             "an even subsample; above 1: tiled copies with a little noise)")
    parser.add_argument("--split-scale", type=float, default=1.0,
                        help="the size that is also written as --split-segments sealed segments")
    parser.add_argument("--split-segments", type=int, default=4)
    parser.add_argument("--parts", type=int, default=8,
                        help="the --split-scale size also laid out as this many partitions of "
                             "clusters (grouped storage); 0: not")
    parser.add_argument("--clusters", type=int, default=None, help="L (default round(sqrt(N)))")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="clusters named per request")
    parser.add_argument("--nq", type=int, nargs="+", default=[1, 8, 32], help="queries per request")
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds over every configuration")
    parser.add_argument("--quick", action="store_true", help="8 rounds (~2 minutes on the fixture)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.quick:
        args.rounds = min(args.rounds, 8)
    t_start = time.perf_counter()
    data = load_or_build(args.dataset)
    docs = np.asarray(data.docs, dtype=np.float32)
    queries = np.asarray(data.queries, dtype=np.float32)
    rng = np.random.default_rng(args.seed)
    L = args.clusters or default_n_clusters(len(docs))
    sample = docs[rng.choice(len(docs), min(len(docs), 64 * L), replace=False)]
    centroids = fit_centroids(sample, L, "spherical", seed=args.seed, max_iter=10)
    labels = assign_clusters(docs, centroids, "spherical")
    base_sizes = np.bincount(labels, minlength=L)
    spread = float(np.std(docs)) * 0.01

    def scaled(scale: float) -> tuple[np.ndarray, np.ndarray]:
        if scale <= 1:
            keep = np.arange(0, len(docs), max(1, int(round(1 / scale))))
            return docs[keep], labels[keep]
        copies = int(round(scale))
        vecs = [docs] + [docs + np.random.default_rng(c).normal(0, spread, docs.shape).astype(np.float32)
                         for c in range(1, copies)]
        return np.concatenate(vecs), np.tile(labels, copies)

    tag = uuid.uuid4().hex[:6]
    layouts = [(s, 1) for s in args.scales]
    if args.split_segments > 1:
        layouts.append((args.split_scale, args.split_segments))
    if args.parts > 1:
        layouts.append((args.split_scale, -args.parts))     # negative: partitions
    load_avg = None
    with server() as (uri, label):
        client = MilvusClient(uri)
        version = client.get_server_version()
        colls = []
        for scale, segs in layouts:
            vecs, labs = scaled(scale)
            name = f"costs_{str(scale).replace('.', '_')}_{segs}_{tag}".replace("-", "p")
            # groups: ranges of cluster ids, so a request's clusters fall into 1 .. P of them
            group_of = (np.arange(L) * -segs // L) if segs < 0 else None
            info = write_collection(client, name, vecs, labs, max(segs, 1), group_of=group_of)
            info.update(scale=scale, written_segments=segs,
                        sizes=np.bincount(labs, minlength=L).astype(np.int64))
            colls.append(info)
            log.info("%s: %d rows, %d loaded segments, insert %.1f s, load %.1f s", name, info["rows"],
                     info["segments"], info["insert_s"], info["load_s"])
        sets = cluster_sets(base_sizes, args.ks)
        configs = []   # (collection info, nq, set label, cluster ids or None = whole collection)
        for info in colls:
            for nq in args.nq:
                for name, cl in sets:
                    configs.append((info, nq, name, cl))
                configs.append((info, nq, "all, no filter", None))

        def named_parts(info, cl) -> np.ndarray | None:
            return None if "group_of" not in info or cl is None else np.unique(info["group_of"][cl])

        def run(cfg, qrows) -> float:
            info, nq, _, cl = cfg
            kw = {"filter": cluster_filter(CLUSTER_FIELD, cl)} if cl is not None else {}
            parts = named_parts(info, cl)
            if parts is not None:
                names = group_names_for(len(info["part_rows"]))
                kw["partition_names"] = [names[p] for p in parts]
            t0 = time.perf_counter()
            client.search(info["collection"], data=queries[qrows].tolist(), limit=10,
                          search_params={"metric_type": "IP"}, **kw)
            return (time.perf_counter() - t0) * 1000

        lat = [[] for _ in configs]
        load_avg = os.getloadavg()
        log.info("timing %d configurations x %d rounds (+1 warm-up), interleaved (load average "
                 "%.2f %.2f %.2f)", len(configs), args.rounds, *load_avg)
        for r in range(args.rounds + 1):
            for j in rng.permutation(len(configs)):
                ms = run(configs[j], rng.choice(len(queries), configs[j][1], replace=False))
                if r:
                    lat[j].append(ms)
        load_after = os.getloadavg()
        for info in colls:
            info["segments_after"] = segment_info(client, info["collection"])["segments"]
            client.drop_collection(info["collection"])
        client.close()

    points = []
    for (info, nq, name, cl), ms in zip(configs, lat):
        filtered = cl is not None
        rows = float(info["sizes"][cl].sum()) if filtered else float(info["rows"])
        parts = named_parts(info, cl)
        segments, walked = info["segments"], float(info["rows"])
        if parts is not None:
            segments = int(np.asarray(info["part_segments"])[parts].sum())
            walked = float(info["part_rows"][parts].sum())
        points.append({"N": info["rows"], "segments": segments, "nq": nq, "set": name,
                       "parts": 0 if parts is None else len(parts),
                       "k": len(cl) if filtered else 0, "scanned": rows,
                       "walked": walked if filtered else 0.0,
                       "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
                       "min_ms": float(np.min(ms)), "lat_ms": [round(x, 4) for x in ms]})
    # the model prices filtered requests (what routed search sends in the cluster-id modes);
    # whole-collection searches without a filter take another path in knowhere and are shown
    # beside the fit, not fitted
    fitted = [p for p in points if p["k"] > 0]
    coef, _ = fit_costs(fitted)
    coef_min, _ = fit_costs(fitted, key="min_ms")
    for p in points:
        p["fit_ms"] = float(np.dot(design_row(p["k"], p["segments"], p["walked"], p["nq"], p["scanned"]),
                                   [coef[t] for t in TERMS]))
        p["fit_err"] = float(p["fit_ms"] / p["median_ms"] - 1)
    errs = np.abs([p["fit_err"] for p in fitted])
    dim = int(docs.shape[1])
    N_all = sorted({c["rows"] for c in colls})
    model = CostModel(**coef, dim=dim, source=(
        f"benchmarks/bench_costs.py --dataset {args.dataset}{' --quick' if args.quick else ''}: "
        f"Milvus {version}, FLAT IP {dim}-d, N {N_all[0]}-{N_all[-1]}, L {L}, {date.today()}, "
        f"load average {load_avg[0]:.1f}"))

    print(f"\n{label} ({version}); {args.dataset}: {len(docs)} documents x {dim}-d, L = {L}; "
          f"{args.rounds} rounds; load average {load_avg[0]:.2f} before timing, {load_after[0]:.2f} after; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print_table([{k: c[k] for k in ("collection", "rows", "written_segments", "segments", "segments_after",
                                    "insert_s", "load_s")} for c in colls],
                ["collection", "rows", "written_segments", "segments", "segments_after", "insert_s",
                 "load_s"], "collections")
    print_table(points, ["N", "segments", "parts", "nq", "set", "k", "scanned", "median_ms", "p90_ms", "fit_ms",
                         "fit_err"], "median ms per request, and the fit")
    print_table([{"term": t, "value": coef[t], "unit": unit} for t, unit in zip(TERMS, (
        "ms per request", "ms per cluster named", "ms per sealed segment searched",
        "ms per row walked (filtered request)", "ms per query", "ms per query and row scanned",
        "ms per query and row walked"))], ["term", "value", "unit"],
        f"fitted cost model, filtered requests (median |error| {np.median(errs):.1%}, max "
        f"{errs.max():.1%}; 'all, no filter' rows are not fitted)")
    print("  the same fit on each configuration's fastest request (a quieter machine): " +
          ", ".join(f"{t} {v:.3g}" for t, v in coef_min.items()))
    for info in colls:
        if "group_of" in info:
            continue
        fixed = coef["request_ms"] + coef["segment_ms"] * info["segments"] + coef["row_walked_ms"] * info["rows"]
        print(f"  N={info['rows']}, {info['segments']} segment(s): a filtered request's fixed cost "
              f"{fixed:.3f} ms, + {coef['query_ms'] + coef['query_row_walked_ms'] * info['rows']:.3f} ms "
              f"per query before scanning")
    biggest = max((c for c in colls if "group_of" not in c), key=lambda c: (c["rows"], -c["segments"]))
    plans = planner_rows(model, biggest["sizes"], biggest["segments"], centroids, queries)
    print_table(plans, ["nprobe", "nq", "requests", "extra_clusters", "predicted_ms", "per_set_ms",
                        "saving", "plan_cpu_ms"],
                f"batch plans under this model (N={biggest['rows']}, random batches of real queries, "
                f"centroid routing; means of 20 batches, planning time median CPU ms)")
    name = f"costs_{args.dataset}" + ("_quick" if args.quick else "")
    save(name, {"server": label, "server_version": version, "dataset": args.dataset, "dim": dim, "L": L,
                "rounds": args.rounds, "load_average_before": load_avg, "load_average_after": load_after,
                "collections": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in c.items()
                                 if k not in ("sizes", "group_of")} for c in colls],
                "points": points, "fit": {"median_abs_err": float(np.median(errs)),
                                          "max_abs_err": float(errs.max()), "on": "median_ms",
                                          "coef_on_min_ms": coef_min},
                "plans": plans, "cost_model": model.to_dict()}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
