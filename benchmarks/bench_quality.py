"""Routing quality on real data: the paper's protocol, plus top-k labels and adaptive nprobe.

Paper protocol (arXiv 2404.11731): L = sqrt(N) clusters, standard and spherical
k-means, 64/16/20 split of real queries, top-1 accuracy and recall@10 with
nprobe at 0.1% / 1% / 2% / 5% of L (at least 1), centroid vs learned routing.
Beyond the paper (issue 5): routers trained on the partitions of the top-10
neighbours (pure listwise loss, and mixed half-and-half with the paper's top-1
loss), and adaptive nprobe: probe every partition whose predicted neighbour
share reaches the threshold that met the recall target on validation queries,
with shares from the learned stopping model or, for comparison, from the
calibrated probabilities alone. Savings are against the fixed nprobe that
reaches the same test recall@10, interpolated between integer nprobes.
Issue 20 (:func:`run_moments`): the moment router (c = 1, the rule without queries, and c
tuned on the validation queries), the learned router over the moments and today's learned
router, trained as ``retrain-router`` trains them; top-1 and recall@10 by nprobe, the
clusters needed for recall@10 .9 / .95 (fixed nprobe and adaptive), and the routing cost per
query (numpy and onnxruntime, one thread), beside reference sketches (full covariance).

    python -m benchmarks.bench_quality [--dataset fixture|small|medium|large] [--quick]
        [--normalize] [--rows all|moments|labels]
        [--algorithm spherical|kmeans|both] [--sample 39x|256x|all|ROWS|default]
        [--init-rows SPEC] [--fit-rows SPEC] [--sample-passes P] [--refine-passes P]
        [--max-cluster-ratio R] [--max-iter I] [--seed S] [--cluster-only]

The clustering options feed ``milvus_ltr_router.clustering`` (resolve_sample_size,
fit_centroids, refine_centroids, assign_balanced) the way a layout build does; the summary
table gives each step's time, the k-means objective, cluster sizes, and top-1 / recall@10 at
1% of L; ``scanned_pct`` is the share of the collection in the probed partitions.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import call_seconds, plot_lines, print_table, save, RESULTS, setup_logging

FRACTIONS = (0.001, 0.01, 0.02, 0.05)
TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


def load(name: str, quick: bool):
    from benchmarks.datasets import load_or_build
    data = load_or_build(name)
    if quick:
        return data.docs[:3000], data.queries[:1500]
    return data.docs, data.queries


@dataclass
class ClusterConfig:
    """How a layout's clusters are built (defaults: the build as it was before issue 16)."""

    sample: str | int | None = "39x"   # resolve_sample_size spec; None = its default rule
    init_rows: str | int | None = "all"  # k-means++ seed rows (None: fit_centroids' default, 16x)
    fit_rows: str | int | None = None  # k-means (seeds + max_iter) on this many sample rows ...
    sample_passes: int = 0             # ... then Lloyd passes over the whole sample
    refine_passes: int = 0             # then Lloyd passes over the whole collection
    max_cluster_ratio: float | None = None
    max_iter: int = 25

    def tag(self) -> str:
        """'' for the defaults, else a file-name suffix naming what differs."""
        parts = [f"{k}{v}" for k, v in vars(self).items() if v != getattr(ClusterConfig, k)]
        return "_" + "_".join(parts).replace(" ", "") if parts else ""


