"""Command line: ``milvus-ltr-router <command>`` and ``retrain-router`` (the cron job).

Exit codes: 0 success (for retrain: published, kept the current router, or
dry run); 1 operational failure (Milvus unreachable, layout or router
problem, training failed); 2 bad arguments or input; 3 another retrain of the
same collection holds the lock. Nothing is published unless the exit code is 0.
Every error reaches :func:`_run`, which maps it through :func:`.errors.exit_code`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from .errors import EXIT_FAIL, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, InputError  # noqa: F401


def _parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 3600, 12h, 7d)")


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default="./milvus_ltr.db",
                   help="Milvus URI (http://host:19530) or a milvus-lite file (default ./milvus_ltr.db)")
    p.add_argument("--token", default="", help="Milvus token (user:password or API key)")


def _retrain_args(p: argparse.ArgumentParser) -> None:
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    p.add_argument("--model-dir", default="onnx_models", help="router registry directory")
    p.add_argument("--queries", help="bootstrap from a .npy query matrix instead of the query log")
    p.add_argument("--sample", type=int, default=50_000, help="queries to sample (default 50000)")
    p.add_argument("--since", type=_parse_duration, help="only logged queries this recent (e.g. 7d)")
    p.add_argument("--nprobe", type=int, default=8, help="partitions probed per query (default 8)")
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="publish iff new - max(live router, centroid routing) >= this at --nprobe "
                        "(default 0; negative accepts a slightly worse router)")
    p.add_argument("--metric", choices=["top1", "recall"], default="top1",
                   help="what decides publishing: top-1 accuracy or recall@k at --nprobe")
    p.add_argument("--k", type=int, default=10, help="k of recall@k (default 10)")
    p.add_argument("--label-k", type=int, default=10,
                   help="train on the partitions of the top-k neighbours (default 10; "
                        "1 = the paper's top-1 labels)")
    p.add_argument("--top1-weight", type=float, default=0.5,
                   help="with --label-k > 1, weight of the paper's top-1 term in the loss "
                        "(0 = top-k only; 0.5 keeps top-1 accuracy while raising recall@k)")
    p.add_argument("--no-adaptive-head", dest="adaptive_head", action="store_false",
                   help="do not train the second, top-k-only head that recall_target searches "
                        "rank with (trained by default when --top1-weight > 0)")
    p.add_argument("--min-queries", type=int, default=200)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--init", choices=["auto", "centroids", "random"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=5, help="published versions to keep")
    p.add_argument("--labels", choices=["auto", "milvus", "local"], default="auto",
                   help="where exact neighbours are computed: 'milvus' asks the server (exact "
                        "search over a cluster-id layout with a FLAT index; moves ids, not "
                        "vectors), 'local' streams every vector here (faster on one machine); "
                        "default auto: local until the vectors to stream pass 8 GiB, then "
                        "milvus where its search is exact")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate, publish nothing")
    p.add_argument("--report", metavar="DIR", help="write a JSON and PNG report here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milvus-ltr-router",
        description="Learned partition routing for Milvus (learning-to-rank IVF routing).",
        epilog="Exit codes: 0 ok, 1 operational failure, 2 bad input, 3 retrain already running.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build-layout", help="cluster a collection into a new collection stored by cluster")
    _connection_args(p)
    p.add_argument("--source", required=True, help="collection to read (never modified)")
    p.add_argument("--target", required=True, help="new laid-out collection to write")
    p.add_argument("--storage", choices=["auto", "partition", "grouped", "single"], default="auto",
                   help="how clusters sit in Milvus: 'single' one collection + a cluster-id filter "
                        "(servers' default, fastest measured), 'grouped' G partitions + the filter, "
                        "'partition' one partition per cluster (milvus-lite's default); "
                        "default auto")
    p.add_argument("--groups", type=int, help="partitions for --storage grouped (default ~cube root of L)")
    p.add_argument("--clustering-key", action="store_true",
                   help="Milvus >= 2.4.7 only: make the cluster-id field the clustering key and run "
                        "clustering compaction (segment pruning); refused on older servers")
    p.add_argument("--clusters", type=int, help="number of clusters (default round(sqrt(N)))")
    p.add_argument("--algorithm", choices=["spherical", "kmeans"], default="spherical")
    p.add_argument("--metric", choices=["IP", "COSINE", "L2"],
                   help="search metric (default: the source index's, else IP)")
    p.add_argument("--field", help="vector field (needed when there are several)")
    p.add_argument("--sample-size", "--sample", dest="sample_size",
                   help="k-means sample: rows (50000), rows per cluster (256x) or 'all' "
                        "(default 256 per cluster, at most 131072 rows)")
    p.add_argument("--refine-passes", type=int, default=0,
                   help="Lloyd passes over the whole source after k-means on the sample "
                        "(streamed; each pass reads the source once; default 0)")
    p.add_argument("--max-cluster-ratio", type=float,
                   help="bound every cluster at this multiple of the mean size when rows are "
                        "assigned at build time (e.g. 2.0; default unbounded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index-type", default="FLAT",
                   help="vector index of the laid-out collection (default FLAT: exact scans of the "
                        "probed clusters, and what --labels milvus needs)")
    p.add_argument("--index-params", default="{}", help='index params as JSON, e.g. \'{"nlist": 16}\'')
    p.add_argument("--alias", help="point this alias at the new collection when done")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target")
    p.add_argument("--max-partitions", type=int,
                   help="server's rootCoord.maxPartitionNum if raised above 1024")

    p = sub.add_parser("adopt-layout", help="store centroids for a collection already partitioned by cluster")
    _connection_args(p)
    p.add_argument("--collection", required=True)
    p.add_argument("--algorithm", choices=["spherical", "kmeans"], default="kmeans")
    p.add_argument("--metric", choices=["IP", "COSINE", "L2"])
    p.add_argument("--field")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("repair-layout", help="move rows written around the layout (into _default "
                       "of a one-partition-per-cluster layout) into their clusters")
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")

    p = sub.add_parser("drop-layout", help="drop a laid-out collection and its layout metadata")
    _connection_args(p)
    p.add_argument("--collection", required=True)

    p = sub.add_parser("status", help="show a collection's layout, live router and query log")
    _connection_args(p)
    p.add_argument("--collection", required=True)
    p.add_argument("--model-dir", default="onnx_models")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("retrain", help="the cron job (same as the retrain-router command)")
    _retrain_args(p)

    p = sub.add_parser("evaluate", help="centroid vs published router on a query file")
    _connection_args(p)
    p.add_argument("--collection", required=True)
    p.add_argument("--queries", required=True, help=".npy query matrix")
    p.add_argument("--model-dir", default="onnx_models")
    p.add_argument("--nprobe", type=int, nargs="*", help="nprobe values (default 0.1%%..10%% of L)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", metavar="FILE", help="also write the results here")

    p = sub.add_parser("rollback", help="point a collection back at its previous router")
    p.add_argument("--collection", required=True)
    p.add_argument("--model-dir", default="onnx_models")

    p = sub.add_parser("demo", help="end-to-end demo on milvus-lite with real MiniLM vectors")
    p.add_argument("--db", default="./demo_output/demo.db", help="milvus-lite file to create")
    p.add_argument("--out", default="./demo_output", help="where routers and plots go")
    p.add_argument("--clusters", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=2)
    return parser


def retrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrain-router",
        description="Retrain a collection's router from its query log (or a query file); publish "
                    "it only if it beats the live router and centroid routing. Meant for cron.",
        epilog="Exit codes: 0 published / kept current router / dry run, 1 operational failure, "
               "2 bad input, 3 another retrain of the collection is running.")
    parser.add_argument("-v", "--verbose", action="store_true")
    _retrain_args(parser)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party(verbose)


def quiet_third_party(verbose: bool = False) -> None:
    """milvus-lite logs every unimplemented RPC (AllocTimestamp) as an ERROR: noise, not news."""
    for noisy in ("milvus_lite", "pymilvus", "faiss", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _connected(args):
    """A client for ``--uri``/``--token``, closed (and a milvus-lite file released) afterwards."""
    from .milvus_io import open_client, release_lite
    client = open_client(args.uri, args.token)
    try:
        yield client
    finally:
        client.close()
        release_lite(args.uri)


def _cmd_build_layout(args) -> int:
    from .layout import build_layout
    index = {"index_type": args.index_type, "params": json.loads(args.index_params)}
    with _connected(args) as client:
        report = build_layout(client, args.source, args.target, n_clusters=args.clusters,
                              algorithm=args.algorithm, sample_size=args.sample_size, seed=args.seed,
                              metric=args.metric, vector_field=args.field, index=index,
                              alias=args.alias, overwrite=args.overwrite,
                              max_partitions=args.max_partitions, storage=args.storage,
                              groups=args.groups, clustering_key=args.clustering_key,
                              refine_passes=args.refine_passes,
                              max_cluster_ratio=args.max_cluster_ratio)
    lay = report.layout
    print(f"layout {lay.layout_id}: {report.rows} rows of {args.source!r} -> {lay.n_clusters} "
          f"clusters of {lay.collection!r} ({lay.algorithm}, {lay.metric}); storage "
          f"{lay.storage.mode} ({lay.storage.n_groups} partition(s)); "
          f"{len(report.empty_partitions)} empty clusters")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    return EXIT_OK


def _cmd_adopt_layout(args) -> int:
    from .layout import adopt_layout
    with _connected(args) as client:
        lay = adopt_layout(client, args.collection, algorithm=args.algorithm, metric=args.metric,
                           vector_field=args.field, overwrite=args.overwrite)
    print(f"adopted {lay.n_partitions} partitions of {lay.collection!r} as layout {lay.layout_id}")
    return EXIT_OK


def _cmd_drop_layout(args) -> int:
    from .layout import drop_layout, has_layout
    with _connected(args) as client:
        if not has_layout(client, args.collection):
            print(f"{args.collection!r} has no layout; refusing to drop it", file=sys.stderr)
            return EXIT_USAGE
        drop_layout(client, args.collection)
    print(f"dropped {args.collection!r} and its layout")
    return EXIT_OK


def _cmd_status(args) -> int:
    from .clustering import size_summary
    from .layout import cluster_sizes, read_layout, stray_rows
    from .storage import storage_status
    from .querylog import log_size
    from .registry import ModelRegistry
    from .router import Router, RouterError
    with _connected(args) as client:
        lay = read_layout(client, args.collection)
        n_logged = log_size(client, lay.collection)
        live = cluster_sizes(client, lay)
        strays = stray_rows(client, lay)
    registry = ModelRegistry(args.model_dir)
    current = registry.current(lay.collection)
    router_info: dict = {"version": None}
    if current is not None:
        router_info = {"version": current.version, "published_at": current.published_at,
                       "metrics": current.metrics}
        try:
            router = Router.load(current.path, layout=lay)
            router_info["usable"] = True
            router_info["recall_target_calibrated"] = bool(router.recall_thresholds)
            router_info["stopping_model"] = router.stopping_model is not None
            router_info["adaptive_head"] = router.has_adaptive_head
        except RouterError as exc:
            router_info.update(usable=False, error=str(exc))
    status = {"collection": lay.collection, "layout_id": lay.layout_id, "partitions": lay.n_partitions,
              "rows": int(lay.sizes.sum()), "algorithm": lay.algorithm, "metric": lay.metric,
              "dim": lay.dim, "created_at": lay.created_at, "source": lay.source,
              "storage": storage_status(lay.storage), "rows_live": int(live.sum()),
              "cluster_sizes": size_summary(live), "rows_outside_layout": strays,
              "router": router_info, "logged_queries": n_logged,
              "versions": registry.versions(lay.collection)}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for key, value in status.items():
            print(f"{key:>20}: {value}")
    if strays:
        print(f"warning: {strays} rows of {lay.collection!r} sit outside the layout's partitions "
              f"(written around the plugin); routed searches include them until 'milvus-ltr-router "
              f"repair-layout --collection {lay.collection}' moves them into their clusters",
              file=sys.stderr)
    return EXIT_OK


def _cmd_repair_layout(args) -> int:
    from .layout import move_stray_rows, read_layout
    with _connected(args) as client:
        lay = read_layout(client, args.collection)
        moved = move_stray_rows(client, lay)
    print(f"moved {moved} rows of {lay.collection!r} from _default into their clusters' partitions")
    return EXIT_OK


def _cmd_retrain(args) -> int:
    from .report import format_table, write_report
    from .retrain import RetrainConfig, check_output_dir, retrain, validate_config
    cfg = RetrainConfig(collection=args.collection, model_dir=args.model_dir,
                        queries_file=args.queries, sample=args.sample, since_seconds=args.since,
                        nprobe=args.nprobe, min_gain=args.min_gain, metric=args.metric, k=args.k,
                        label_k=args.label_k, top1_weight=args.top1_weight,
                        adaptive_head=args.adaptive_head,
                        min_queries=args.min_queries, max_epochs=args.epochs,
                        init=args.init, seed=args.seed, dry_run=args.dry_run,
                        keep=args.keep, labels=args.labels)
    validate_config(cfg)            # bad options exit 2 before Milvus is even contacted
    if args.report:
        check_output_dir(args.report, "--report")
    with _connected(args) as client:
        result = retrain(client, cfg)
    if args.report:
        try:
            result.report_paths = write_report(result, args.report)
        except OSError as exc:     # after a publish, a failed report must not read as a failed run
            logging.getLogger("milvus-ltr-router").error("report not written to %s: %s",
                                                         args.report, exc)
    if args.json:
        print(result.to_json())
    else:
        print(format_table(result.table, cfg.k))
        print(result.reason)
        for path in result.report_paths:
            print(f"report: {path}")
    return EXIT_OK


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate_router, nprobe_grid, to_json
    from .layout import read_layout
    from .registry import ModelRegistry
    from .report import format_table
    from .retrain import label_queries, load_query_file
    from .router import CentroidRouter, Router, validate_nprobes
    with _connected(args) as client:
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
    print(format_table(results, args.k))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(to_json(results))
    return EXIT_OK


def _cmd_rollback(args) -> int:
    from .registry import ModelRegistry
    pub = ModelRegistry(args.model_dir).rollback(args.collection)
    print(f"{args.collection!r} now serves router {pub.version}")
    return EXIT_OK


def check_evaluate_args(args) -> None:
    """evaluate: options that are wrong whatever the collection holds, before any work."""
    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}")
    bad = [n for n in (args.nprobe or []) if n < 1]
    if bad:
        raise InputError(f"--nprobe values must be >= 1, got {bad}")
    if args.json and Path(args.json).is_dir():
        raise InputError(f"--json {args.json} is a directory; give a file path")


def check_demo_args(args) -> None:
    if args.clusters is not None and args.clusters < 1:
        raise InputError(f"--clusters must be >= 1, got {args.clusters}")
    if args.nprobe < 1:
        raise InputError(f"--nprobe must be >= 1, got {args.nprobe}")


def check_build_layout_args(args, count_source_rows=None) -> None:
    from .clustering import resolve_sample_size
    """build-layout: refuse arguments that can never work (exit 2) before anything is read.

    ``count_source_rows()``, when given, returns ``(real source name, rows)``
    so that ``--clusters`` above the row count and a target that is the
    source under an alias are refused up front too.
    """
    if args.source == args.target:
        raise InputError(f"--target must differ from --source ({args.source!r}): the source is "
                         "never modified; name a new collection")
    if args.clusters is not None and args.clusters < 1:
        raise InputError(f"--clusters must be >= 1, got {args.clusters}")
    if args.max_partitions is not None and args.max_partitions < 1:
        raise InputError(f"--max-partitions must be >= 1, got {args.max_partitions}")
    if args.sample_size is not None:
        try:      # the spec's form; its size against L and N is checked once N is known
            resolve_sample_size(args.sample_size, 1 << 62, 1)
        except ValueError as exc:
            raise InputError(f"--sample-size: {exc}") from exc
        if args.sample_size.strip().isdigit():
            args.sample_size = int(args.sample_size)
    if args.refine_passes < 0:
        raise InputError(f"--refine-passes must be >= 0, got {args.refine_passes}")
    if args.max_cluster_ratio is not None and not args.max_cluster_ratio >= 1.0:
        raise InputError(f"--max-cluster-ratio must be >= 1 (a multiple of the mean cluster size), "
                         f"got {args.max_cluster_ratio}")
    if args.groups is not None and args.groups < 1:
        raise InputError(f"--groups must be >= 1, got {args.groups}")
    try:
        params = json.loads(args.index_params)
    except ValueError as exc:
        raise InputError(f"--index-params is not valid JSON ({exc}): {args.index_params!r}") from exc
    if not isinstance(params, dict):
        raise InputError(f"--index-params must be a JSON object, got {args.index_params!r}")
    if count_source_rows is None:
        return
    name, rows = count_source_rows()
    if name == args.target:
        raise InputError(f"--target {args.target!r} is the source collection itself (--source "
                         f"{args.source!r} is an alias of it); name a new collection")
    if args.clusters is not None and args.clusters > rows:
        raise InputError(f"--clusters {args.clusters} is more than the {rows} rows of "
                         f"{args.source!r}; use at most {rows} (default: round(sqrt(rows)))")


def _preflight_build_layout(args) -> None:
    check_build_layout_args(args)
    if args.clusters is None:       # the default, round(sqrt(N)), always fits
        return
    from .milvus_io import count_rows, describe

    def count_source_rows():
        with _connected(args) as client:
            info = describe(client, args.source, args.field)
            client.load_collection(info.name)
            return info.name, count_rows(client, info.name)

    check_build_layout_args(args, count_source_rows)


# checks that run before a command does any work; a failure exits 2 with its message
PREFLIGHT = {"build-layout": _preflight_build_layout, "evaluate": check_evaluate_args,
             "demo": check_demo_args}


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(db=args.db, out=args.out, n_clusters=args.clusters, nprobe=args.nprobe)
    return EXIT_OK


COMMANDS = {"build-layout": _cmd_build_layout, "adopt-layout": _cmd_adopt_layout,
            "repair-layout": _cmd_repair_layout,
            "drop-layout": _cmd_drop_layout, "status": _cmd_status, "retrain": _cmd_retrain,
            "evaluate": _cmd_evaluate, "rollback": _cmd_rollback, "demo": _cmd_demo}


def _run(handler, args) -> int:
    """Run one command; the one place where errors become exit codes and log lines.

    Errors of the package's hierarchy, pymilvus errors, file-system errors and
    plain ``ValueError`` are logged in one line and mapped by
    :func:`.errors.exit_code`; anything else is a bug and keeps its traceback.
    """
    from pymilvus.exceptions import MilvusException
    from .errors import LtrRouterError, describe, exit_code
    _setup_logging(args.verbose)
    log = logging.getLogger("milvus-ltr-router")
    try:
        preflight = PREFLIGHT.get(getattr(args, "command", None))
        if preflight is not None:
            preflight(args)
        return handler(args)
    except (LtrRouterError, MilvusException, OSError, ValueError) as exc:
        log.error("%s", describe(exc, getattr(args, "uri", None)))
        return exit_code(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(COMMANDS[args.command], args)


def retrain_main(argv: list[str] | None = None) -> int:
    args = retrain_parser().parse_args(argv)
    return _run(_cmd_retrain, args)


if __name__ == "__main__":
    sys.exit(main())
