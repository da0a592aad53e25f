"""The layout commands: ``build-layout``, ``adopt-layout``, ``repair-layout``, ``drop-layout``."""
from __future__ import annotations

import argparse
import json
from typing import Callable

from ..errors import EXIT_OK, InputError
from .common import Command, connected, connection_args


# --------------------------------------------------------------------------- build-layout
def build_layout_args(p: argparse.ArgumentParser) -> None:
    connection_args(p)
    p.add_argument("--source", required=True, help="collection to read (never modified)")
    p.add_argument("--target", required=True, help="new laid-out collection to write")
    p.add_argument("--storage", choices=["auto", "partition", "grouped", "single"], default="auto",
                   help="how clusters sit in Milvus: 'single' one collection + a cluster-id filter "
                        "(servers' default, fastest measured), 'grouped' G partitions + the filter, "
                        "'partition' one partition per cluster (milvus-lite's default)")
    p.add_argument("--groups", type=int,
                   help="partitions for --storage grouped (default ~cube root of L; with --storage "
                        "auto and a query log: the only G tried)")
    p.add_argument("--no-query-log", dest="query_log", action="store_false",
                   help="decide storage without the query log. By default, when the collection "
                        "applications search (--alias, else --target) has a query log of at "
                        "least 100 queries, up to --log-sample of them are routed over the new "
                        "clusters: 'grouped' then groups clusters probed together, and 'auto' "
                        "picks 'single' or 'grouped' by the cost model")
    p.add_argument("--log-sample", type=int, default=5000,
                   help="logged queries to decide storage from (default 5000)")
    p.add_argument("--probe-nprobe", type=int, default=16,
                   help="clusters each logged query is taken to probe (default 16)")
    p.add_argument("--cost-model", metavar="FILE",
                   help="JSON of the server's cost model (benchmarks/bench_costs.py output) for "
                        "--storage auto; default: the packaged one")
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
                        "probed clusters, and what --labels milvus needs). On an IVF index routed "
                        "searches visit every list (nprobe = nlist) unless they set nprobe")
    p.add_argument("--index-params", default="{}",
                   help='index params as a JSON object, e.g. \'{"nlist": 16}\'')
    p.add_argument("--alias", help="point this alias at the new collection when done "
                                   "(default: no alias)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing TARGET (and its layout) without a gap: the new layout "
                        "is built under another name, verified, caught up with writes made "
                        "meanwhile and then switched to (aliases on TARGET follow)")
    p.add_argument("--keep-clusters", action="store_true",
                   help="when replacing a layout in use: keep its clusters (same centroids, so its "
                        "published router keeps serving; with --overwrite under the same name) and "
                        "only rewrite the rows in cluster order")
    p.add_argument("--from-source", action="store_true",
                   help="when replacing a layout in use (--overwrite, or --alias naming one), "
                        "read SOURCE instead of that layout (default: the layout in use, which "
                        "holds what applications wrote through the routed client)")
    p.add_argument("--max-partitions", type=int,
                   help="the server's rootCoord.maxPartitionNum if raised above its default "
                        "1024 (--storage partition only; default 1024)")


def check_build_layout_args(args, count_source_rows=None) -> None:
    """build-layout: refuse arguments that can never work (exit 2) before anything is read.

    ``count_source_rows()``, when given, returns ``(real source name, rows)``
    so that ``--clusters`` above the row count and a target that is the
    source under an alias are refused up front too.
    """
    from ..clustering import resolve_sample_size
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
    if args.log_sample < 1:
        raise InputError(f"--log-sample must be >= 1, got {args.log_sample}")
    if args.probe_nprobe < 1:
        raise InputError(f"--probe-nprobe must be >= 1, got {args.probe_nprobe}")
    if args.cost_model is not None:
        from ..costs import resolve_cost_model
        resolve_cost_model(args.cost_model)         # InputError naming the file
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


def preflight_build_layout(args) -> None:
    check_build_layout_args(args)
    if args.clusters is None:       # the default, round(sqrt(N)), always fits
        return
    from ..milvus_io import count_rows
    from ..schema import describe

    def count_source_rows():
        with connected(args) as client:
            info = describe(client, args.source, args.field)
            client.load_collection(info.name)
            return info.name, count_rows(client, info.name)

    check_build_layout_args(args, count_source_rows)


