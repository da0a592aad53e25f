"""The end-to-end demo on milvus-lite (README's first command).

Real data: 20,000 WordNet glosses and 4,000 real questions (Natural Questions,
MS MARCO, ...) embedded with all-MiniLM-L6-v2 (the committed test fixture).
Steps: load the vectors into a milvus-lite collection, build a layout, send
3,000 questions through :class:`RoutedMilvusClient` (filling the query log),
run ``retrain-router`` as a separate process (milvus-lite serves a file to one
process at a time, so the demo releases it first), then compare centroid and
learned routing on the 1,000 held-out questions: routing quality against
exact neighbours, and the recall of the real searches through Milvus.
"""
from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


log = logging.getLogger(__name__)


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def next_steps(db: str, model_dir: str, held_out: str) -> str:
    """What to try after the demo: its own results, then the same loop on your collection."""
    q = shlex.quote
    where = f"--uri {q(db)} --collection wordnet_ivf --model-dir {q(model_dir)}"
    return "\n".join([
        "",
        "== next (README: \"After the demo\")",
        "look at what the demo built:",
        f"  milvus-ltr-router status {where}",
        f"  milvus-ltr-router evaluate {where} --queries {q(held_out)}",
        "the same loop on your own collection (URI: http://host:19530, or an existing "
        "milvus-lite .db file):",
        "  milvus-ltr-router build-layout --uri URI --source YOURS --target YOURS_ivf",
        "  # search YOURS_ivf through RoutedMilvusClient(URI, model_dir=\"onnx_models\"), "
        "which logs 1% of queries (README: \"As a library\")",
        "  retrain-router --uri URI --collection YOURS_ivf --since 7d    "
        "# nightly from cron (README: \"Command line\")",
        "  milvus-ltr-router status --uri URI --collection YOURS_ivf",
    ])


