"""The router commands: ``status`` (layout, live router, query log), ``evaluate`` (centroid
vs published router on a query file) and ``rollback``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EXIT_OK, InputError
from .common import Command, connected, connection_args, model_dir_arg, quality_legend

ALGORITHMS = {"spherical": "spherical k-means", "kmeans": "standard k-means"}
STORAGE_MODES = {"partition": "one partition per cluster",
                 "grouped": "clusters grouped into partitions, plus a cluster-id filter",
                 "single": "one collection, plus a cluster-id filter"}


# --------------------------------------------------------------------------- status
def status_args(p: argparse.ArgumentParser) -> None:
    connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    model_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


#: What searches route by while no usable router is published, per fallback kind.
FALLBACKS = {"moments": "the layout's cluster moments", "centroid": "centroids"}


def router_metrics_text(metrics: dict) -> str:
    """``top1@nprobe=2 0.5850, gain +0.0350 over centroid`` from a published router's metrics."""
    parts = [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
             for key, value in metrics.items() if key not in ("gain", "baseline")]
    if isinstance(metrics.get("gain"), (int, float)):
        parts.append(f"gain {metrics['gain']:+.4f} over {metrics.get('baseline', 'the baseline')}")
    return ", ".join(parts)


def format_status(status: dict) -> str:
    """``status``'s human-readable form: aligned ``key: value`` lines, from the dict
    ``status --json`` prints."""
    yes = {True: "yes", False: "no"}
    storage, sizes, router = status["storage"], status["cluster_sizes"], status["router"]
    where = storage["mode"] + ": " + STORAGE_MODES.get(storage["mode"], "")
    n_parts = storage["partitions"]
    extras = [f"{n_parts} partition{'' if n_parts == 1 else 's'} in Milvus"]
    if storage.get("cluster_field"):
        extras.append(f"cluster field {storage['cluster_field']}")
    if storage.get("clustering_key"):
        extras.append("clustering key")
    strays = status["rows_outside_layout"]
    lines = [
        ("collection", status["collection"] + (f" (laid out from {status['source']!r})"
                                                if status.get("source") else " (adopted layout)")),
        ("Milvus", status["uri"]),
        ("layout", f"{status['layout_id']}, created {status['created_at']}"),
        ("clusters", f"{status['partitions']} ({ALGORITHMS.get(status['algorithm'], status['algorithm'])}, metric "
                     f"{status['metric']}, dim {status['dim']})"),
        ("storage", f"{where} ({', '.join(extras)})"),
        ("rows", f"{status['rows_live']} now, {status['rows']} when laid out"),
        ("cluster sizes", f"min {sizes['min']}, median {sizes['median']:g}, max {sizes['max']} "
                          f"(max/mean {sizes['max_over_mean']:.2f}), {sizes['empty']} empty"),
        ("rows outside layout", f"{strays}" + (" (see the warning below)" if strays else "")),
        ("query log", f"{status['logged_queries']} queries logged"),
        ("upkeep", _upkeep_line(status)),
        ("model dir", f"{status['model_dir']} (looked in {status['router_dir']}"
                      + ("" if status.get("router_dir_exists", True) else ", which does not exist")
                      + ")"),
    ]
    fallback = FALLBACKS.get(router.get("kind"), FALLBACKS["centroid"])
    if router.get("version") is None and router.get("error"):
        lines.append(("router", f"NOT USABLE ({router['error']}): searches route by {fallback}; "
                                "the next published router replaces the pointer"))
    elif router.get("version") is None:
        lines.append(("router", f"none published: searches route by {fallback}"))
    else:
        state = "usable" if router.get("usable") else \
            f"NOT USABLE ({router.get('error')}): searches route by {fallback}"
        kind = f"{router['kind']} router " if router.get("usable") and router.get("kind") else ""
        lines.append(("router", f"{kind}{router['version']}, published {router['published_at']}, "
                                f"{state}"))
        metrics = router_metrics_text(router.get("metrics") or {})
        lines.append(("router metrics", f"{metrics} (retrain's held-out queries)" if metrics
                      else "none recorded (rolled back)"))
        if router.get("usable"):
            lines.append(("recall_target", f"calibrated {yes[router['recall_target_calibrated']]}, "
                                           f"stopping model {yes[router['stopping_model']]}, "
                                           f"adaptive head {yes[router['adaptive_head']]}"))
    lines.append(("versions kept", ", ".join(status["versions"]) or "none"))
    lines.append(("live recall", live_recall_text(status.get("live_recall"))))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)


