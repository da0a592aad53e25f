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
import os
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


DEFAULT_URI = "./milvus_ltr.db"
DEFAULT_MODEL_DIR = "onnx_models"


def option_help(action: argparse.Action) -> str:
    """An option's help as ``--help`` shows it: ``(default: X)`` appended unless the text
    already says what the default is, or there is nothing to say (a flag, a required option).
    Options whose default is ``None`` must say in words what happens without them."""
    text = action.help or ""
    if (not action.option_strings or action.required or action.nargs == 0
            or action.default in (None, argparse.SUPPRESS) or "default" in text):
        return text
    return text + " (default: %(default)s)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (:func:`option_help`); descriptions and epilogs keep
    their line breaks (they hold examples)."""

    def _get_help_string(self, action):
        return option_help(action)


def iter_options(parser: argparse.ArgumentParser):
    """``(parser, action)`` for every option of ``parser`` and of its subcommands, ``-h``
    included (``parser.prog`` names the command, e.g. ``milvus-ltr-router status``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from iter_options(sub)
        elif action.option_strings:
            yield parser, action


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default=DEFAULT_URI,
                   help="Milvus server URI (http://host:19530) or the path of an existing "
                        "milvus-lite file (*.db); a .db path that does not exist is refused, "
                        "never created empty")
    p.add_argument("--token", default="",
                   help="Milvus token: user:password or an API key (default: none)")


def _model_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, metavar="DIR",
                   help="router registry: a collection's routers live in DIR/<collection>/ "
                        "(CURRENT.json names the live one); RoutedMilvusClient(model_dir=...) "
                        "must read the same directory")


