"""The retrain job: read layout, sample queries, label, train, evaluate, publish if better.

Meant for cron. Every failure happens before the publish step, which is one
atomic pointer swap, so a failed or interrupted run never replaces a working
router. The new model is evaluated through onnxruntime from an exported ONNX
file with the weights that would be published, not from torch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pymilvus import MilvusClient

from .errors import InputError, OperationalError
from .evaluate import RoutingQuality, evaluate_adaptive, evaluate_router, nprobe_grid
from .labels import Neighbours, clean_queries, exact_knn
from .layout import Layout, read_layout, write_moments
from .moments import MomentAccumulator
from .progress import ProgressCounter
from .querylog import sample_queries
from .readout import iter_layout_blocks, read_moments
from .registry import ModelRegistry
from .repair import stray_rows
from .server_knn import LABEL_PATHS, choose_label_path, milvus_knn
from .router import CentroidRouter, Router, RouterError

log = logging.getLogger(__name__)

ADAPTIVE_TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95)
CALIBRATION_TOLERANCE = 0.02   # held-out recall may fall this far below a recall_target
MIN_QUERIES = 10               # fewer cannot fill the train / validation / test splits
GAIN_ROUNDING = 1e-9           # accuracies are fractions: 0.7 - 0.6 must count as 0.1


class RetrainError(OperationalError):
    """A retrain that cannot proceed; nothing was published. Exit code 1."""


class RetrainInputError(InputError, RetrainError):
    """A retrain refused for bad arguments or input; nothing was read or published. Exit code 2."""


class QueryInputError(RetrainInputError):
    """A query file that is missing, unreadable, of the wrong shape or without usable rows."""


@dataclass
class RetrainConfig:
    collection: str
    model_dir: str = "onnx_models"
    queries_file: str | None = None      # bootstrap from a .npy instead of the query log
    sample: int = 50_000
    since_seconds: float | None = None
    nprobe: int = 8
    min_gain: float = 0.0
    metric: str = "top1"                 # top1 or recall: which number decides publishing
    k: int = 10
    label_k: int = 10                    # train on the top-k neighbours' partitions (1 = the paper)
    top1_weight: float = 0.5             # with label_k > 1: weight of the top-1 term in the loss
    adaptive_head: bool = True           # with a top-1 term: a second, top-k-only head for recall_target
    min_queries: int = 200
    max_epochs: int = 100
    patience: int = 10
    init: str = "auto"
    seed: int = 0
    dry_run: bool = False
    keep: int = 5
    batch_size: int = 4096
    labels: str = "auto"                 # exact neighbours from: milvus (server search), local, auto
    moments: str = "auto"                # moment routers: auto (stored or from the read-out), off


@dataclass
class RetrainResult:
    decision: str                        # published | kept | dry-run
    reason: str
    collection: str
    layout_id: str
    n_queries: int
    nprobe: int
    version: str | None = None
    baseline: str = "centroid"
    gain: float = 0.0
    table: dict = field(default_factory=dict)      # router -> list of RoutingQuality dicts
    adaptive: list = field(default_factory=list)   # new router, recall_target -> held-out quality
    calibration_misses: list = field(default_factory=list)   # (target, held-out recall) below target
    training: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    report_paths: list = field(default_factory=list)   # filled by whoever writes a report (.report)
    rows_outside_layout: int = 0         # rows written around the layout: searched, not labelled

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


# ----------------------------------------------------------------------------- argument checks
def _check_int(value, flag: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise RetrainInputError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def check_output_dir(path, flag: str) -> Path:
    """``path`` as a directory this run can create or write into, checked before any work.

    A path that is (or runs through) a file is a bad argument (exit 2); a
    directory without write permission is an operational failure (exit 1).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RetrainInputError(f"{flag} {path} is a file, not a directory; give a directory "
                                "(it is created if missing)")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RetrainInputError(f"{flag} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RetrainError(f"{flag} {path}: no permission to write in {existing}")
    return p


def validate_config(cfg: RetrainConfig) -> None:
    """Refuse out-of-range options before anything is read, labelled or published.

    The upper bound of ``nprobe`` needs the layout: see :func:`check_nprobe`.
    Raises :class:`RetrainInputError` naming the command-line option.
    """
    _check_int(cfg.sample, "--sample", 1)
    _check_int(cfg.nprobe, "--nprobe", 1)
    _check_int(cfg.k, "--k", 1)
    _check_int(cfg.label_k, "--label-k", 1)
    _check_int(cfg.min_queries, "--min-queries", MIN_QUERIES)
    _check_int(cfg.max_epochs, "--epochs", 1)
    _check_int(cfg.patience, "patience", 1)
    _check_int(cfg.keep, "--keep", 1)
    _check_int(cfg.batch_size, "batch_size", 1)
    if cfg.metric not in ("top1", "recall"):
        raise RetrainInputError(f"--metric must be top1 or recall, got {cfg.metric!r}")
    if cfg.moments not in ("auto", "off"):
        raise RetrainInputError(f"--moments must be auto or off, got {cfg.moments!r}")
    if cfg.labels not in LABEL_PATHS:
        raise RetrainInputError(f"--labels must be one of {', '.join(LABEL_PATHS)}, got {cfg.labels!r}")
    if cfg.init not in ("auto", "centroids", "random"):
        raise RetrainInputError(f"--init must be auto, centroids or random, got {cfg.init!r}")
    if not 0.0 <= cfg.top1_weight <= 1.0:      # NaN fails this too
        raise RetrainInputError(f"--top1-weight must be in [0, 1], got {cfg.top1_weight}")
    if not math.isfinite(cfg.min_gain):
        raise RetrainInputError(f"--min-gain must be a finite number, got {cfg.min_gain}")
    if cfg.since_seconds is not None and not cfg.since_seconds > 0:
        raise RetrainInputError(f"--since must be a positive duration, got {cfg.since_seconds} s")
    if cfg.queries_file is not None and not Path(cfg.queries_file).is_file():
        raise QueryInputError(f"query file not found: {cfg.queries_file}")
    check_output_dir(cfg.model_dir, "--model-dir")


def check_nprobe(nprobe: int, layout: Layout) -> None:
    """``nprobe`` within the layout's partitions (checked once the layout is read)."""
    if not 1 <= nprobe <= layout.n_partitions:
        raise RetrainInputError(f"--nprobe {nprobe} out of range [1, {layout.n_partitions}]: "
                                f"layout {layout.layout_id} of {layout.collection!r} has "
                                f"{layout.n_partitions} clusters")


# ----------------------------------------------------------------------------- queries
def load_query_file(path: str, dim: int) -> np.ndarray:
    """Queries from a ``.npy`` file, checked against the layout's dimension; NaN/inf and
    all-zero or constant rows dropped. Raises :class:`QueryInputError` when none is usable."""
    p = Path(path)
    if not p.is_file():
        raise QueryInputError(f"query file not found: {path}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise QueryInputError(f"query file {path} is not a readable .npy array: {exc}") from exc
    try:
        queries = clean_queries(arr, dim, name=f"query file {path}")
    except ValueError as exc:
        raise QueryInputError(str(exc)) from exc
    if len(queries) == 0:
        raise QueryInputError(f"query file {path} has no usable query vectors: all {len(arr)} "
                              "rows hold NaN/inf or are all-zero or constant")
    return queries


def require_queries(n: int, cfg: RetrainConfig, collection: str, what: str = "queries") -> None:
    """Refuse to train on fewer than ``cfg.min_queries``: bad input (exit 2) for a query
    file, an operational failure (exit 1) for the query log."""
    if n >= cfg.min_queries:
        return
    if cfg.queries_file:
        raise QueryInputError(f"only {n} {what} in query file {cfg.queries_file}; need at least "
                              f"{cfg.min_queries} (--min-queries) to train and evaluate fairly")
    raise RetrainError(f"only {n} {what} in the query log of {collection!r}; need at least "
                       f"{cfg.min_queries} (--min-queries) to train and evaluate fairly")


def gather_queries(client: MilvusClient, layout: Layout, cfg: RetrainConfig) -> np.ndarray:
    if cfg.queries_file:
        queries = load_query_file(cfg.queries_file, layout.dim)
        if len(queries) > cfg.sample:
            pick = np.random.default_rng(cfg.seed).choice(len(queries), cfg.sample, replace=False)
            queries = queries[np.sort(pick)]
    else:
        queries = sample_queries(client, layout.collection, cfg.sample, cfg.since_seconds, cfg.seed)
        if len(queries):
            queries = clean_queries(queries, layout.dim, name="query log")
    require_queries(len(queries), cfg, layout.collection)
    return queries


def label_queries(client: MilvusClient, layout: Layout, queries: np.ndarray, k: int,
                  batch_size: int = 4096, path: str = "local",
                  moments: MomentAccumulator | None = None) -> Neighbours:
    """Exact top-k neighbours over the whole laid-out collection: computed by Milvus
    (``path="milvus"``, see :mod:`.server_knn`) or here, from vectors streamed out of it
    (each block also fed to ``moments``, when given)."""
    if path == "milvus":
        with ProgressCounter(len(queries), "label (Milvus search)", "queries") as bar:
            return milvus_knn(client, layout, queries, k, progress=bar)
    with ProgressCounter(int(layout.sizes.sum()), "label", "rows") as bar:
        blocks = iter_layout_blocks(client, layout, batch_size, bar)
        return exact_knn(queries, blocks if moments is None else moments.feed(blocks), k=k,
                         metric=layout.metric)



def drop_tied(queries: np.ndarray, neighbours: Neighbours) -> tuple[np.ndarray, Neighbours]:
    """Drop queries whose exact top-1 score is tied by a row of another partition: their
    label is an arbitrary tie-break that a router could learn and then score as hits."""
    tied = neighbours.top1_tied
    if tied is None or not tied.any():
        return queries, neighbours
    log.warning("dropped %d of %d queries whose exact top-1 score is tied by a row of another "
                "partition (their routing label would be an arbitrary tie-break)",
                int(tied.sum()), len(tied))
    keep = ~tied
    return queries[keep], neighbours.subset(keep)


# ----------------------------------------------------------------------------- the decision
def calibration_misses(adaptive: list[dict], tolerance: float = CALIBRATION_TOLERANCE
                       ) -> list[tuple[float, float]]:
    """``(recall_target, held-out recall)`` for every target that adaptive nprobe missed by
    more than ``tolerance`` on held-out queries (rows as in :attr:`RetrainResult.adaptive`)."""
    return [(row["recall_target"], row["recall"]) for row in adaptive
            if row["recall"] < row["recall_target"] - tolerance]


@dataclass(frozen=True)
class Decision:
    action: str                # published | kept | dry-run
    baseline: str              # centroid | current: the better of the routers being served
    gain: float                # new minus baseline, on the deciding metric
    reason: str
    with_calibration: bool     # publish the recall_target calibration with the router


def _score(q: RoutingQuality, metric: str) -> float:
    return q.top1_accuracy if metric == "top1" else q.recall


def decide(new_metrics: RoutingQuality, live_metrics: RoutingQuality | None,
           centroid_metrics: RoutingQuality, min_gain: float, *, metric: str = "top1",
           calibration_ok: bool = True, live_calibrated: bool = False,
           dry_run: bool = False) -> Decision:
    """Publish or keep, from held-out quality at the deciding nprobe. Pure.

    The baseline is the better of centroid routing and the live router (when
    there is one). The new router is published iff ``new - baseline >=
    min_gain`` (so a negative ``min_gain`` accepts a slightly worse router).
    When its recall calibration missed a target on held-out queries
    (``calibration_ok`` false) it is published without the calibration
    (``recall_target`` searches then run at the default nprobe) - unless the
    live router has a calibration, which would be lost: then it is kept. A
    dry run says what would have happened and publishes nothing.
    """
    if metric not in ("top1", "recall"):
        raise ValueError(f"metric must be top1 or recall, got {metric!r}")
    label = f"{metric}@nprobe={new_metrics.nprobe}"
    new = _score(new_metrics, metric)
    baseline, base = "centroid", _score(centroid_metrics, metric)
    if live_metrics is not None and _score(live_metrics, metric) > base:
        baseline, base = "current", _score(live_metrics, metric)
    gain = new - base
    versus = (f"new {label} {new:.4f} vs {baseline} {base:.4f} (gain {gain:+.4f}, "
              f"--min-gain {min_gain:+.4f})")
    if gain < min_gain - GAIN_ROUNDING:
        action, reason, with_calibration = "kept", f"kept current router: {versus}", False
    elif not calibration_ok and live_calibrated:
        action, with_calibration = "kept", False
        reason = (f"kept current router: {versus}, but the new router's recall_target "
                  "calibration missed its targets on held-out queries and publishing it without "
                  "one would take recall_target away from the live router")
    else:
        action, with_calibration = "published", calibration_ok
        reason = versus if calibration_ok else (
            f"{versus}; published without its recall_target calibration, which missed its "
            "targets on held-out queries (recall_target searches use the default nprobe)")
    if dry_run:
        would = "would publish" if action == "published" else "would keep the current router"
        return Decision("dry-run", baseline, gain, f"dry run ({would}): {versus}", with_calibration)
    return Decision(action, baseline, gain, reason, with_calibration)


# ----------------------------------------------------------------------------- the job
def publish(registry: ModelRegistry, collection: str, path: Path, version: str, metrics: dict) -> None:
    """``registry.publish``; a failure after the pointer already names ``version`` (pruning
    old versions) is logged, not raised, so that exit code 1 keeps meaning "not published"."""
    try:
        registry.publish(collection, path, version, metrics)
    except (OSError, OperationalError) as exc:
        try:
            live = registry.current(collection)
        except Exception:
            live = None
        if live is None or live.version != version:
            raise
        log.error("router %s of %r is published, but the registry failed afterwards: %s",
                  version, collection, exc)


def retrain(client: MilvusClient, cfg: RetrainConfig, *,
            seconds: dict[str, float] | None = None) -> RetrainResult:
    """Run the whole job once; see the module docstring.

    Raises :class:`RetrainInputError` (bad options or input, exit 2) before any
    work, :class:`RetrainError` or another operational error (exit 1), or
    :class:`~.registry.LockedError` (exit 3); nothing is published then. ``seconds``
    (optional) is filled with each phase's wall time as it ends: a caller sees the phases
    that ran before a failure too.
    """
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise RetrainError(f"retraining needs the [train] extra ({exc.name} is missing): "
                           "pip install 'milvus-ltr-router[train]'") from exc
    validate_config(cfg)
    from .candidates import learned_candidate, moment_candidate
    from .train import split_indices

    registry = ModelRegistry(cfg.model_dir, keep=cfg.keep)
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    layout = read_layout(client, cfg.collection)
    check_nprobe(cfg.nprobe, layout)
    strays = stray_rows(client, layout)
    if strays:
        log.warning("%d rows of %r sit outside the layout's partitions (written around it, e.g. "
                    "by a plain MilvusClient): searches include them, but labelling reads the "
                    "layout's clusters only; move them with 'milvus-ltr-router repair-layout "
                    "--collection %s'", strays, layout.collection, layout.collection)
    with registry.lock(layout.collection):
        queries = gather_queries(client, layout, cfg)
        seconds["queries"] = time.perf_counter() - t0
        log.info("layout %s: %d partitions; %d queries", layout.layout_id, layout.n_partitions,
                 len(queries))

        t0 = time.perf_counter()
        label_path = choose_label_path(cfg.labels, client, layout, len(queries))
        log.info("labelling %d queries: exact neighbours computed %s", len(queries),
                 "by Milvus" if label_path == "milvus" else "here, from vectors streamed out of Milvus")
        # moments are refreshed from the rows a local labelling reads anyway; Milvus labels
        # read no rows, so they use the stored moments (one read-out if there are none)
        acc = MomentAccumulator.for_centroids(layout.centroids) \
            if cfg.moments != "off" and label_path == "local" else None
        neighbours = label_queries(client, layout, queries, max(cfg.k, cfg.label_k), cfg.batch_size,
                                   label_path, acc)
        seconds["label"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        moments = None if cfg.moments == "off" else acc.result() if acc is not None else \
            getattr(layout, "moments", None) or read_moments(client, layout, cfg.batch_size)
        if moments is not None and moments is not layout.moments:     # refreshed: stored with
            write_moments(client, layout, moments, strict=False)      # the layout (else a warning)
        seconds["moments"] = time.perf_counter() - t0
        if (neighbours.partitions[:, 0] < 0).any():
            raise RetrainError("some queries got no neighbour: is the collection empty?")
        queries, neighbours = drop_tied(queries, neighbours)
        require_queries(len(queries), cfg, layout.collection,
                        "queries with an untied exact top-1 neighbour")
        labels = neighbours.partitions[:, :cfg.label_k] if cfg.label_k > 1 else neighbours.labels
        tr, va, te = split_indices(len(queries), cfg.seed)
        val_q, val_parts = queries[va], neighbours.partitions[va, :cfg.k]

        version = registry.new_version()
        final_path = registry.version_path(layout.collection, version)
        tmp_paths = {name: final_path.with_name(f".candidate-{version}-{name}.onnx")
                     for name in ("learned", "moments")}
        try:
            t0 = time.perf_counter()
            candidates = {"learned": learned_candidate(layout, moments, queries, labels, tr, va,
                                                       val_parts, cfg, tmp_paths["learned"])}
            seconds["train"] = time.perf_counter() - t0
            if moments is not None:
                t0 = time.perf_counter()
                candidates["moments"] = moment_candidate(layout, moments, val_q, val_parts, cfg,
                                                         tmp_paths["moments"])
                seconds["tune_moments"] = time.perf_counter() - t0
            result = _evaluate_and_decide(registry, layout, cfg, candidates, queries, neighbours,
                                          (tr, va, te), strays, version, final_path, seconds)
        finally:
            for path in tmp_paths.values():
                path.unlink(missing_ok=True)
    log.info(result.reason)
    return result



def pick_candidate(at: dict[str, RoutingQuality], metric: str) -> str:
    """The new router to weigh against the served ones: the best of ``at`` (candidate name ->
    held-out quality at the deciding nprobe) on ``metric``; ties go to the first named
    (the trained router, then the moment router). Pure."""
    names = list(at)
    return max(names, key=lambda n: (_score(at[n], metric), -names.index(n)))


def _evaluate_and_decide(registry, layout, cfg, candidates, queries, neighbours, splits,
                         strays, version, final_path, seconds) -> RetrainResult:
    """Held-out tables of every router, the gate, and the publish of the winner."""
    t0 = time.perf_counter()
    tr, va, te = splits
    routers = {"centroid": CentroidRouter(layout),
               **{name: c.router for name, c in candidates.items()}}
    try:
        current = registry.current(layout.collection)
    except Exception as exc:
        current = None
        log.warning("current router pointer unreadable (%s); comparing with centroid routing", exc)
    if current is not None:
        try:
            routers["current"] = Router.load(current.path, layout=layout)
        except RouterError as exc:
            log.warning("current router %s is not usable for layout %s (%s); comparing "
                        "with centroid routing", current.version, layout.layout_id, exc)
    nprobes = sorted(set(nprobe_grid(layout.n_partitions)) | {cfg.nprobe})
    test_q, test_nb = queries[te], neighbours.subset(te)
    table = {name: evaluate_router(r, test_q, test_nb, nprobes, cfg.k)
             for name, r in routers.items()}
    at = {name: next(q for q in rows if q.nprobe == cfg.nprobe) for name, rows in table.items()}
    chosen = candidates[pick_candidate({n: at[n] for n in candidates}, cfg.metric)]
    for name, c in candidates.items():
        log.info("candidate %s (%s): held-out %s@nprobe=%d %.4f%s", name, c.kind, cfg.metric,
                 cfg.nprobe, _score(at[name], cfg.metric), " <- best" if c is chosen else "")
    new_router = chosen.router
    adaptive = [{"recall_target": t, **asdict(q)} for t, q in
                evaluate_adaptive(new_router, test_q, test_nb, ADAPTIVE_TARGETS, cfg.k)]
    for row in adaptive:
        log.info("adaptive nprobe, recall_target %.2f: held-out recall@%d %.4f with %.1f "
                 "partitions on average", row["recall_target"], cfg.k, row["recall"],
                 row["mean_probed"])
    misses = calibration_misses(adaptive)
    for target, recall in misses:
        log.warning("adaptive nprobe missed recall_target %.2f on held-out queries: "
                    "recall@%d %.4f (more than %.2f below)", target, cfg.k, recall,
                    CALIBRATION_TOLERANCE)
    seconds["evaluate"] = time.perf_counter() - t0

    live = routers.get("current")
    decision = decide(at[chosen.name], at.get("current"), at["centroid"], cfg.min_gain,
                      metric=cfg.metric, calibration_ok=not misses,
                      live_calibrated=bool(live is not None and live.recall_thresholds),
                      dry_run=cfg.dry_run)
    metrics = {name: [asdict(q) for q in rows] for name, rows in table.items()}
    training = {**chosen.training, "n_test": len(te), "router_kind": chosen.kind,
                "candidates_held_out": {n: _score(at[n], cfg.metric) for n in candidates}}
    training["calibration_published"] = decision.action == "published" and \
        decision.with_calibration
    chosen.training.clear()
    chosen.training.update(training)
    result = RetrainResult(
        decision=decision.action, reason=f"{chosen.kind} router: {decision.reason}",
        collection=layout.collection, layout_id=layout.layout_id, n_queries=len(queries),
        nprobe=cfg.nprobe, rows_outside_layout=strays, baseline=decision.baseline,
        gain=decision.gain, table=metrics, adaptive=adaptive,
        calibration_misses=[list(m) for m in misses], training=training, seconds=seconds)
    if decision.action == "published":
        label = f"{cfg.metric}@nprobe={cfg.nprobe}"
        tmp_path = final_path.with_name(f".candidate-{version}.onnx")
        try:
            chosen.write(tmp_path, metrics={"test": metrics[chosen.name], "gain": decision.gain,
                                            "baseline": decision.baseline},
                         **(chosen.calibration.to_metadata() if decision.with_calibration
                            else {}))
            tmp_path.replace(final_path)
        finally:
            tmp_path.unlink(missing_ok=True)
        publish(registry, layout.collection, final_path, version,
                {"gain": decision.gain, "baseline": decision.baseline,
                 label: _score(at[chosen.name], cfg.metric)})
        result.version = version
        result.reason = f"published {chosen.kind} router {version}: {decision.reason}"
    return result