def live_recall_text(live: dict | None) -> str:
    """``status``'s live recall line, from ``status --json``'s ``live_recall``."""
    from ..live_stats import describe_estimate
    if not live:
        return "none published (clients with recall_sample= publish it to the model dir)"
    clients = live["clients"]
    used = [c for c in clients if c["current"] and not c["stale"]]
    if not live["estimates"]:
        why = []
        if any(c["stale"] for c in clients):
            why.append(f"{sum(c['stale'] for c in clients)} stale")
        if any(not c["current"] for c in clients):
            why.append(f"{sum(not c['current'] for c in clients)} for another router or layout")
        if live.get("unreadable"):
            why.append(f"{len(live['unreadable'])} unreadable")
        if used and not why:
            why.append("no sampled search audited yet")
        return f"no current estimate ({', '.join(why)} of {len(clients)} client record(s))"
    newest = min(c["age_s"] for c in used)
    return "; ".join(describe_estimate(e) for e in live["estimates"]) + \
        f" (from {len(used)} client{'' if len(used) == 1 else 's'}, newest {newest:.0f} s ago)"


def router_info(registry, layout) -> tuple[dict, object]:
    """What ``status`` says about the live router of ``layout``, and its registry entry.

    ``kind`` is what searches route by: the published router's kind (learned, moments,
    learned-moments) when it is usable, else the layout's training-free fallback
    (moments when the layout has cluster moments, else centroid), as clients do."""
    from ..registry import RegistryError
    from ..router import Router, RouterError
    from ..serving import fallback_kind
    fallback = fallback_kind(layout)
    info: dict = {"version": None, "kind": fallback}
    try:
        current = registry.current(layout.collection)
    except RegistryError as exc:    # what clients then do: route by centroids (and say why)
        current = None
        info.update(usable=False, error=str(exc))
    if current is not None:
        info = {"version": current.version, "published_at": current.published_at,
                "metrics": current.metrics, "kind": fallback}
        try:
            router = Router.load(current.path, layout=layout)
            info["usable"] = True
            info["kind"] = router.kind
            info["recall_target_calibrated"] = bool(router.recall_thresholds)
            info["stopping_model"] = router.stopping_model is not None
            info["adaptive_head"] = router.has_adaptive_head
        except RouterError as exc:
            info.update(usable=False, error=str(exc))
    return info, current


def _upkeep_line(status: dict) -> str:
    logged = status.get("writes_since_upkeep")
    if logged is None:
        return "no write log (maintain-layout does not apply; README 'When to rebuild')"
    share = logged / max(1, status["rows_live"])
    return (f"{logged} routed writes logged since the last maintain-layout ({share:.1%} of the "
            f"rows; writes land in arrival order until it runs)")


def run_status(args) -> int:
    from ..clustering import size_summary
    from ..layout import cluster_sizes, read_layout
    from ..live_stats import describe_estimate, read_live_recall
    from ..milvus_io import count_rows
    from ..querylog import log_size
    from ..registry import ModelRegistry
    from ..repair import stray_rows
    from ..storage import storage_status
    with connected(args) as client:
        lay = read_layout(client, args.collection)
        n_logged = log_size(client, lay.collection)
        live = cluster_sizes(client, lay)
        strays = stray_rows(client, lay)
        since_upkeep = count_rows(client, lay.write_log) if lay.write_log else None
    registry = ModelRegistry(args.model_dir)
    info, current = router_info(registry, lay)
    live_recall = read_live_recall(args.model_dir, lay.collection, layout_id=lay.layout_id,
                                   version=info["version"] if info.get("usable") else None)
    status = {"collection": lay.collection, "uri": args.uri, "model_dir": str(args.model_dir),
              "router_dir": str(registry.collection_dir(lay.collection)),
              "router_dir_exists": registry.collection_dir(lay.collection).is_dir(),
              "layout_id": lay.layout_id, "partitions": lay.n_partitions,
              "rows": int(lay.sizes.sum()), "algorithm": lay.algorithm, "metric": lay.metric,
              "dim": lay.dim, "created_at": lay.created_at, "source": lay.source,
              "storage": storage_status(lay.storage), "rows_live": int(live.sum()),
              "cluster_sizes": size_summary(live), "rows_outside_layout": strays,
              "router": info, "logged_queries": n_logged, "writes_since_upkeep": since_upkeep,
              "versions": registry.versions(lay.collection), "live_recall": live_recall}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
        if current is None:
            print(f"\nnext: once applications have logged queries, publish a router with\n"
                  f"  retrain-router --uri {args.uri} --collection {lay.collection} "
                  f"--model-dir {args.model_dir}")
    if strays:
        print(f"warning: {strays} rows of {lay.collection!r} sit outside the layout's partitions "
              f"(written around the plugin); routed searches include them until 'milvus-ltr-router "
              f"repair-layout --collection {lay.collection}' moves them into their clusters",
              file=sys.stderr)
    for e in (live_recall or {}).get("estimates", []):
        if e["below_target"]:
            print(f"warning: live {describe_estimate(dict(e, below_target=False))} of "
                  f"{lay.collection!r}: below the target by more than its interval; queries or "
                  f"data drifted from what the router was calibrated on: retrain the router "
                  f"(and repair-layout if rows were written around the layout)", file=sys.stderr)
    return EXIT_OK