def build_clusters(docs, algorithm: str, seed: int = 0, cfg: ClusterConfig | None = None) -> dict:
    """An offline layout of ``docs`` built the way a layout build would: a uniform sample,
    k-means on it (optionally on a subset first, then Lloyd passes over the whole sample),
    Lloyd passes over the whole collection in blocks, then plain or size-bounded assignment in
    blocks; with each step's wall and CPU time."""
    from milvus_ltr_router.clustering import (array_block_source, assign_balanced, balanced_capacity,
                                              default_n_clusters, fit_centroids, kmeans_objective,
                                              refine_centroids, resolve_sample_size, size_summary)
    cfg = cfg or ClusterConfig()
    n_parts = default_n_clusters(len(docs))
    n_sample = resolve_sample_size(cfg.sample, len(docs), n_parts)
    n_init = None if cfg.init_rows is None else resolve_sample_size(cfg.init_rows, n_sample, n_parts)
    n_fit = n_sample if cfg.fit_rows is None else resolve_sample_size(cfg.fit_rows, n_sample, n_parts)
    rng = np.random.default_rng(seed)
    import scipy.sparse, sklearn.cluster  # noqa: E401,F401  (imports out of the timings)
    t0, c0 = time.perf_counter(), time.process_time()
    sample_rows = docs[rng.choice(len(docs), n_sample, replace=False)]
    centroids = fit_centroids(sample_rows[:n_fit], n_parts, algorithm, seed=seed, max_iter=cfg.max_iter,
                              init_rows=n_init)
    centroids = refine_centroids(array_block_source(sample_rows, 16384), centroids, algorithm,
                                 passes=cfg.sample_passes)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    del sample_rows
    blocks = array_block_source(docs, 16384)
    t0, c0 = time.perf_counter(), time.process_time()
    history = []
    centroids = refine_centroids(blocks, centroids, algorithm, passes=cfg.refine_passes, history=history)
    t_refine, c_refine = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    capacity = (None if cfg.max_cluster_ratio is None
                else balanced_capacity(len(docs), n_parts, cfg.max_cluster_ratio))
    sizes = np.zeros(n_parts, dtype=np.int64)
    parts = np.concatenate([assign_balanced(b, centroids, algorithm, capacity, sizes) for b in blocks()])
    t_assign, c_assign = time.perf_counter() - t0, time.process_time() - c0
    return {"centroids": centroids, "parts": parts, "L": n_parts,
            "clustering": {**vars(cfg), "sample_rows": n_sample, "init_rows": n_init, "fit_rows": n_fit,
                           "capacity": capacity,
                           "fit_s": t_fit, "refine_s": t_refine, "assign_s": t_assign,
                           "total_s": t_fit + t_refine + t_assign,
                           # CPU seconds: with one BLAS thread, the work done whatever the machine load
                           "fit_cpu_s": c_fit, "refine_cpu_s": c_refine, "assign_cpu_s": c_assign,
                           "objective_by_pass": [h.objective for h in history],
                           "objective": kmeans_objective(blocks, centroids, algorithm),
                           "sizes": size_summary(sizes)}}


def run_one(docs, queries, algorithm: str, seed: int = 0, max_epochs: int = 100,
            cfg: ClusterConfig | None = None, variants: bool = True, moments: bool = True,
            quick: bool = False) -> dict:
    """One layout's routers: centroid, the label variants (``variants``) with adaptive nprobe,
    and issue 20's moment routers (``moments``, :func:`run_moments`)."""
    from milvus_ltr_router.evaluate import evaluate_adaptive, routing_quality
    from milvus_ltr_router.labels import Neighbours, array_blocks, exact_knn
    from milvus_ltr_router.layout import Layout, partition_names_for
    from milvus_ltr_router.router import CentroidRouter, LinearRouter
    from milvus_ltr_router.train import LinearRouterTrainer, split_indices

    t0 = time.perf_counter()
    built = build_clusters(docs, algorithm, seed, cfg)
    centroids, parts, n_parts = built["centroids"], built["parts"], built["L"]
    part_share = np.bincount(parts, minlength=n_parts) / len(docs)
    nb = exact_knn(queries, array_blocks(docs, parts), k=10)
    tr, va, te = split_indices(len(queries), seed)
    sub = lambda idx: Neighbours(nb.ids[idx], nb.scores[idx], nb.partitions[idx])  # noqa: E731
    layout = Layout("bench", centroids, partition_names_for(n_parts), np.bincount(parts, minlength=n_parts),
                    "IP", algorithm, docs.shape[1], "bench")

    def Linear(w, b):
        return LinearRouter(w, b, layout.partition_names, layout.clustering_id, kind="learned")

    routers = {"centroid": CentroidRouter(layout)}
    training = {}
    for name, label_k, weight in (("learned top-1", 1, 0.0), ("learned top-10", 10, 0.0),
                                  ("learned top-10 mixed", 10, 0.5))[:3 if variants else 0]:
        y = nb.partitions[:, :label_k] if label_k > 1 else nb.labels
        m = LinearRouterTrainer(n_partitions=n_parts, centroids=centroids, max_epochs=max_epochs,
                                seed=seed, top1_weight=weight).fit(queries[tr], y[tr],
                                                                   eval_set=(queries[va], y[va]))
        routers[name] = Linear(m.coef_, m.intercept_)
        training[name] = {"init": m.init_, "best_epoch": m.best_epoch_, "top1_weight": weight}
    # the same mixed router, adaptive from calibrated probabilities alone (no stopping model)
    if variants:
        routers["learned top-10 mixed, prob. threshold"] = Linear(m.coef_, m.intercept_)
    routers = {name: r.calibrate(queries[va], nb.partitions[va],   # validation split only
                                 stopping_model="prob. threshold" not in name)
               for name, r in routers.items()}
    # the paper's budgets, plus 10% and 20% of L so the fixed curves span the adaptive ones
    nprobes = sorted({max(1, int(round(f * n_parts))) for f in FRACTIONS + (0.1, 0.2)} | {1, 2})
    fixed, adaptive, curves = [], [], {}
    for name, r in routers.items():
        for t, q in evaluate_adaptive(r, queries[te], sub(te), TARGETS):
            adaptive.append({"algorithm": algorithm, "router": name, "target": t,
                             "mean_probed": q.mean_probed, "top1": q.top1_accuracy,
                             "recall@10": q.recall})
        if "prob. threshold" in name:         # same ranking as the mixed router: adaptive only
            curves[name] = curves["learned top-10 mixed"]
            continue
        order = r.rank(queries[te], n_parts)
        curves[name] = [routing_quality(order[:, :n], sub(te)).recall
                        for n in range(1, min(n_parts, 100) + 1)]
        for n in nprobes:
            q = routing_quality(order[:, :n], sub(te))
            fixed.append({"algorithm": algorithm, "router": name, "nprobe": n,
                          "pct_of_L": round(100 * n / n_parts, 2), "top1": q.top1_accuracy,
                          "recall@10": q.recall,
                          # rows searched: the share of the collection in the probed partitions
                          "scanned_pct": 100 * float(part_share[order[:, :n]].sum(1).mean())})
    result = {"algorithm": algorithm, "N": len(docs), "L": n_parts, "queries": len(queries),
              "split": [len(tr), len(va), len(te)], "fixed": fixed, "adaptive": adaptive,
              "fixed_recall_curve": curves,
              "training": training, "clustering": built["clustering"],
              "temperatures": {n: r.temperature for n, r in routers.items()}}
    if moments:
        result["moments"] = run_moments(docs, queries, layout, parts, nb, tr, va, te, sub, seed,
                                        max_epochs, quick)
    result["seconds"] = time.perf_counter() - t0
    return result


