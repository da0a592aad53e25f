"""Routing quality on real data: the paper's protocol, plus top-k labels and adaptive nprobe.

Paper protocol (arXiv 2404.11731): L = sqrt(N) clusters, standard and spherical
k-means, 64/16/20 split of real queries, top-1 accuracy and recall@10 with
nprobe at 0.1% / 1% / 2% / 5% of L (at least 1), centroid vs learned routing.
Beyond the paper (issue 5): a router trained on the partitions of the top-10
neighbours, and adaptive nprobe (probe every partition whose calibrated
probability reaches the threshold that met the recall target on the validation
split) compared with a fixed nprobe at equal recall@10.

    python -m benchmarks.bench_quality [--dataset fixture|small|medium] [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import plot_lines, print_table, save, RESULTS

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
    for name, label_k in (("learned top-1", 1), ("learned top-10", 10)):
        y = nb.partitions[:, :label_k] if label_k > 1 else nb.labels
        m = LinearRouterTrainer(max_epochs=max_epochs, seed=seed).fit(
            queries[tr], y[tr], queries[va], y[va], n_parts, centroids=centroids)
        routers[name] = Linear(m.coef_, m.intercept_)
        training[name] = {"init": m.init_, "best_epoch": m.best_epoch_}
    for r in routers.values():   # temperature and recall table from the validation split
        r.calibrate(queries[va], nb.partitions[va])
    # the paper's budgets, plus 10% and 20% of L so the fixed curves span the adaptive ones
    nprobes = sorted({max(1, int(round(f * n_parts))) for f in FRACTIONS + (0.1, 0.2)} | {1, 2})
    fixed, adaptive, curves = [], [], {}
    for name, r in routers.items():
        order = r.rank(queries[te], n_parts)
        curves[name] = [routing_quality(order[:, :n], sub(te)).recall
                        for n in range(1, min(n_parts, 100) + 1)]
        for n in nprobes:
            q = routing_quality(order[:, :n], sub(te))
            fixed.append({"algorithm": algorithm, "router": name, "nprobe": n,
                          "pct_of_L": round(100 * n / n_parts, 2), "top1": q.top1_accuracy,
                          "recall@10": q.recall})
        for t, q in evaluate_adaptive(r, queries[te], sub(te), TARGETS):
            adaptive.append({"algorithm": algorithm, "router": name, "target": t,
                             "mean_probed": q.mean_probed, "top1": q.top1_accuracy,
                             "recall@10": q.recall})
    return {"algorithm": algorithm, "N": len(docs), "L": n_parts, "queries": len(queries),
            "split": [len(tr), len(va), len(te)], "fixed": fixed, "adaptive": adaptive,
            "fixed_recall_curve": curves,
            "training": training, "seconds": time.perf_counter() - t0,
            "temperatures": {n: r.temperature for n, r in routers.items()}}


def savings(result: dict, router: str = "learned top-10",
            targets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> list[dict]:
    """Adaptive vs fixed nprobe for ``router`` at equal recall@10.

    For each recall target, the adaptive run's mean partitions probed against
    the smallest fixed nprobe whose recall reaches what adaptive achieved.
    """
    curve = result["fixed_recall_curve"][router]
    rows = []
    for a in (r for r in result["adaptive"] if r["router"] == router):
        if not any(abs(a["target"] - t) < 1e-9 for t in targets):
            continue
        n_fixed = next((n + 1 for n, rec in enumerate(curve) if rec >= a["recall@10"]), None)
        if n_fixed is None:
            continue
        rows.append({"algorithm": result["algorithm"], "router": router, "target": a["target"],
                     "adaptive_recall@10": a["recall@10"], "adaptive_mean_probed": a["mean_probed"],
                     "fixed_nprobe_for_same_recall": n_fixed,
                     "partitions_saved_pct": 100 * (1 - a["mean_probed"] / n_fixed)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fixture", choices=["fixture", "small", "medium"])
    parser.add_argument("--quick", action="store_true", help="tiny slice, few epochs (smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    docs, queries = load(args.dataset, args.quick)
    results = [run_one(docs, queries, alg, max_epochs=5 if args.quick else 100)
               for alg in ("spherical", "kmeans")]
    for res in results:
        print_table(res["fixed"], ["router", "nprobe", "pct_of_L", "top1", "recall@10"],
                    f"{args.dataset}: {res['algorithm']} k-means, N={res['N']}, L={res['L']}, "
                    f"{res['queries']} real queries (test {res['split'][2]})")
    save_rows = [row for res in results for row in savings(res)]
    if save_rows:
        print_table(save_rows, ["algorithm", "target", "adaptive_recall@10", "adaptive_mean_probed",
                                "fixed_nprobe_for_same_recall", "partitions_saved_pct"],
                    "adaptive nprobe vs fixed nprobe at equal recall@10 (learned top-10 router)")
    name = f"quality_{args.dataset}" + ("_quick" if args.quick else "")
    save(name, {"dataset": args.dataset, "results": results, "adaptive_savings": save_rows}, args.out)
    out = RESULTS if args.out is None else __import__("pathlib").Path(args.out)
    for res in results:
        series = {}
        for router in ("centroid", "learned top-1", "learned top-10"):
            f = [r for r in res["fixed"] if r["router"] == router]
            series[f"{router} (fixed)"] = ([r["nprobe"] for r in f], [r["recall@10"] for r in f])
            a = [r for r in res["adaptive"] if r["router"] == router]
            series[f"{router} (adaptive)"] = ([r["mean_probed"] for r in a], [r["recall@10"] for r in a])
        plot_lines(out / f"{name}_{res['algorithm']}.png", series, "mean partitions probed",
                   "recall@10", f"{args.dataset} {res['algorithm']}: N={res['N']}, L={res['L']}", logx=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