def _retrain_args(p: argparse.ArgumentParser) -> None:
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    _model_dir_arg(p)
    p.add_argument("--queries", metavar="FILE.npy",
                   help="bootstrap from a .npy query matrix [n, dim] instead of the query log "
                        "(default: the query log)")
    p.add_argument("--sample", type=int, default=50_000, help="queries to sample")
    p.add_argument("--since", type=_parse_duration, metavar="DURATION",
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
    p.add_argument("--labels", choices=["auto", "milvus", "local"], default="auto",
                   help="where exact neighbours are computed: 'milvus' asks the server (exact "
                        "search over a cluster-id layout with a FLAT index; moves ids, not "
                        "vectors), 'local' streams every vector here (faster on one machine); "
                        "default auto: local until the vectors to stream pass 8 GiB, then "
                        "milvus where its search is exact")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate, publish nothing")
    p.add_argument("--report", metavar="DIR",
                   help="write a JSON and PNG report into this directory (default: none)")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON instead of a table")


MAIN_EPILOG = """\
typical use (README: "After the demo"); URI is http://host:19530 or an existing .db file:
  milvus-ltr-router demo             # ~1 min on milvus-lite, no server needed
  milvus-ltr-router build-layout --uri URI --source docs --target docs_ivf --alias docs_app
  # applications search docs_app through RoutedMilvusClient(URI, model_dir="onnx_models")
  retrain-router --uri URI --collection docs_ivf --since 7d       # nightly, from cron
  milvus-ltr-router status --uri URI --collection docs_ivf

'milvus-ltr-router COMMAND --help' shows a command's options and their defaults.
exit codes: 0 ok, 1 operational failure, 2 bad input, 3 retrain already running;
with any non-zero code nothing was published."""

RETRAIN_EPILOG = """\
example (cron, nightly):
  15 3 * * *  retrain-router --uri http://milvus:19530 --collection docs_ivf --since 7d \\
              --model-dir /srv/onnx_models --report /srv/onnx_models/reports

top-1 accuracy: share of held-out queries whose exact nearest neighbour lies in a probed
partition; recall@k: share of each query's exact top-k neighbours lying in probed partitions.
exit codes: 0 published / kept the current router / dry run, 1 operational failure, 2 bad
input, 3 another retrain of the collection is running; nothing is published unless 0."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milvus-ltr-router", formatter_class=HelpFormatter,
        description="Learned partition routing for Milvus (learning-to-rank IVF routing).",
        epilog=MAIN_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (before the command: milvus-ltr-router -v status ...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str = "",
                epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, formatter_class=HelpFormatter, epilog=epilog,
                              description=f"{summary}.\n\n{description}".rstrip())

    p = command("build-layout", "cluster a collection into a new collection stored by cluster",
                "SOURCE is read (never modified), clustered by k-means, and copied into the new\n"
                "collection TARGET in cluster order, with the centroids in TARGET__ltr_layout.\n"
                "Applications then search TARGET (or --alias) through RoutedMilvusClient.\n"
                "With a milvus-lite --uri, TARGET is written into the same (existing) .db file.\n\n"
                "example:\n  milvus-ltr-router build-layout --uri http://milvus:19530 "
                "--source docs --target docs_ivf --alias docs_app")
    _connection_args(p)
    p.add_argument("--source", required=True, help="collection to read (never modified)")
    p.add_argument("--target", required=True, help="new laid-out collection to write")
    p.add_argument("--storage", choices=["auto", "partition", "grouped", "single"], default="auto",
                   help="how clusters sit in Milvus: 'single' one collection + a cluster-id filter "
                        "(servers' default, fastest measured), 'grouped' G partitions + the filter, "
                        "'partition' one partition per cluster (milvus-lite's default)")
    p.add_argument("--groups", type=int,
                   help="partitions for --storage grouped (default ~cube root of L)")
    p.add_argument("--clustering-key", action="store_true",
                   help="Milvus >= 2.4.7 only: make the cluster-id field the clustering key and run "
                        "clustering compaction (segment pruning); refused on older servers")
    p.add_argument("--clusters", type=int, metavar="L",
                   help="number of clusters L (default round(sqrt(N)) for N rows)")
    p.add_argument("--algorithm", choices=["spherical", "kmeans"], default="spherical",
                   help="'spherical' k-means (unit-length centroids; suits inner product and "
                        "cosine) or standard 'kmeans'")
    p.add_argument("--metric", choices=["IP", "COSINE", "L2"],
                   help="search metric (default: the source index's, else IP)")
    p.add_argument("--field", help="vector field (default: the only float-vector field; "
                                   "needed when there are several)")
    p.add_argument("--sample-size", "--sample", dest="sample_size",
                   help="k-means sample: rows (50000), rows per cluster (256x) or 'all' "
                        "(default 256 per cluster, at most 131072 rows)")
    p.add_argument("--refine-passes", type=int, default=0,
                   help="Lloyd passes over the whole source after k-means on the sample "
                        "(streamed; each pass reads the source once)")
    p.add_argument("--max-cluster-ratio", type=float,
                   help="bound every cluster at this multiple of the mean size (e.g. 2.0): at "
                        "build time, and afterwards on RoutedMilvusClient inserts and upserts, "
                        "which send a row to its nearest cluster with room (router_status()"
                        "['balance']); default unbounded")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means sample and clustering")
    p.add_argument("--index-type", default="FLAT",
                   help="vector index of the laid-out collection (default FLAT: exact scans of the "
                        "probed clusters, and what --labels milvus needs)")
    p.add_argument("--index-params", default="{}",
                   help='index params as a JSON object, e.g. \'{"nlist": 16}\'')
    p.add_argument("--alias", help="point this alias at the new collection when done "
                                   "(default: no alias)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing TARGET (and its layout)")
    p.add_argument("--max-partitions", type=int,
                   help="the server's rootCoord.maxPartitionNum if raised above its default "
                        "1024 (--storage partition only; default 1024)")

    p = command("adopt-layout", "store centroids for a collection already partitioned by cluster",
                "For a collection whose partitions already are clusters: each non-empty partition's\n"
                "centroid (the mean of its vectors) is computed, streamed, and stored in\n"
                "COLLECTION__ltr_layout. No row moves.")
    _connection_args(p)
    p.add_argument("--collection", required=True,
                   help="partitioned collection (or an alias of one)")
    p.add_argument("--algorithm", choices=["spherical", "kmeans"], default="kmeans",
                   help="'spherical' normalises the centroids to unit length; 'kmeans' keeps "
                        "the partition means")
    p.add_argument("--metric", choices=["IP", "COSINE", "L2"],
                   help="search metric (default: the collection index's, else IP)")
    p.add_argument("--field", help="vector field (default: the only float-vector field; "
                                   "needed when there are several)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a layout the collection already has")

    p = command("repair-layout", "move rows written around the layout (into _default, in "
                "partition or grouped storage) into their clusters",
                "'status' warns when such rows exist; routed searches include them until moved.")
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")

    p = command("drop-layout", "drop a laid-out collection and its layout metadata",
                "Refused (exit 2) for a collection without a layout, so a source is never dropped.\n"
                "Published routers under --model-dir are left alone.")
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection to drop")

    p = command("status", "show a collection's layout, live router and query log",
                "Human-readable by default; --json for scripts. Names the URI and the model\n"
                "directory it looked in.")
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    _model_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")

    p = command("retrain", "the cron job (same as the retrain-router command)",
                "Retrain the collection's router from its query log (or a query file); publish it\n"
                "only if it beats the live router and centroid routing.", epilog=RETRAIN_EPILOG)
    _retrain_args(p)

    p = command("evaluate", "centroid vs published router on a query file",
                "Top-1 accuracy (share of queries whose exact nearest neighbour lies in a probed\n"
                "partition) and recall@k (share of each query's exact top-k there) against nprobe,\n"
                "for centroid routing and the published router, on queries you supply.")
    _connection_args(p)
    p.add_argument("--collection", required=True, help="laid-out collection (or an alias of one)")
    p.add_argument("--queries", required=True, metavar="FILE.npy",
                   help=".npy query matrix [n, dim]")
    _model_dir_arg(p)
    p.add_argument("--nprobe", type=int, nargs="*",
                   help="nprobe values (default 0.1%%..10%% of L)")
    p.add_argument("--k", type=int, default=10, help="k of recall@k: neighbours per query")
    p.add_argument("--json", metavar="FILE", help="also write the results here (default: none)")

    p = command("rollback", "point a collection back at its previous router",
                "Only the model directory is touched (no --uri): applications' clients pick the\n"
                "previous router up on their next reload.")
    p.add_argument("--collection", required=True, help="collection whose router to roll back")
    _model_dir_arg(p)

    p = command("demo", "end-to-end demo on milvus-lite with real MiniLM vectors",
                "Loads 20,000 WordNet glosses into a new milvus-lite file, builds a layout, logs\n"
                "3,000 real questions, runs retrain-router and compares centroid and learned\n"
                "routing on 1,000 held-out questions. About a minute; needs the [train] extra.")
    p.add_argument("--db", default="./demo_output/demo.db",
                   help="milvus-lite file to create (replaced if it exists)")
    p.add_argument("--out", default="./demo_output",
                   help="where routers, reports and plots go")
    p.add_argument("--clusters", type=int,
                   help="number of clusters (default round(sqrt(20000)) = 141)")
    p.add_argument("--nprobe", type=int, default=2,
                   help="partitions probed by the demo's fixed-nprobe searches")
    return parser


def retrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrain-router", formatter_class=HelpFormatter,
        description="Retrain a collection's router from its query log (or a query file); publish "
                    "it only if it beats\nthe live router and centroid routing. Meant for cron.",
        epilog=RETRAIN_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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


def check_uri(uri: str) -> None:
    """Refuse a milvus-lite ``--uri`` that does not name an existing database (exit 2).

    pymilvus opens any ``*.db`` path and creates an empty database where there is none, so a
    mistyped path would read as "unknown collection" and leave a stray database behind. No
    command creates a milvus-lite file (every one reads a collection that must already be in
    it; build-layout writes its target into the same, existing file; the demo makes its own
    with ``--db``). Server URIs (``http://``, ``https://``, ``tcp://``, ``unix:``) pass.
    """
    from .milvus_io import is_lite_uri
    if not is_lite_uri(uri):
        return
    hint = ("give --uri http://HOST:19530 for a Milvus server, or the path of an existing "
            "milvus-lite .db file")
    if uri == DEFAULT_URI:
        hint = f"--uri defaults to {DEFAULT_URI}; {hint}"
    if not uri.endswith(".db"):
        raise InputError(f"--uri {uri!r} is neither a server URI (http://, https://, tcp://, "
                         f"unix:) nor a milvus-lite file (*.db): {hint}")
    if not os.path.exists(uri):
        where = "" if os.path.isabs(uri) else f" ({os.path.abspath(uri)})"
        raise InputError(f"milvus-lite file {uri}{where} does not exist; refusing to create an "
                         f"empty database there: {hint}")


def _collections_hint(client) -> str:
    """``"; collections there: a, b"`` (layout and query-log tables left out), best effort."""
    try:
        names = sorted(n for n in client.list_collections() if "__ltr_" not in n)
    except Exception:  # noqa: BLE001 - only a hint on an error path
        return ""
    if not names:
        return "; it holds no collections"
    more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
    return "; collections there: " + ", ".join(names[:10]) + more


@contextlib.contextmanager
def _connected(args):
    """A client for ``--uri``/``--token``, closed (and a milvus-lite file released) afterwards.

    Errors about what Milvus holds name the URI: an unknown collection lists the collections
    that are there, and a layout error says which Milvus it came from.
    """
    from .layout import LayoutError
    from .milvus_io import CollectionError, open_client, release_lite
    client = open_client(args.uri, args.token)
    try:
        yield client
    except CollectionError as exc:
        if not str(exc).startswith("unknown collection") or args.uri in str(exc):
            raise
        raise CollectionError(f"{exc} at {args.uri}{_collections_hint(client)}") from exc
    except LayoutError as exc:
        if type(exc) is not LayoutError or args.uri in str(exc):
            raise
        raise LayoutError(f"Milvus at {args.uri}: {exc}") from exc
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
            raise InputError(f"{args.collection!r} at {args.uri} has no layout; refusing to drop "
                             f"it (drop-layout drops laid-out collections only, never a source)")
        drop_layout(client, args.collection)
    print(f"dropped {args.collection!r} and its layout")
    return EXIT_OK


ALGORITHMS = {"spherical": "spherical k-means", "kmeans": "standard k-means"}
STORAGE_MODES = {"partition": "one partition per cluster",
                 "grouped": "clusters grouped into partitions, plus a cluster-id filter",
                 "single": "one collection, plus a cluster-id filter"}


def _router_metrics_text(metrics: dict) -> str:
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
        ("model dir", f"{status['model_dir']} (looked in {status['router_dir']}"
                      + ("" if status.get("router_dir_exists", True) else ", which does not exist")
                      + ")"),
    ]
    if router.get("version") is None and router.get("error"):
        lines.append(("router", f"NOT USABLE ({router['error']}): searches route by centroids; "
                                "the next published router replaces the pointer"))
    elif router.get("version") is None:
        lines.append(("router", "none published: searches route by centroids"))
    else:
        state = "usable" if router.get("usable") else \
            f"NOT USABLE ({router.get('error')}): searches route by centroids"
        lines.append(("router", f"{router['version']}, published {router['published_at']}, {state}"))
        metrics = _router_metrics_text(router.get("metrics") or {})
        lines.append(("router metrics", f"{metrics} (retrain's held-out queries)" if metrics
                      else "none recorded (rolled back)"))
        if router.get("usable"):
            lines.append(("recall_target", f"calibrated {yes[router['recall_target_calibrated']]}, "
                                           f"stopping model {yes[router['stopping_model']]}, "
                                           f"adaptive head {yes[router['adaptive_head']]}"))
    lines.append(("versions kept", ", ".join(status["versions"]) or "none"))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)


def _cmd_status(args) -> int:
    from .clustering import size_summary
    from .layout import cluster_sizes, read_layout, stray_rows
    from .storage import storage_status
    from .querylog import log_size
    from .registry import ModelRegistry, RegistryError
    from .router import Router, RouterError
    with _connected(args) as client:
        lay = read_layout(client, args.collection)
        n_logged = log_size(client, lay.collection)
        live = cluster_sizes(client, lay)
        strays = stray_rows(client, lay)
    registry = ModelRegistry(args.model_dir)
    router_info: dict = {"version": None}
    try:
        current = registry.current(lay.collection)
    except RegistryError as exc:    # what clients then do: route by centroids (and say why)
        current = None
        router_info.update(usable=False, error=str(exc))
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
    status = {"collection": lay.collection, "uri": args.uri, "model_dir": str(args.model_dir),
              "router_dir": str(registry.collection_dir(lay.collection)),
              "router_dir_exists": registry.collection_dir(lay.collection).is_dir(),
              "layout_id": lay.layout_id, "partitions": lay.n_partitions,
              "rows": int(lay.sizes.sum()), "algorithm": lay.algorithm, "metric": lay.metric,
              "dim": lay.dim, "created_at": lay.created_at, "source": lay.source,
              "storage": storage_status(lay.storage), "rows_live": int(live.sum()),
              "cluster_sizes": size_summary(live), "rows_outside_layout": strays,
              "router": router_info, "logged_queries": n_logged,
              "versions": registry.versions(lay.collection)}
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
    return EXIT_OK


def _cmd_repair_layout(args) -> int:
    from .layout import move_stray_rows, read_layout
    with _connected(args) as client:
        lay = read_layout(client, args.collection)
        moved = move_stray_rows(client, lay)
    print(f"moved {moved} rows of {lay.collection!r} from _default into their clusters' partitions")
    return EXIT_OK


def quality_legend(k: int = 10) -> str:
    """What the quality tables' columns mean (printed above them by retrain, evaluate, demo)."""
    return (f"  top1 = top-1 accuracy: share of queries whose exact nearest neighbour lies in a "
            f"probed partition\n  R@{k} = recall@{k}: share of each query's exact {k} nearest "
            f"neighbours lying in the probed partitions\n  (the recall an exact search of those "
            f"partitions reaches); nprobe = partitions probed per query")


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
        except Exception as exc:   # after a publish, a failed report must not read as a failed run
            logging.getLogger("milvus-ltr-router").error("report not written to %s: %s: %s",
                                                         args.report, type(exc).__name__, exc)
    if args.json:
        print(result.to_json())
    else:
        n_test = result.training.get("n_test")
        print(f"routing quality on the held-out test split: {n_test} of the {result.n_queries} "
              f"queries (64/16/20 train/validation/test split); 'learned' = the new router, "
              f"'current' = the live one")
        print(quality_legend(cfg.k))
        print(format_table(result.table, cfg.k))
        print(result.reason)
        for path in result.report_paths:
            print(f"report: {path}")
    return EXIT_OK


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate_router, nprobe_grid
    from .layout import read_layout
    from .registry import ModelRegistry
    from .report import format_table, quality_json
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
    print(f"routing quality on {len(queries)} queries of {args.queries}, against their exact "
          f"neighbours in {lay.collection!r} at {args.uri} (model dir {args.model_dir}"
          f"{'' if current is not None else ': no router published, centroid routing only'}):")
    print(quality_legend(args.k))
    print(format_table(results, args.k))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(quality_json(results))
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
    """build-layout: refuse arguments that can never work (exit 2) before anything is read.

    ``count_source_rows()``, when given, returns ``(real source name, rows)``
    so that ``--clusters`` above the row count and a target that is the
    source under an alias are refused up front too.
    """
    from .clustering import resolve_sample_size
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
    from .errors import LtrRouterError, exit_code
    _setup_logging(args.verbose)
    log = logging.getLogger("milvus-ltr-router")
    try:
        if getattr(args, "uri", None) is not None:
            check_uri(args.uri)
        preflight = PREFLIGHT.get(getattr(args, "command", None))
        if preflight is not None:
            preflight(args)
        return handler(args)
    except (LtrRouterError, MilvusException, OSError, ValueError) as exc:
        log.error("%s", error_message(exc, args))
        return exit_code(exc)


def error_message(exc: BaseException, args) -> str:
    """The one-line message ``_run`` logs: :func:`.errors.describe` (which names the URI for
    Milvus errors), plus the model directory for router and registry errors and the URI for
    a query log too small to train on (an unknown collection or a layout error already names
    it: see ``_connected``)."""
    from .errors import describe
    from .registry import RegistryError
    from .router import RouterError
    uri, model_dir = getattr(args, "uri", None), getattr(args, "model_dir", None)
    message = describe(exc, uri)
    if isinstance(exc, (RegistryError, RouterError)) and model_dir is not None \
            and str(model_dir) not in message:
        message += f" (model dir {model_dir})"
    elif " the query log of " in message and uri is not None and uri not in message:
        message += f" (Milvus at {uri})"
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(COMMANDS[args.command], args)


def retrain_main(argv: list[str] | None = None) -> int:
    args = retrain_parser().parse_args(argv)
    return _run(_cmd_retrain, args)


if __name__ == "__main__":
    sys.exit(main())