def fixed_nprobe_for(curve: list[float], recall: float) -> float | None:
    """Fixed nprobe reaching ``recall`` on a recall-vs-nprobe curve (index 0 = nprobe 1),
    linearly interpolated between integers, so neither side is rounded in its favour."""
    for n, rec in enumerate(curve):
        if rec >= recall:
            if n == 0:
                return 1.0
            return n + (recall - curve[n - 1]) / max(rec - curve[n - 1], 1e-12)
    return None


def savings(result: dict, router: str = "learned top-10 mixed",
            targets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), fixed_router: str | None = None) -> list[dict]:
    """Adaptive vs fixed nprobe at equal recall@10: for each recall target, ``router``'s
    adaptive mean partitions against the fixed nprobe of ``fixed_router`` (default: the
    same router) that reaches the recall adaptive achieved."""
    fixed_router = fixed_router or router
    curve = result["fixed_recall_curve"][fixed_router]
    rows = []
    for a in (r for r in result["adaptive"] if r["router"] == router):
        if not any(abs(a["target"] - t) < 1e-9 for t in targets):
            continue
        n_fixed = fixed_nprobe_for(curve, a["recall@10"])
        if n_fixed is None:
            continue
        rows.append({"algorithm": result["algorithm"], "router": router,
                     "fixed_router": fixed_router, "target": a["target"],
                     "adaptive_recall@10": a["recall@10"], "adaptive_mean_probed": a["mean_probed"],
                     "fixed_nprobe_for_same_recall": n_fixed,
                     "partitions_saved_pct": 100 * (1 - a["mean_probed"] / n_fixed)})
    return rows


# (adaptive router, fixed-nprobe router) pairs reported: the adaptive rule on the mixed router
# alone (same ranking), with and without the stopping model; and the top-10 head that
# retrain-router serves recall_target with, against the mixed head that serves fixed nprobe and
# against the paper's top-1-label router
SAVINGS = (("learned top-10 mixed", None), ("learned top-10 mixed, prob. threshold", None),
           ("learned top-10", None), ("learned top-10", "learned top-10 mixed"),
           ("learned top-10", "learned top-1"))