def run_build_layout(args) -> int:
    from ..build import build_layout
    index = {"index_type": args.index_type, "params": json.loads(args.index_params)}
    with connected(args) as client:
        clusters_from = None
        if args.keep_clusters:
            from ..layout import read_layout
            from ..rebuild import live_collection
            live = live_collection(client, args.target, args.alias, args.overwrite)
            if live is None:
                raise InputError("--keep-clusters needs a layout in use to keep: --overwrite of a "
                                 "laid-out --target, or an --alias naming one")
            clusters_from = read_layout(client, live)
        from ..build import decides_from_traffic
        from ..milvus_io import is_milvus_lite
        queries = None
        if args.query_log and decides_from_traffic(args.storage, is_milvus_lite(client)):
            queries = _logged_queries(client, args)
        report = build_layout(client, args.source, args.target, n_clusters=args.clusters,
                              algorithm=args.algorithm, sample_size=args.sample_size, seed=args.seed,
                              metric=args.metric, vector_field=args.field, index=index,
                              alias=args.alias, overwrite=args.overwrite,
                              max_partitions=args.max_partitions, storage=args.storage,
                              groups=args.groups, clustering_key=args.clustering_key,
                              refine_passes=args.refine_passes,
                              max_cluster_ratio=args.max_cluster_ratio,
                              from_source=args.from_source, clusters_from=clusters_from,
                              queries=queries, probe_nprobe=args.probe_nprobe,
                              cost_model=args.cost_model)
    lay = report.layout
    read = (report.switch or {}).get("live") or args.source
    print(f"layout {lay.layout_id}: {report.rows} rows of {read!r} -> {lay.n_clusters} "
          f"clusters of {lay.collection!r} ({lay.algorithm}, {lay.metric}); storage "
          f"{lay.storage.mode} ({lay.storage.n_groups} partition(s)); "
          f"{len(report.empty_partitions)} empty clusters")
    if report.storage_choice is not None:
        print(report.storage_choice.summary())
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    sw = report.switch
    if sw:
        print(f"replaced {sw.get('live') or args.target!r} (read from it, built as "
              f"{sw['built_as']!r}): {sw.get('copied', 0)} rows caught up, {sw.get('deleted', 0)} "
              f"deleted; aliases moved: {', '.join(sw['aliases_moved']) or 'none'}; old "
              f"collection {sw['replaced'] or 'kept'}")
    return EXIT_OK


MIN_LOGGED_QUERIES = 100


def _logged_queries(client, args):
    """Up to ``--log-sample`` logged queries of the collection applications search (the
    alias, else the target), or None when its log holds fewer than :data:`MIN_LOGGED_QUERIES`."""
    from ..querylog import log_collection_name, log_size, sample_queries
    for name in (args.alias, args.target):
        if name and client.has_collection(log_collection_name(name)):
            if log_size(client, name) < MIN_LOGGED_QUERIES:
                return None
            return sample_queries(client, name, args.log_sample)
    return None


BUILD_LAYOUT = Command(
    "build-layout", "cluster a collection into a new collection stored by cluster",
    "SOURCE is read (never modified), clustered by k-means, and copied into the new\n"
    "collection TARGET in cluster order, with the centroids in TARGET__ltr_layout.\n"
    "Applications then search TARGET (or --alias) through RoutedMilvusClient.\n"
    "With a milvus-lite --uri, TARGET is written into the same (existing) .db file.\n\n"
    "example:\n  milvus-ltr-router build-layout --uri http://milvus:19530 "
    "--source docs --target docs_ivf --alias docs_app",
    build_layout_args, run_build_layout, preflight_build_layout)


# --------------------------------------------------------------------------- adopt-layout
def adopt_layout_args(p: argparse.ArgumentParser) -> None:
    connection_args(p)
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


def run_adopt_layout(args) -> int:
    from ..repair import adopt_layout
    with connected(args) as client:
        lay = adopt_layout(client, args.collection, algorithm=args.algorithm, metric=args.metric,
                           vector_field=args.field, overwrite=args.overwrite)
    print(f"adopted {lay.n_partitions} partitions of {lay.collection!r} as layout {lay.layout_id}")
    return EXIT_OK


ADOPT_LAYOUT = Command(
    "adopt-layout", "store centroids for a collection already partitioned by cluster",
    "For a collection whose partitions already are clusters: each non-empty partition's\n"
    "centroid (the mean of its vectors) is computed, streamed, and stored in\n"
    "COLLECTION__ltr_layout. No row moves.",
    adopt_layout_args, run_adopt_layout)


# --------------------------------------------------------------------------- repair / drop
def collection_args(help_text: str) -> Callable[[argparse.ArgumentParser], None]:
    """``--uri``, ``--token`` and a required ``--collection`` with ``help_text``."""
    def add(p: argparse.ArgumentParser) -> None:
        connection_args(p)
        p.add_argument("--collection", required=True, help=help_text)
    return add


