"""The retrain job: read layout, sample queries, label, train, evaluate, publish if better.

Meant for cron. Every failure happens before the publish step, which is one
atomic pointer swap, so a failed or interrupted run never replaces a working
router. The new model is evaluated through onnxruntime from an exported ONNX
file with the weights that would be published, not from torch.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pymilvus import MilvusClient

from .evaluate import RoutingQuality, evaluate_adaptive, evaluate_router, nprobe_grid
from .labels import Neighbours, clean_queries, exact_knn
from .layout import Layout, iter_layout_blocks, read_layout
from .progress import ProgressCounter
from .querylog import sample_queries
from .registry import ModelRegistry
from .router import CentroidRouter, Router, RouterError

log = logging.getLogger(__name__)


class RetrainError(RuntimeError):
    """A retrain that cannot proceed; nothing was published."""


class QueryInputError(RetrainError, ValueError):
    """A query file that is missing, unreadable or of the wrong shape."""


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
    report_dir: str | None = None
    keep: int = 5
    batch_size: int = 4096


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
    training: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    report_paths: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def load_query_file(path: str, dim: int) -> np.ndarray:
    """Queries from a ``.npy`` file, checked against the layout's dimension."""
    p = Path(path)
    if not p.is_file():
        raise QueryInputError(f"query file not found: {path}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise QueryInputError(f"query file {path} is not a readable .npy array: {exc}") from exc
    try:
        return clean_queries(arr, dim, name=f"query file {path}")
    except ValueError as exc:
        raise QueryInputError(str(exc)) from exc


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
    if len(queries) < cfg.min_queries:
        source = cfg.queries_file or f"the query log of {layout.collection!r}"
        raise RetrainError(f"only {len(queries)} queries in {source}; need at least "
                           f"{cfg.min_queries} (--min-queries) to train and evaluate fairly")
    return queries


def label_queries(client: MilvusClient, layout: Layout, queries: np.ndarray, k: int,
                  batch_size: int = 4096) -> Neighbours:
    """Exact top-k neighbours over the whole laid-out collection, streamed from Milvus."""
    with ProgressCounter(int(layout.sizes.sum()), "label", "rows") as bar:
        return exact_knn(queries, iter_layout_blocks(client, layout, batch_size, bar), k=k,
                         metric=layout.metric)


def _subset(nb: Neighbours, idx) -> Neighbours:
    return Neighbours(nb.ids[idx], nb.scores[idx], nb.partitions[idx])


def retrain(client: MilvusClient, cfg: RetrainConfig) -> RetrainResult:
    """Run the whole job once; see the module docstring. Raises :class:`RetrainError`."""
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise RetrainError(f"retraining needs the [train] extra ({exc.name} is missing): "
                           "pip install 'milvus-ltr-router[train]'") from exc
    from .export import export_router
    from .train import LinearRouterTrainer, split_indices

    registry = ModelRegistry(cfg.model_dir, keep=cfg.keep)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    layout = read_layout(client, cfg.collection)
    if not 1 <= cfg.nprobe <= layout.n_partitions:
        raise RetrainError(f"--nprobe {cfg.nprobe} out of range [1, {layout.n_partitions}] "
                           f"for layout {layout.layout_id}")
    if cfg.metric not in ("top1", "recall"):
        raise RetrainError(f"--metric must be top1 or recall, got {cfg.metric!r}")
    if cfg.label_k < 1:
        raise RetrainError(f"--label-k must be >= 1, got {cfg.label_k}")
    if not 0.0 <= cfg.top1_weight <= 1.0:
        raise RetrainError(f"--top1-weight must be in [0, 1], got {cfg.top1_weight}")
    with registry.lock(layout.collection):
        queries = gather_queries(client, layout, cfg)
        seconds["queries"] = time.perf_counter() - t0
        log.info("layout %s: %d partitions; %d queries", layout.layout_id, layout.n_partitions,
                 len(queries))

        t0 = time.perf_counter()
        neighbours = label_queries(client, layout, queries, max(cfg.k, cfg.label_k), cfg.batch_size)
        seconds["label"] = time.perf_counter() - t0
        labels = neighbours.partitions[:, :cfg.label_k] if cfg.label_k > 1 else neighbours.labels
        if (neighbours.partitions[:, 0] < 0).any():
            raise RetrainError("some queries got no neighbour: is the collection empty?")

        t0 = time.perf_counter()
        tr, va, te = split_indices(len(queries), cfg.seed)

        def fit_head(top1_weight: float) -> LinearRouterTrainer:
            return LinearRouterTrainer(
                max_epochs=cfg.max_epochs, patience=cfg.patience, init=cfg.init, seed=cfg.seed,
                top1_weight=top1_weight).fit(queries[tr], labels[tr], queries[va], labels[va],
                                             layout.n_partitions, centroids=layout.centroids,
                                             metric=layout.metric)

        trainer = fit_head(cfg.top1_weight)
        seconds["train"] = time.perf_counter() - t0
        head = None
        if cfg.adaptive_head and cfg.label_k > 1 and cfg.top1_weight > 0:
            # the top-1 term that helps small fixed nprobes costs adaptive nprobe partitions at
            # high recall: recall_target gets its own head trained on top-k labels only
            t0 = time.perf_counter()
            log.info("training the adaptive-nprobe head (top-%d labels only)", cfg.label_k)
            adaptive_trainer = fit_head(0.0)
            head = (adaptive_trainer.coef_, adaptive_trainer.intercept_)
            seconds["train_adaptive_head"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        version = registry.new_version()
        final_path = registry.version_path(layout.collection, version)
        tmp_path = final_path.with_name(f".candidate-{version}.onnx")
        training = {"init": trainer.init_, "best_epoch": trainer.best_epoch_,
                    "val_accuracy": trainer.val_accuracy_, "candidates": trainer.candidates_,
                    "n_train": len(tr), "n_val": len(va), "n_test": len(te),
                    "label_k": cfg.label_k,
                    "top1_weight": cfg.top1_weight if cfg.label_k > 1 else None,
                    "adaptive_head": head is not None}
        try:
            export_router(trainer.coef_, trainer.intercept_, layout, layout.collection, tmp_path,
                          metrics={}, nprobe=cfg.nprobe, adaptive_head=head, training=training)
            new_router = Router.load(tmp_path, layout=layout).calibrate(
                queries[va], neighbours.partitions[va, :cfg.k])      # for adaptive nprobe
            calibration = {"temperature": new_router.temperature,
                           "recall_thresholds": new_router.recall_thresholds,
                           "stopping_model": new_router.stopping_model.to_json()}
            training["temperature"] = new_router.temperature
            routers = {"centroid": CentroidRouter(layout), "learned": new_router}
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
            test_q, test_nb = queries[te], _subset(neighbours, te)
            table = {name: evaluate_router(r, test_q, test_nb, nprobes, cfg.k)
                     for name, r in routers.items()}
            adaptive = [{"recall_target": t, **asdict(q)} for t, q in
                        evaluate_adaptive(new_router, test_q, test_nb, ADAPTIVE_TARGETS, cfg.k)]
            for row in adaptive:
                log.info("adaptive nprobe, recall_target %.2f: held-out recall@%d %.4f with %.1f "
                         "partitions on average", row["recall_target"], cfg.k, row["recall"],
                         row["mean_probed"])
            seconds["evaluate"] = time.perf_counter() - t0

            def score(name: str) -> float:
                row = next(q for q in table[name] if q.nprobe == cfg.nprobe)
                return row.top1_accuracy if cfg.metric == "top1" else row.recall

            best_base = max(["centroid"] + (["current"] if "current" in routers else []), key=score)
            gain = score("learned") - score(best_base)
            better = gain > 0 and gain >= cfg.min_gain
            metrics = {name: [asdict(q) for q in rows] for name, rows in table.items()}
            result = RetrainResult(
                decision="kept", reason="", collection=layout.collection, layout_id=layout.layout_id,
                n_queries=len(queries), nprobe=cfg.nprobe, baseline=best_base, gain=gain,
                table=metrics, adaptive=adaptive, training=training, seconds=seconds)
            label = f"{cfg.metric}@nprobe={cfg.nprobe}"
            if cfg.dry_run:
                result.decision = "dry-run"
                result.reason = (f"dry run: learned {score('learned'):.4f} vs {best_base} "
                                 f"{score(best_base):.4f} ({label})")
            elif better:
                export_router(trainer.coef_, trainer.intercept_, layout, layout.collection, tmp_path,
                              metrics={"test": metrics["learned"], "gain": gain, "baseline": best_base},
                              nprobe=cfg.nprobe, adaptive_head=head, training=training,
                              **calibration)
                tmp_path.replace(final_path)
                registry.publish(layout.collection, final_path, version,
                                 {"gain": gain, "baseline": best_base, label: score("learned")})
                result.decision, result.version = "published", version
                result.reason = (f"published router {version}: {label} {score('learned'):.4f} vs "
                                 f"{best_base} {score(best_base):.4f} (gain {gain:+.4f})")
            else:
                result.reason = (f"kept current router: new {label} {score('learned'):.4f} is not "
                                 f"at least {cfg.min_gain:+.4f} better than {best_base} "
                                 f"{score(best_base):.4f}")
        finally:
            tmp_path.unlink(missing_ok=True)
    if cfg.report_dir:
        result.report_paths = write_report(result, cfg.report_dir)
    log.info(result.reason)
    return result


ADAPTIVE_TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95)


def write_report(result: RetrainResult, report_dir: str) -> list[str]:
    """JSON plus, when matplotlib is installed, a PNG of accuracy and recall vs nprobe."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"retrain-{result.collection}-{time.strftime('%Y%m%dT%H%M%S')}"
    paths = [out / f"{stem}.json"]
    paths[0].write_text(result.to_json())
    table = {k: [RoutingQuality(**q) for q in v] for k, v in result.table.items()}
    if result.adaptive:
        table["learned, adaptive"] = [RoutingQuality(**{k: v for k, v in row.items()
                                                         if k != "recall_target"})
                                      for row in result.adaptive]
    png = plot_quality(table, out / f"{stem}.png", title=f"{result.collection}: {result.decision}")
    if png:
        paths.append(png)
    return [str(p) for p in paths]


def plot_quality(table: dict[str, list[RoutingQuality]], path, title: str = "") -> Path | None:
    """Top-1 accuracy and recall@k against nprobe, one line per router."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed; skipping the PNG report")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in table.items():
        x = [r.mean_probed for r in rows]
        style = "--" if "adaptive" in name else "-"
        axes[0].plot(x, [r.top1_accuracy for r in rows], style, marker="o", label=name)
        axes[1].plot(x, [r.recall for r in rows], style, marker="o", label=name)
    k = next(iter(table.values()))[0].k if table else 10
    for ax, ylabel in zip(axes, ["top-1 accuracy", f"recall@{k}"]):
        ax.set_xscale("log")
        ax.set_xlabel("partitions probed (nprobe, or mean for adaptive)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def format_table(table: dict[str, list[dict]], k: int = 10) -> str:
    """A plain-text table: one row per nprobe, top-1 and recall@k per router."""
    names = list(table)
    header = "nprobe " + " ".join(f"{n + ' top1':>16} {n + f' R@{k}':>16}" for n in names)
    lines = [header]
    for i, row in enumerate(table[names[0]]):
        cells = []
        for n in names:
            q = table[n][i]
            cells.append(f"{q['top1_accuracy']:>16.4f} {q['recall']:>16.4f}")
        lines.append(f"{row['nprobe']:>6} " + " ".join(cells))
    return "\n".join(lines)
