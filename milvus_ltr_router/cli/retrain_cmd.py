"""The cron job: ``milvus-ltr-router retrain`` and ``retrain-router`` (the same command)."""
from __future__ import annotations

import argparse
import logging
import time

from ..errors import EXIT_OK
from .common import (Command, HelpFormatter, connected, connection_args, model_dir_arg,
                     parse_duration, quality_legend)

RETRAIN_EPILOG = """\
example (cron, nightly):
  15 3 * * *  retrain-router --uri http://milvus:19530 --collection docs_ivf --since 7d --maintain \\
              --model-dir /srv/onnx_models --report /srv/onnx_models/reports \\
              --metrics-file /var/lib/node_exporter/textfile/retrain_docs_ivf.prom

top-1 accuracy: share of held-out queries whose exact nearest neighbour lies in a probed
partition; recall@k: share of each query's exact top-k neighbours lying in probed partitions.
exit codes: 0 published / kept the current router / dry run, 1 operational failure, 2 bad
input, 3 another retrain of the collection is running; nothing is published unless 0."""


def retrain_args(p: argparse.ArgumentParser) -> None:
    connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    model_dir_arg(p)
    p.add_argument("--queries", metavar="FILE.npy",
                   help="bootstrap from a .npy query matrix [n, dim] instead of the query log "
                        "(default: the query log)")
    p.add_argument("--sample", type=int, default=50_000, help="queries to sample")
    p.add_argument("--since", type=parse_duration, metavar="DURATION",
                   help="only logged queries this recent: seconds, or 90s, 30m, 12h, 7d, 2w "
                        "(default: the whole log)")
    p.add_argument("--nprobe", type=int, default=8,
                   help="partitions probed per query: the budget the publishing decision "
                        "is made at")
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="publish iff new - max(live router, centroid routing) >= this at "
                        "--nprobe; negative accepts a slightly worse router")
    p.add_argument("--metric", choices=["top1", "recall"], default="top1",
                   help="what decides publishing at --nprobe: top-1 accuracy (share of queries "
                        "whose exact nearest neighbour is in a probed partition) or recall@k "
                        "(share of the exact top-k in probed partitions)")
    p.add_argument("--k", type=int, default=10, help="k of recall@k: neighbours per query")
    p.add_argument("--label-k", type=int, default=10,
                   help="train on the partitions of the top-k neighbours (1 = the paper's "
                        "top-1 labels)")
    p.add_argument("--top1-weight", type=float, default=0.5,
                   help="with --label-k > 1, weight of the paper's top-1 term in the loss "
                        "(0 = top-k only; 0.5 keeps top-1 accuracy while raising recall@k)")
    p.add_argument("--no-adaptive-head", dest="adaptive_head", action="store_false",
                   help="do not train the second, top-k-only head that recall_target searches "
                        "rank with (trained by default when --label-k > 1 and --top1-weight > 0)")
    p.add_argument("--min-queries", type=int, default=200,
                   help="refuse to train on fewer usable queries (at least 10): exit 1 for the "
                        "query log, 2 for a --queries file")
    p.add_argument("--epochs", type=int, default=100,
                   help="most training epochs; training stops earlier once the validation "
                        "score (--metric at --nprobe) stops improving")
    p.add_argument("--init", choices=["auto", "centroids", "random"], default="auto",
                   help="starting weights: 'centroids' = centroid routing, 'random' = small "
                        "random weights, 'auto' trains from both and keeps the better on the "
                        "validation split")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the query sample, the 64/16/20 train/validation/test split "
                        "and training")
    p.add_argument("--keep", type=int, default=5,
                   help="published versions to keep per collection (older ones are pruned; "
                        "rollback goes back one)")
    p.add_argument("--moments", choices=["auto", "off"], default="auto",
                   help="routers over the clusters' moments: 'auto' refreshes the moments (from "
                        "the labelling read-out, else the ones stored with the layout) and weighs "
                        "the moment router (its optimism tuned on the validation split) against a "
                        "router learned over the moments, the better of the two going through "
                        "the publish gate; 'off' trains only the linear router (W q + b, with its "
                        "adaptive head) and leaves the stored moments as they are")
    p.add_argument("--labels", choices=["auto", "milvus", "local"], default="auto",
                   help="where exact neighbours are computed: 'milvus' asks the server (exact "
                        "search over a cluster-id layout with a FLAT index; moves ids, not "
                        "vectors), 'local' streams every vector here (faster on one machine); "
                        "default auto: local until the vectors to stream pass 8 GiB, then "
                        "milvus where its search is exact")
    p.add_argument("--maintain", action="store_true",
                   help="first run the layout's upkeep (maintain-layout: rewrite the rows written "
                        "since the last one in cluster order); a failed upkeep is logged and the "
                        "retrain goes on")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate, publish nothing")
    p.add_argument("--report", metavar="DIR",
                   help="write a JSON and PNG report into this directory (default: none)")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON instead of a table")
    p.add_argument("--metrics-file", metavar="FILE.prom",
                   help="after every run, whatever its outcome, write its metrics here in the "
                        "Prometheus textfile-collector format (atomically; for node_exporter's "
                        "--collector.textfile.directory; docs/metrics.md lists them) "
                        "(default: none)")