def run_repair_layout(args) -> int:
    from ..layout import read_layout
    from ..repair import move_stray_rows
    with connected(args) as client:
        lay = read_layout(client, args.collection)
        moved = move_stray_rows(client, lay)
    print(f"moved {moved} rows of {lay.collection!r} from _default into their clusters' partitions")
    return EXIT_OK


REPAIR_LAYOUT = Command(
    "repair-layout", "move rows written around the layout (into _default, in "
    "partition or grouped storage) into their clusters",
    "'status' warns when such rows exist; routed searches include them until moved.",
    collection_args("laid-out collection (or an alias of one)"), run_repair_layout)


def run_drop_layout(args) -> int:
    from ..layout import drop_layout, has_layout
    with connected(args) as client:
        if not has_layout(client, args.collection):
            raise InputError(f"{args.collection!r} at {args.uri} has no layout; refusing to drop "
                             f"it (drop-layout drops laid-out collections only, never a source)")
        drop_layout(client, args.collection)
    print(f"dropped {args.collection!r} and its layout")
    return EXIT_OK


DROP_LAYOUT = Command(
    "drop-layout", "drop a laid-out collection and its layout metadata",
    "Refused (exit 2) for a collection without a layout, so a source is never dropped.\n"
    "Published routers under --model-dir are left alone.",
    collection_args("laid-out collection to drop"), run_drop_layout)


# --------------------------------------------------------------------------- maintain-layout
def maintain_layout_args(p: argparse.ArgumentParser) -> None:
    collection_args("laid-out collection (or an alias of one)")(p)
    p.add_argument("--chunk-rows", type=int, default=8192,
                   help="rows rewritten under one short freeze of routed writers (fewer for wide "
                        "vectors)")
    p.add_argument("--min-share", type=float, default=0.0,
                   help="do nothing unless the rows written since the last upkeep are at least "
                        "this share of the collection (e.g. 0.05)")
    p.add_argument("--lease", type=float, default=60.0,
                   help="seconds one freeze may last at most: a freeze left by a killed upkeep "
                        "lets routed writers through again after this long")
    p.add_argument("--dry-run", action="store_true", help="say what would be rewritten, write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def check_maintain_args(args) -> None:
    if args.chunk_rows < 1:
        raise InputError(f"--chunk-rows must be positive, got {args.chunk_rows}")
    if not 0.0 <= args.min_share <= 1.0:
        raise InputError(f"--min-share must lie in [0, 1], got {args.min_share}")
    if not args.lease > 0:
        raise InputError(f"--lease must be positive, got {args.lease}")


def run_maintain_layout(args) -> int:
    from ..maintain import maintain_layout
    with connected(args) as client:
        report = maintain_layout(client, args.collection, chunk_rows=args.chunk_rows,
                                 min_share=args.min_share, lease=args.lease,
                                 dry_run=args.dry_run)
    print_maintain_report(report, args.json)
    return EXIT_OK


def print_maintain_report(report, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=float))
        return
    secs = report.seconds.get("total", 0.0)
    if report.skipped:
        print(f"{report.collection!r}: nothing rewritten ({report.skipped}; {report.logged} "
              f"logged writes, {secs:.1f} s)")
        return
    print(f"{report.collection!r}: {report.rewritten} rows written since the last upkeep "
          f"rewritten in cluster order in {report.chunks} chunks, {secs:.1f} s "
          f"({report.missing} deleted since, {report.outside} outside the layout); routed "
          f"writers waited {report.frozen_seconds:.2f} s in all, {report.longest_freeze:.2f} s "
          f"at most")


MAINTAIN_LAYOUT = Command(
    "maintain-layout", "rewrite the rows written since the last upkeep in cluster order, "
    "in place",
    "Routed writes land in arrival order, which slows searches at a fixed recall as they\n"
    "accumulate (README 'When to rebuild'). This rewrites only the rows routed clients wrote\n"
    "since the last upkeep (their keys are in COLLECTION__ltr_writes), each chunk under a\n"
    "short freeze of routed writers; searches go on, clusters and routers stay. A killed run\n"
    "is finished by the next one. Run it from cron, e.g. nightly before retrain-router\n"
    "(or retrain-router --maintain).\n\n"
    "example (cron, nightly):\n  0 3 * * *  milvus-ltr-router maintain-layout --uri "
    "http://milvus:19530 --collection docs_ivf --min-share 0.05",
    maintain_layout_args, run_maintain_layout, check_maintain_args)