STATUS = Command(
    "status", "show a collection's layout, live router and query log",
    "Human-readable by default; --json for scripts. Names the URI and the model\n"
    "directory it looked in.",
    status_args, run_status)


# --------------------------------------------------------------------------- evaluate
def evaluate_args(p: argparse.ArgumentParser) -> None:
    connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    p.add_argument("--queries", required=True, metavar="FILE.npy",
                   help=".npy query matrix [n, dim]")
    model_dir_arg(p)
    p.add_argument("--nprobe", type=int, nargs="*",
                   help="nprobe values (default 0.1%%..10%% of L)")
    p.add_argument("--k", type=int, default=10, help="k of recall@k: neighbours per query")
    p.add_argument("--json", metavar="FILE", help="also write the results here (default: none)")


def check_evaluate_args(args) -> None:
    """evaluate: options that are wrong whatever the collection holds, before any work."""
    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}")
    bad = [n for n in (args.nprobe or []) if n < 1]
    if bad:
        raise InputError(f"--nprobe values must be >= 1, got {bad}")
    if args.json and Path(args.json).is_dir():
        raise InputError(f"--json {args.json} is a directory; give a file path")


def run_evaluate(args) -> int:
    from ..evaluate import evaluate_router, nprobe_grid
    from ..layout import read_layout
    from ..registry import ModelRegistry
    from ..report import format_table, quality_json
    from ..retrain import label_queries, load_query_file
    from ..router import CentroidRouter, Router, validate_nprobes
    with connected(args) as client:
        lay = read_layout(client, args.collection)
        queries = load_query_file(args.queries, lay.dim)
        nprobes = validate_nprobes(args.nprobe or nprobe_grid(lay.n_partitions), lay.n_partitions)
        neighbours = label_queries(client, lay, queries, args.k)
    routers = {"centroid": CentroidRouter(lay)}
    current = ModelRegistry(args.model_dir).current(lay.collection)
    if current is not None:
        routers["learned"] = Router.load(current.path, layout=lay)
    results = {name: evaluate_router(r, queries, neighbours, nprobes, args.k)
               for name, r in routers.items()}
    print(f"routing quality on {len(queries)} queries of {args.queries}, against their exact "
          f"neighbours in {lay.collection!r} at {args.uri} (model dir {args.model_dir}"
          f"{'' if current is not None else ': no router published, centroid routing only'}):")
    print(quality_legend(args.k))
    print(format_table(results, args.k))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(quality_json(results))
    return EXIT_OK


EVALUATE = Command(
    "evaluate", "centroid vs published router on a query file",
    "Top-1 accuracy (share of queries whose exact nearest neighbour lies in a probed\n"
    "partition) and recall@k (share of each query's exact top-k there) against nprobe,\n"
    "for centroid routing and the published router, on queries you supply.",
    evaluate_args, run_evaluate, check_evaluate_args)


# --------------------------------------------------------------------------- rollback
def rollback_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", required=True, help="collection whose router to roll back")
    model_dir_arg(p)


def run_rollback(args) -> int:
    from ..registry import ModelRegistry
    pub = ModelRegistry(args.model_dir).rollback(args.collection)
    print(f"{args.collection!r} now serves router {pub.version}")
    return EXIT_OK


ROLLBACK = Command(
    "rollback", "point a collection back at its previous router",
    "Only the model directory is touched (no --uri): applications' clients pick the\n"
    "previous router up on their next reload.",
    rollback_args, run_rollback)