def summary_row(res: dict) -> dict:
    """One line per clustering: its cost and shape, and routing quality at 1% of L."""
    c = res["clustering"]
    n = max(1, int(round(0.01 * res["L"])))
    at = {r["router"]: r for r in res["fixed"] if r["nprobe"] == n}
    pair = lambda r: f"{r['top1']:.3f} / {r['recall@10']:.3f}"  # noqa: E731
    return {"algorithm": res["algorithm"], "sample_rows": c["sample_rows"], "init": c["init_rows"],
            "fit": c["fit_rows"], "s_pass": c["sample_passes"], "refine": c["refine_passes"],
            "ratio": c["max_cluster_ratio"], "fit_s": c["fit_s"], "refine_s": c["refine_s"],
            "assign_s": c["assign_s"], "cpu_s": c["fit_cpu_s"] + c["refine_cpu_s"] + c["assign_cpu_s"],
            "objective": c["objective"],
            "max/mean": c["sizes"]["max_over_mean"], "empty": c["sizes"]["empty"], "nprobe": n,
            "centroid": pair(at["centroid"]), "learned top-1": pair(at["learned top-1"]),
            "mixed": pair(at["learned top-10 mixed"]),
            "mixed_scanned_pct": at["learned top-10 mixed"]["scanned_pct"]}


# ------------------------------------------------------------------ moment routers (issue 20)
#: retrain-router's --nprobe default: the budget its trainers validate at and its gate decides at
RETRAIN_NPROBE = 8
#: recall@10 levels the clusters-needed table reports
NEEDED_RECALLS = (0.9, 0.95)
#: the moment routers that are served (exported to ONNX), and the reference rows computed in numpy
SERVED = ("moments c=1", "moments c tuned", "learned+moments")
LINEAR = ("centroid", "learned (retrain)")