def run_demo(db: str = "./demo_output/demo.db", out: str = "./demo_output",
             n_clusters: int | None = None, nprobe: int = 2, n_logged: int = 3000) -> dict:
    from pymilvus import MilvusClient

    from .client import RoutedMilvusClient
    from .fixture import load_fixture
    from .evaluate import evaluate_router, nprobe_grid
    from .build import build_layout
    from .layout import read_layout
    from .milvus_io import release_lite
    from .writer import create_vector_collection
    from .progress import progress
    from .registry import ModelRegistry
    from .report import format_table, plot_quality
    from .retrain import label_queries
    from .router import CentroidRouter, Router

    t_start = time.perf_counter()
    out_dir = Path(out)
    model_dir = out_dir / "onnx_models"
    for path in (Path(db), model_dir):
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(db).parent.mkdir(parents=True, exist_ok=True)

    _step("1/6 real data: WordNet glosses + real questions, all-MiniLM-L6-v2")
    data = load_fixture()
    print(f"{len(data.docs)} documents, {len(data.queries)} questions, dim {data.dim}")
    logged, held_out = data.queries[:n_logged], data.queries[n_logged:]
    np.save(out_dir / "held_out_queries.npy", held_out)

    _step(f"2/6 load the documents into milvus-lite ({db})")
    client = MilvusClient(db)
    create_vector_collection(client, "wordnet", data.docs, show_progress=None)

    _step("3/6 build the layout: spherical k-means, one partition per cluster")
    report = build_layout(client, "wordnet", "wordnet_ivf", n_clusters=n_clusters)
    layout = report.layout
    print(f"layout {layout.layout_id}: {layout.n_partitions} partitions, sizes "
          f"{layout.sizes.min()}..{layout.sizes.max()}")
    client.close()
    release_lite(db)

    _step(f"4/6 {len(logged)} real questions through RoutedMilvusClient (centroid routing, "
          f"nprobe={nprobe}); every query is logged")
    routed = RoutedMilvusClient(db, model_dir=str(model_dir), nprobe=nprobe, log_rate=1.0)
    print(f"router: {routed.router_status('wordnet_ivf')['mode']} (nothing is published yet, so "
          f"the client probes the partitions whose centroids score highest)")
    batches = range(0, len(logged), 50)
    for s in progress(batches, total=len(batches), desc="search", unit="batch", enabled=None):
        routed.search("wordnet_ivf", data=logged[s:s + 50].tolist(), limit=10)
    routed.flush_query_log()
    qlog = routed.router_status("wordnet_ivf")["query_log"]
    print(f"query log: {qlog['written']} of {qlog['submitted']} queries written to Milvus "
          f"({qlog['dropped']} dropped, {qlog['failed']} failed)")
    routed.close()
    release_lite(db)

    _step("5/6 retrain-router (a separate process, as cron would run it): labels the logged "
          "queries with their exact neighbours, trains on 64% of them, validates on 16%, and "
          "publishes only if it beats centroid routing (and any live router) on the other 20%")
    cmd = [sys.executable, "-m", "milvus_ltr_router.cli", "retrain", "--uri", db,
           "--collection", "wordnet_ivf", "--model-dir", str(model_dir), "--nprobe", str(nprobe),
           "--report", str(out_dir / "reports")]
    print("$ retrain-router " + " ".join(cmd[4:]), flush=True)
    subprocess.run(cmd, check=True)

    _step(f"6/6 compare centroid and learned routing on the {len(held_out)} held-out questions "
          f"(never logged, never seen by retrain)")
    routed = RoutedMilvusClient(db, model_dir=str(model_dir), nprobe=nprobe, log_rate=0.0)
    layout = read_layout(routed, "wordnet_ivf")
    neighbours = label_queries(routed, layout, held_out, 10)
    current = ModelRegistry(model_dir).current("wordnet_ivf")
    routers = {"centroid": CentroidRouter(layout)}
    if current is not None:
        routers["learned"] = Router.load(current.path, layout=layout)
    nprobes = nprobe_grid(layout.n_partitions)
    table = {name: evaluate_router(r, held_out, neighbours, nprobes) for name, r in routers.items()}
    print(f"routing quality on the {len(held_out)} held-out questions, against their exact "
          f"inner-product neighbours\n(top1 = top-1 accuracy, R@10 = recall@10, as explained "
          f"in step 5):")
    print(format_table(table))
    png = plot_quality(table, out_dir / "demo_routing_quality.png",
                       title=f"{layout.n_partitions} partitions, {len(held_out)} held-out questions")

    status = routed.router_status("wordnet_ivf")

    def milvus_recall(**search_args) -> float:
        hits = routed.search("wordnet_ivf", data=held_out.tolist(), limit=10, **search_args)
        return float(np.mean([len({h["id"] for h in row} & set(t.tolist())) / 10
                              for row, t in zip(hits, neighbours.ids)]))

    recall = milvus_recall()
    print(f"\nreal searches through Milvus, the same {len(held_out)} held-out questions "
          f"(recall@10 = share of the exact top 10 that a search returns):")
    print(f"search(...) with the {status['mode']} router {status.get('version')}, "
          f"nprobe={nprobe} of {layout.n_partitions}: recall@10 = {recall:.4f}")
    adaptive = {}
    if status.get("adaptive"):
        for target in (0.8, 0.9):
            probed = np.mean([len(r) for r in routed.route("wordnet_ivf", held_out,
                                                           recall_target=target)])
            adaptive[target] = {"recall@10": milvus_recall(recall_target=target),
                                "mean_partitions": float(probed)}
            print(f"search(..., recall_target={target}): recall@10 = "
                  f"{adaptive[target]['recall@10']:.4f} probing {probed:.1f} partitions on average")
    routed.close()
    release_lite(db)
    if png:
        print(f"plot: {png}")
    print(next_steps(db, str(model_dir), str(out_dir / "held_out_queries.npy")))
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")   # the last line (tests)
    return {"table": {n: [asdict(q) for q in rows] for n, rows in table.items()},
            "milvus_recall@10": recall, "adaptive": adaptive, "router": status}
