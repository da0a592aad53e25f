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

    python -m benchmarks.bench_quality [--dataset fixture|small|medium] [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import plot_lines, print_table, save, RESULTS, setup_logging

FRACTIONS = (0.001, 0.01, 0.02, 0.05)
TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


def load(name: str, quick: bool):
    from milvus_ltr_router.datasets import load_or_build
    data = load_or_build(name)
    if quick:
        return data.docs[:3000], data.queries[:1500]
    return data.docs, data.queries


def run_one(docs, queries, algorithm: str, seed: int = 0, max_epochs: int = 100) -> dict:
    from milvus_ltr_router.clustering import assign_clusters, default_n_clusters, fit_centroids
    from milvus_ltr_router.evaluate import evaluate_adaptive, routing_quality
    from milvus_ltr_router.labels import Neighbours, array_blocks, exact_knn
    from milvus_ltr_router.layout import Layout, partition_names_for
    from milvus_ltr_router.router import CentroidRouter
    from milvus_ltr_router.train import LinearRouterTrainer, split_indices

    n_parts = default_n_clusters(len(docs))
    rng = np.random.default_rng(seed)
    sample = docs[rng.choice(len(docs), min(len(docs), 39 * n_parts), replace=False)]
    t0 = time.perf_counter()
    centroids = fit_centroids(sample, n_parts, algorithm, seed=seed)
    parts = assign_clusters(docs, centroids, algorithm)
    nb = exact_knn(queries, array_blocks(docs, parts), k=10)
    tr, va, te = split_indices(len(queries), seed)
    sub = lambda idx: Neighbours(nb.ids[idx], nb.scores[idx], nb.partitions[idx])  # noqa: E731
    layout = Layout("bench", centroids, partition_names_for(n_parts), np.bincount(parts, minlength=n_parts),
                    "IP", algorithm, docs.shape[1], "bench")

    class Linear(CentroidRouter):
        kind = "learned"

        def __init__(self, w, b, temperature=1.0):
            super().__init__(layout, temperature)
            self._wt, self._b = np.ascontiguousarray(w.T), b

    routers = {"centroid": CentroidRouter(layout)}
    training = {}
    for name, label_k, weight in (("learned top-1", 1, 0.0), ("learned top-10", 10, 0.0),
                                  ("learned top-10 mixed", 10, 0.5)):
        y = nb.partitions[:, :label_k] if label_k > 1 else nb.labels
        m = LinearRouterTrainer(max_epochs=max_epochs, seed=seed, top1_weight=weight).fit(
            queries[tr], y[tr], queries[va], y[va], n_parts, centroids=centroids)
        routers[name] = Linear(m.coef_, m.intercept_)
        training[name] = {"init": m.init_, "best_epoch": m.best_epoch_, "top1_weight": weight}
    # the same mixed router, adaptive from calibrated probabilities alone (no stopping model)
    routers["learned top-10 mixed, prob. threshold"] = Linear(m.coef_, m.intercept_)
    for name, r in routers.items():   # calibration from the validation split only
        r.calibrate(queries[va], nb.partitions[va], stopping_model="prob. threshold" not in name)
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
                          "recall@10": q.recall})
    return {"algorithm": algorithm, "N": len(docs), "L": n_parts, "queries": len(queries),
            "split": [len(tr), len(va), len(te)], "fixed": fixed, "adaptive": adaptive,
            "fixed_recall_curve": curves,
            "training": training, "seconds": time.perf_counter() - t0,
            "temperatures": {n: r.temperature for n, r in routers.items()}}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fixture", choices=["fixture", "small", "medium"])
    parser.add_argument("--quick", action="store_true", help="tiny slice, few epochs (smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    docs, queries = load(args.dataset, args.quick)
    results = [run_one(docs, queries, alg, max_epochs=5 if args.quick else 100)
               for alg in ("spherical", "kmeans")]
    for res in results:
        print_table(res["fixed"], ["router", "nprobe", "pct_of_L", "top1", "recall@10"],
                    f"{args.dataset}: {res['algorithm']} k-means, N={res['N']}, L={res['L']}, "
                    f"{res['queries']} real queries (test {res['split'][2]})")
    save_rows = [row for res in results for router, fixed in SAVINGS
                 for row in savings(res, router, fixed_router=fixed)]
    if save_rows:
        print_table(save_rows, ["algorithm", "router", "fixed_router", "target", "adaptive_recall@10",
                                "adaptive_mean_probed", "fixed_nprobe_for_same_recall",
                                "partitions_saved_pct"],
                    "adaptive nprobe vs fixed nprobe at equal recall@10")
    name = f"quality_{args.dataset}" + ("_quick" if args.quick else "")
    save(name, {"dataset": args.dataset, "results": results, "adaptive_savings": save_rows}, args.out)
    out = RESULTS if args.out is None else __import__("pathlib").Path(args.out)
    for res in results:
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