def quality_curves(scores: np.ndarray, nb, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 accuracy and recall@k of the ``n`` best clusters by ``scores`` ``[Q, L]`` for every
    ``n`` in 1..L (index ``n - 1``), as :func:`milvus_ltr_router.evaluate.routing_quality`
    computes them for one ``n`` (a tied top-1 counts as a miss), from one sort."""
    n_q, n_parts = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(n_parts), order.shape), axis=1)
    parts = nb.partitions[:, :k]
    valid = parts >= 0
    rank = np.where(valid, np.take_along_axis(pos, np.where(valid, parts, 0), 1), n_parts)
    share = valid / np.maximum(valid.sum(axis=1, keepdims=True), 1)
    recall = np.bincount(rank.ravel(), weights=share.ravel(), minlength=n_parts + 1)
    first = rank[:, 0] if nb.top1_tied is None else np.where(nb.top1_tied, n_parts, rank[:, 0])
    top1 = np.bincount(first, minlength=n_parts + 1)
    return top1[:n_parts].cumsum() / n_q, recall[:n_parts].cumsum() / n_q


def _scores_in_blocks(router, queries: np.ndarray, block: int = 64) -> np.ndarray:
    """``router.scores`` over ``queries`` in blocks (the two-stage ONNX graph gathers
    ``[batch, rescore_top, rank, d]`` bases: bounded here)."""
    return np.concatenate([router.scores(queries[s:s + block])
                           for s in range(0, len(queries), block)])


def serving_cost(numpy_router, onnx_router, queries: np.ndarray, nprobe: int, n_single: int,
                 batch: int = 32) -> dict:
    """Milliseconds per query of ``rank(q, nprobe)``: numpy (one BLAS thread) and onnxruntime
    (the router as loaded: one thread), one query per call (median over ``n_single`` queries of
    each query's fastest of 3 calls) and ``batch`` queries per call (median of 10 calls)."""
    from threadpoolctl import threadpool_limits
    singles = [queries[i:i + 1] for i in range(min(n_single, len(queries)))]
    group = queries[:batch]
    out = {}
    with threadpool_limits(1):
        for label, r in (("numpy", numpy_router), ("onnx", onnx_router)):
            if r is None:
                continue
            r.rank(singles[0], nprobe)                                    # warm-up
            out[f"{label}_ms"] = 1e3 * call_seconds(
                [lambda q=q: r.rank(q, nprobe) for q in singles])["median"]
        if onnx_router is not None:
            onnx_router.rank(group, nprobe)
            out[f"onnx_ms_batch{batch}"] = 1e3 * call_seconds(
                [lambda: onnx_router.rank(group, nprobe)] * 10, 1)["median"] / len(group)
    return out


def run_moments(docs, queries, layout, parts, nb, tr, va, te, sub, seed: int, max_epochs: int,
                quick: bool) -> dict:
    """Issue 20's rows on one layout: the moment router (c = 1, the rule without queries; c tuned
    on the validation queries), today's learned router (retrain-router with --moments off) and
    the learned router over the moments (retrain-router's default), all trained as
    retrain-router trains them (top-10 labels; the linear router with a top-1 weight of .5
    chosen by validation top-1 at nprobe 8, its adaptive head top-k only; the router over the
    moments as candidates.moments_objective says); plus reference rows of the sketch's design
    (numpy only): rank 32 over every cluster, rank 16 and 32 candidates, and the full
    covariance."""
    from milvus_ltr_router.candidates import moments_objective, tune_optimism
    from milvus_ltr_router.clustering import linear_centroid_scorer
    from milvus_ltr_router.evaluate import evaluate_adaptive
    from milvus_ltr_router.export import export_moment_router, export_router
    from milvus_ltr_router.moments import (DEFAULT_RANK, DEFAULT_RESCORE_TOP, MomentScorer,
                                           cluster_moments)
    from milvus_ltr_router.router import LinearRouter, MomentRouter, Router
    from milvus_ltr_router.train import LinearRouterTrainer

    n_parts, dim = layout.n_partitions, docs.shape[1]
    val_nprobe = min(RETRAIN_NPROBE, n_parts)
    seconds = {}
    t0 = time.perf_counter()
    moments = cluster_moments(docs, parts, n_parts, rank=min(DEFAULT_RANK, dim),
                              anchors=layout.centroids)
    seconds["moments"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = cluster_moments(docs, parts, n_parts, rank=dim, anchors=layout.centroids)
    seconds["full_covariance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    optimism, grid = tune_optimism(moments, queries[va], nb.partitions[va], val_nprobe)
    seconds["tune_optimism"] = time.perf_counter() - t0

    y = nb.partitions[:, :10]

    def fit(with_moments, top1_weight: float, val_metric: str) -> LinearRouterTrainer:
        t = time.perf_counter()
        m = LinearRouterTrainer(n_partitions=n_parts, centroids=layout.centroids,
                                metric=layout.metric, moments=with_moments,
                                max_epochs=max_epochs, seed=seed, top1_weight=top1_weight,
                                val_metric=val_metric, val_nprobe=val_nprobe,
                                val_k=10).fit(queries[tr], y[tr], eval_set=(queries[va], y[va]))
        seconds.setdefault("training", []).append(time.perf_counter() - t)
        return m
    today = fit(None, 0.5, "top1")            # retrain-router --moments off: the fixed-nprobe head
    head = fit(None, 0.0, "recall")           # ... and its adaptive-nprobe head
    learned_m = fit(moments, *moments_objective(0.5))   # retrain-router's default: over the moments
    training = {name: {"init": m.init_, "best_epoch": m.best_epoch_, "val": m.best_score_,
                       "candidates": m.candidates_, "val_criterion": m.val_criterion_}
                for name, m in (("learned (retrain)", today), ("learned (retrain) adaptive head", head),
                                ("learned+moments", learned_m))}

    scorers = {
        "moments c=1": MomentScorer.from_moments(moments, optimism=1.0),
        "moments c tuned": MomentScorer.from_moments(moments, optimism=optimism),
        "learned+moments": MomentScorer.from_moments(
            moments, weight=learned_m.coef_, bias=learned_m.intercept_,
            spread_weight=learned_m.spread_coef_),
        # references: what the served sketch is measured against
        "moments c=1, r32 every cluster": MomentScorer.from_moments(moments, rescore_top=n_parts),
        "moments c=1, r32/m32": MomentScorer.from_moments(moments, rescore_top=32),
        "moments c=1, r32/m64": MomentScorer.from_moments(moments, rescore_top=64),
        "moments c=1, full covariance": MomentScorer.from_moments(full, rescore_top=n_parts),
    }
    if moments.rank > 16:
        scorers["moments c=1, r16"] = MomentScorer.from_moments(moments.subset(16))
    numpy_routers = {"centroid": LinearRouter(*linear_centroid_scorer(layout.centroids, layout.metric),
                                              layout.partition_names, layout.clustering_id),
                     "learned (retrain)": LinearRouter(today.coef_, today.intercept_,
                                                       layout.partition_names, layout.clustering_id)}
    numpy_routers.update({name: MomentRouter(layout, scorer=s) for name, s in scorers.items()})

    # every test query's scores: the curves, fixed-nprobe rows and clusters needed
    curves = {}
    for name, r in numpy_routers.items():
        t = time.perf_counter()
        curves[name] = quality_curves(r.scores(queries[te]), sub(te))
        seconds[f"score_test {name}"] = time.perf_counter() - t
    nprobes = sorted({max(1, int(round(f * n_parts))) for f in FRACTIONS} | {1, 2, val_nprobe})
    fixed = [{"router": name, "nprobe": n, "pct_of_L": round(100 * n / n_parts, 2),
              "top1": float(top1[n - 1]), "recall@10": float(recall[n - 1])}
             for name, (top1, recall) in curves.items() for n in nprobes]

    # what is served: exported, loaded by onnxruntime (one thread), timed and checked against numpy
    cost_nprobe = max(1, int(round(0.01 * n_parts)))
    n_single = 20 if quick else 200
    check = queries[te][:64 if quick else 512]
    served, cost = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in LINEAR + SERVED:
            path = Path(tmp) / f"{len(served)}.onnx"
            if name == "centroid":
                export_router(*linear_centroid_scorer(layout.centroids, layout.metric), layout,
                              layout.collection, path)
            elif name == "learned (retrain)":
                export_router(today.coef_, today.intercept_, layout, layout.collection, path,
                              nprobe=val_nprobe, adaptive_head=(head.coef_, head.intercept_))
            else:
                export_moment_router(scorers[name], layout, layout.collection, path,
                                     nprobe=val_nprobe, router_kind="learned-moments"
                                     if name == "learned+moments" else "moments")
            served[name] = Router.load(path, layout=layout, num_threads=1)
        for name, r in served.items():
            a = np.sort(numpy_routers[name].rank(check, cost_nprobe), axis=1)
            b = np.sort(np.concatenate([r.rank(check[s:s + 64], cost_nprobe)
                                        for s in range(0, len(check), 64)]), axis=1)
            cost[name] = {"onnx_same_clusters": float((a == b).all(axis=1).mean()),
                          **serving_cost(numpy_routers[name], r, queries[te], cost_nprobe,
                                         n_single)}
        for name, r in numpy_routers.items():
            if name not in cost:
                cost[name] = serving_cost(r, None, queries[te], cost_nprobe, n_single)

    # adaptive nprobe (offline): each router calibrated on the validation queries; today's
    # learned router adapts with its own head, as published
    adaptive_routers = {name: numpy_routers[name] for name in ("centroid",) + SERVED[:2]}
    adaptive_routers["learned (retrain)"] = served["learned (retrain)"]
    adaptive_routers["learned+moments"] = numpy_routers["learned+moments"]
    adaptive = {}
    for name, r in adaptive_routers.items():
        r = r.calibrate(queries[va], nb.partitions[va])
        adaptive[name] = {t: q for t, q in evaluate_adaptive(r, queries[te], sub(te), NEEDED_RECALLS)}

    needed = []
    base = {t: fixed_nprobe_for(list(curves["learned (retrain)"][1]), t) for t in NEEDED_RECALLS}
    for name, (top1, recall) in curves.items():
        row = {"router": name, **cost.get(name, {})}
        for t in NEEDED_RECALLS:
            n = fixed_nprobe_for(list(recall), t)
            row[f"fixed@{t}"] = n
            row[f"vs_learned@{t}"] = (None if n is None or not base[t]
                                      else 100 * (1 - n / base[t]))
            if name in adaptive:
                q = adaptive[name][t]
                row[f"adaptive@{t}"] = q.mean_probed
                row[f"adaptive_recall@{t}"] = q.recall
        needed.append(row)
    return {"rank": moments.rank, "rescore_top": min(DEFAULT_RESCORE_TOP, n_parts),
            "optimism": optimism, "optimism_grid": grid, "val_nprobe": val_nprobe,
            "cost_nprobe": cost_nprobe, "fixed": fixed, "needed": needed, "training": training,
            "curves": {name: {"top1": [float(v) for v in c[0]], "recall@10": [float(v) for v in c[1]]}
                       for name, c in curves.items()},
            "seconds": seconds}


def moment_tables(res: dict, title: str) -> None:
    """The issue-20 tables of one result: top-1 / recall@10 by nprobe, clusters needed, cost."""
    m = res["moments"]
    names = list(dict.fromkeys(r["router"] for r in m["fixed"]))
    nprobes = sorted({r["nprobe"] for r in m["fixed"]})
    at = {(r["router"], r["nprobe"]): r for r in m["fixed"]}
    cols = [f"{n} ({100 * n / res['L']:.1f}%)" for n in nprobes]
    rows = [{"router": name, **{c: f"{at[name, n]['top1']:.4f} / {at[name, n]['recall@10']:.4f}"
                                for c, n in zip(cols, nprobes)}} for name in names]
    print_table(rows, ["router"] + cols,
                f"{title}: top-1 / recall@10 by nprobe (% of L); moment c tuned = "
                f"{m['optimism']:g}, rank {m['rank']}, rescore top {m['rescore_top']}")
    ts = NEEDED_RECALLS
    print_table(m["needed"], ["router"] + [c for t in ts for c in (f"fixed@{t}", f"vs_learned@{t}")]
                + [c for t in ts for c in (f"adaptive@{t}", f"adaptive_recall@{t}")],
                f"{title}: clusters for recall@10 (fixed nprobe, interpolated; vs_learned: % fewer "
                "than learned (retrain)); adaptive: mean probed at the target, recall reached")
    print_table(m["needed"], ["router", "numpy_ms", "onnx_ms", "onnx_ms_batch32",
                              "onnx_same_clusters"],
                f"{title}: routing cost per query at nprobe {m['cost_nprobe']} (one thread; "
                "onnx_same_clusters: share of queries ONNX and numpy route alike)")


def moment_plot(path, res: dict, title: str) -> None:
    m = res["moments"]
    upto = max([r[f"fixed@{NEEDED_RECALLS[-1]}"] or 0 for r in m["needed"]] + [10])
    n_max = min(res["L"], int(np.ceil(upto * 1.2)))
    series = {name: (list(range(1, n_max + 1)), c["recall@10"][:n_max])
              for name, c in m["curves"].items() if "," not in name or "full" in name}
    plot_lines(path, series, "clusters probed (fixed nprobe)", "recall@10", title, logx=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fixture", choices=["fixture", "small", "medium", "large"])
    parser.add_argument("--quick", action="store_true", help="tiny slice, few epochs (smoke test)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--algorithm", choices=["spherical", "kmeans", "both"], default="both")
    parser.add_argument("--sample", default="39x",
                        help="k-means sample: rows, 'NNNx' (rows per cluster), 'all' or 'default' "
                             "(clustering.resolve_sample_size's rule); default 39x, the old build")
    parser.add_argument("--init-rows", default="all",
                        help="seed k-means++ from this many sample rows (same forms as --sample, or "
                             "'default': fit_centroids' 16 per cluster); default: all, the old build")
    parser.add_argument("--fit-rows", default=None,
                        help="run k-means on this many of the sample rows (same forms), then "
                             "--sample-passes Lloyd passes over the whole sample; default: all")
    parser.add_argument("--sample-passes", type=int, default=0)
    parser.add_argument("--refine-passes", type=int, default=0,
                        help="Lloyd passes over all rows after the sample fit (default 0)")
    parser.add_argument("--max-cluster-ratio", type=float, default=None,
                        help="bound cluster sizes at ceil(ratio * N / L) when assigning (default: none)")
    parser.add_argument("--max-iter", type=int, default=25, help="k-means iterations on the sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cluster-only", action="store_true",
                        help="build the clusters and report their cost and shape; no routers")
    parser.add_argument("--normalize", action="store_true",
                        help="unit-norm variant: scale every document and query to unit length first")
    parser.add_argument("--rows", choices=["all", "moments", "labels"], default="all",
                        help="which routers: 'labels' the label variants of issue 5 with adaptive "
                             "nprobe, 'moments' issue 20's moment routers beside centroid and "
                             "today's learned router, 'all' both (default)")
    args = parser.parse_args(argv)
    num = lambda v: int(v) if isinstance(v, str) and v.isdigit() else v  # noqa: E731
    cfg = ClusterConfig(sample=None if args.sample == "default" else num(args.sample),
                        init_rows=None if args.init_rows == "default" else num(args.init_rows),
                        fit_rows=num(args.fit_rows),
                        sample_passes=args.sample_passes, refine_passes=args.refine_passes,
                        max_cluster_ratio=args.max_cluster_ratio, max_iter=args.max_iter)
    setup_logging()
    docs, queries = load(args.dataset, args.quick)
    if args.normalize:
        from milvus_ltr_router.clustering import normalize_rows
        docs, queries = normalize_rows(docs).astype(np.float32), normalize_rows(queries).astype(np.float32)
    variants, moments = args.rows in ("all", "labels"), args.rows in ("all", "moments")
    algorithms = ("spherical", "kmeans") if args.algorithm == "both" else (args.algorithm,)
    if args.cluster_only:
        rows = []
        for alg in algorithms:
            c = build_clusters(docs, alg, args.seed, cfg)["clustering"]
            rows.append({"algorithm": alg, **{k: v for k, v in c.items() if k != "sizes"},
                         **{f"size_{k}": v for k, v in c["sizes"].items()}})
        print_table(rows, ["algorithm", "sample_rows", "init_rows", "fit_rows", "sample_passes",
                           "refine_passes", "max_cluster_ratio",
                           "fit_s", "refine_s", "assign_s", "fit_cpu_s", "refine_cpu_s", "assign_cpu_s",
                           "objective", "size_max_over_mean", "size_empty"],
                    f"{args.dataset}: clustering only")
        return 0
    results = [run_one(docs, queries, alg, seed=args.seed, max_epochs=5 if args.quick else 100, cfg=cfg,
                       variants=variants, moments=moments, quick=args.quick)
               for alg in algorithms]
    unit = " unit-norm" if args.normalize else ""
    for res in results:
        print_table(res["fixed"], ["router", "nprobe", "pct_of_L", "scanned_pct", "top1", "recall@10"],
                    f"{args.dataset}{unit}: {res['algorithm']} k-means, N={res['N']}, L={res['L']}, "
                    f"{res['queries']} real queries (test {res['split'][2]})")
        if moments:
            moment_tables(res, f"{args.dataset}{unit} {res['algorithm']} (N={res['N']}, L={res['L']}, "
                               f"test {res['split'][2]})")
    if variants:
        print_table([summary_row(res) for res in results],
                ["algorithm", "sample_rows", "init", "fit", "s_pass", "refine", "ratio", "fit_s", "refine_s", "assign_s", "cpu_s",
                 "objective", "max/mean", "empty", "nprobe", "centroid", "learned top-1",
                 "mixed", "mixed_scanned_pct"],
                    f"{args.dataset}: clustering and top-1 / recall@10 at 1% of L")
    save_rows = [row for res in results if variants for router, fixed in SAVINGS
                 for row in savings(res, router, fixed_router=fixed)]
    if save_rows:
        print_table(save_rows, ["algorithm", "router", "fixed_router", "target", "adaptive_recall@10",
                                "adaptive_mean_probed", "fixed_nprobe_for_same_recall",
                                "partitions_saved_pct"],
                    "adaptive nprobe vs fixed nprobe at equal recall@10")
    name = f"quality_{args.dataset}" + ("_unit" if args.normalize else "") + \
        ("_quick" if args.quick else "")
    name += cfg.tag()
    if args.rows != "all":
        name += f"_{args.rows}"
    if args.seed:
        name += f"_seed{args.seed}"
    if args.algorithm != "both":
        name += f"_{args.algorithm}"
    save(name, {"dataset": args.dataset, "normalize": args.normalize, "rows": args.rows,
                "results": results, "adaptive_savings": save_rows}, args.out)
    out = RESULTS if args.out is None else __import__("pathlib").Path(args.out)
    for res in results:
        if moments:
            moment_plot(out / f"{name}_{res['algorithm']}_moments.png", res,
                        f"{args.dataset}{unit} {res['algorithm']}: N={res['N']}, L={res['L']}")
        if not variants:
            continue
        series = {}
        for router in ("centroid", "learned top-1", "learned top-10", "learned top-10 mixed"):
            f = [r for r in res["fixed"] if r["router"] == router]
            series[f"{router} (fixed)"] = ([r["nprobe"] for r in f], [r["recall@10"] for r in f])
        for router in ("learned top-10 mixed", "learned top-10 mixed, prob. threshold"):
            a = [r for r in res["adaptive"] if r["router"] == router]
            series[f"{router} (adaptive)"] = ([r["mean_probed"] for r in a], [r["recall@10"] for r in a])
        plot_lines(out / f"{name}_{res['algorithm']}.png", series, "mean partitions probed",
                   "recall@10", f"{args.dataset} {res['algorithm']}: N={res['N']}, L={res['L']}", logx=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