#: What each row of the retrain table is (its routers, in the table's order).
TABLE_ROWS = {"centroid": "centroid routing",
              "learned": "the router trained now",
              "moments": "the moment router (no training, its optimism tuned)",
              "current": "the live one"}


def table_legend(table) -> str:
    """``'centroid' = centroid routing, 'learned' = ...`` for the routers ``table`` holds."""
    return ", ".join(f"'{name}' = {TABLE_ROWS.get(name, name)}" for name in table)


def summary_line(result) -> str:
    """The retrain's one-line outcome, naming the kind of router it published or weighed
    (``result.reason`` already does when the retrain names it)."""
    kind = result.training.get("router_kind")
    if not kind or kind in result.reason:
        return result.reason
    if result.decision == "published":
        return f"published a {kind} router: {result.reason}"
    return f"{kind} router: {result.reason}"


def run_retrain(args) -> int:
    from ..report import format_table, write_report
    from ..retrain import RetrainConfig, check_output_dir, retrain, validate_config
    cfg = RetrainConfig(collection=args.collection, model_dir=args.model_dir,
                        queries_file=args.queries, sample=args.sample, since_seconds=args.since,
                        nprobe=args.nprobe, min_gain=args.min_gain, metric=args.metric, k=args.k,
                        label_k=args.label_k, top1_weight=args.top1_weight,
                        adaptive_head=args.adaptive_head,
                        min_queries=args.min_queries, max_epochs=args.epochs,
                        init=args.init, seed=args.seed, dry_run=args.dry_run,
                        keep=args.keep, labels=args.labels, moments=args.moments)
    validate_config(cfg)            # bad options exit 2 before Milvus is even contacted
    if args.report:
        check_output_dir(args.report, "--report")
    if args.metrics_file:
        from ..jobmetrics import check_metrics_path
        check_metrics_path(args.metrics_file)
    args.retrain_phases = {}        # filled as phases end: a failed run reports them too
    with connected(args) as client:
        if args.maintain and not args.dry_run:
            maintain_before_retrain(client, args)
        result = retrain(client, cfg, seconds=args.retrain_phases)
    args.retrain_result = result    # for write_metrics_file, once the exit code is known
    if args.report:
        try:
            result.report_paths = write_report(result, args.report)
        except Exception as exc:   # after a publish, a failed report must not read as a failed run
            logging.getLogger("milvus-ltr-router").error("report not written to %s: %s: %s",
                                                         args.report, type(exc).__name__, exc)
    if args.json:
        print(result.to_json())
    else:
        n_test = result.training.get("n_test")
        print(f"routing quality on the held-out test split: {n_test} of the {result.n_queries} "
              f"queries (64/16/20 train/validation/test split); {table_legend(result.table)}")
        print(quality_legend(cfg.k))
        print(format_table(result.table, cfg.k))
        print(summary_line(result))
        for path in result.report_paths:
            print(f"report: {path}")
    return EXIT_OK


def maintain_before_retrain(client, args) -> None:
    """``--maintain``: the layout's upkeep before training (the retrain reads the rows'
    clusters, which upkeep keeps). Its failure is reported, never fatal: the layout serves
    as it did, and the next run finishes the upkeep."""
    from ..maintain import maintain_layout
    from .layout_cmds import print_maintain_report
    t0 = time.perf_counter()
    try:
        report = maintain_layout(client, args.collection)
    except Exception as exc:
        logging.getLogger("milvus-ltr-router").error("upkeep of %r failed, retraining anyway: "
                                                     "%s: %s", args.collection,
                                                     type(exc).__name__, exc)
        return
    finally:
        args.retrain_phases["maintain"] = time.perf_counter() - t0
    if not args.json:
        print_maintain_report(report)


def write_metrics_file(args, code: int, started: float) -> None:
    """``--metrics-file``: the run's metrics (:mod:`..jobmetrics`), on every outcome. A file
    that cannot be written is logged and leaves the exit code as it is (the metrics' last-run
    timestamp then goes stale, which is what an alert on it catches)."""
    path = getattr(args, "metrics_file", None)
    if not path:
        return
    import time
    from ..jobmetrics import RunRecord, write_retrain_metrics
    run = RunRecord(collection=args.collection, exit_code=code, started=started,
                    finished=time.time(), result=getattr(args, "retrain_result", None),
                    metric=getattr(args, "metric", "top1"),
                    phases=dict(getattr(args, "retrain_phases", None) or {}))
    try:
        write_retrain_metrics(path, run)
    except OSError as exc:
        logging.getLogger("milvus-ltr-router").error("metrics not written to %s: %s", path, exc)


RETRAIN = Command(
    "retrain", "the cron job (same as the retrain-router command)",
    "Retrain the collection's router from its query log (or a query file); publish it\n"
    "only if it beats the live router and centroid routing.",
    retrain_args, run_retrain, epilog=RETRAIN_EPILOG, after=write_metrics_file)


def retrain_parser() -> argparse.ArgumentParser:
    """The parser of ``retrain-router``, the cron job's own command."""
    parser = argparse.ArgumentParser(
        prog="retrain-router", formatter_class=HelpFormatter,
        description="Retrain a collection's router from its query log (or a query file); publish "
                    "it only if it beats\nthe live router and centroid routing. Meant for cron.",
        epilog=RETRAIN_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    retrain_args(parser)
    return parser
