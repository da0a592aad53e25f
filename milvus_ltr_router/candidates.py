"""The candidate routers a retrain weighs: trained or tuned, exported, served back.

A retrain (:mod:`.retrain`) builds up to two new routers for a layout and lets its gate
(:func:`.retrain.decide`) compare them with centroid routing and the live router on
held-out queries:

* ``"moments"`` - the training-free moment router (:mod:`.moments`), its optimism ``c``
  tuned on the validation queries (:func:`tune_optimism`);
* ``"learned"`` - the trained router (:class:`.train.LinearRouterTrainer`): over the
  layout's moments when it has them (``W q + b + a * spread(q)``, started at the moment
  router, kind ``learned-moments``), else the linear ``W q + b`` with its second head
  for adaptive nprobe (kind ``learned``).

Each is exported to a temporary ONNX file and loaded back with :class:`.router.Router`,
so what is evaluated is what would be served. Needs the ``[train]`` extra.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .calibration import Calibration
from .evaluate import routing_quality
from .labels import Neighbours
from .router import Router

log = logging.getLogger(__name__)

#: The optimism values the moment router is tuned over on validation queries.
OPTIMISM_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def moments_objective(top1_weight: float) -> tuple[float, str]:
    """``(top1_weight, val_metric)`` the learned router over the moments trains with, from
    retrain's ``--top1-weight``. It has one head for fixed and adaptive nprobe (the linear
    router has a second, top-k-only head for ``recall_target``), so it weighs the top-1
    term half as much and keeps the epoch with the best validation recall@k. On the large
    set, unit-norm (docs/benchmarks.md#moment-routers-issue-20): clusters for recall@10
    .9 / .95 16 / 33 where the linear router's objective (.5, top-1) gave 17 / 35, top-1
    at 1% of L .791 for both."""
    return top1_weight / 2, "recall"


@dataclass
class Candidate:
    """A new router, served from its exported file and calibrated on validation queries."""

    name: str                                 # row of the retrain table: learned | moments
    router: Router
    calibration: Calibration
    write: Callable[..., Path]                # write(path, **metadata): the same router again
    training: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.router.kind


def quality_score(probed: np.ndarray, neighbour_parts: np.ndarray, metric: str, k: int) -> float:
    """``metric`` (top1 or recall@k) of the routing ``probed`` ``[Q, nprobe]``."""
    parts = np.asarray(neighbour_parts)
    nb = Neighbours(np.zeros_like(parts), np.zeros(parts.shape, np.float32), parts)
    q = routing_quality(probed, nb, k)
    return q.top1_accuracy if metric == "top1" else q.recall


def tune_optimism(moments, queries: np.ndarray, neighbour_parts: np.ndarray, nprobe: int,
                  metric: str = "top1", k: int = 10, grid=OPTIMISM_GRID,
                  rescore_top: int | None = None) -> tuple[float, dict[float, float]]:
    """The optimism ``c`` of the moment router that scores best (``metric`` at ``nprobe``)
    on ``queries``, and the score of each grid value. Pure; ties go to the value nearest 1
    (the Gaussian estimate, the rule without queries)."""
    from .moments import DEFAULT_RESCORE_TOP, MomentScorer
    top = DEFAULT_RESCORE_TOP if rescore_top is None else rescore_top
    scores = {}
    for c in grid:
        s = MomentScorer.from_moments(moments, optimism=c, rescore_top=top).scores(queries)
        probed = np.argsort(-s, axis=1, kind="stable")[:, :nprobe]
        scores[float(c)] = quality_score(probed, neighbour_parts, metric, k)
    best = max(scores, key=lambda c: (scores[c], -abs(np.log(c))))
    return best, scores


def _served(name: str, write: Callable[..., Path], path: Path, layout, val_q, val_parts,
            training: dict) -> Candidate:
    write(path)
    router = Router.load(path, layout=layout)
    calibration = router.fit_calibration(val_q, val_parts)
    training["temperature"] = calibration.temperature
    return Candidate(name, router.with_calibration(calibration), calibration, write, training)


def moment_candidate(layout, moments, val_q: np.ndarray, val_parts: np.ndarray, cfg,
                     path: Path) -> Candidate:
    """The moment router of ``layout``, its optimism tuned on the validation queries."""
    from .export import export_moment_router
    from .moments import MomentScorer
    c, grid = tune_optimism(moments, val_q, val_parts, cfg.nprobe, cfg.metric, cfg.k)
    log.info("moment router: optimism %.2f (validation %s@nprobe=%d: %s)", c, cfg.metric,
             cfg.nprobe, ", ".join(f"c={g:g} {s:.4f}" for g, s in grid.items()))
    scorer = MomentScorer.from_moments(moments, optimism=c)
    training = {"router_kind": "moments", "optimism": c, "rank": moments.rank,
                "rescore_top": scorer.candidates, "optimism_grid": grid}

    def write(p, **values):
        return export_moment_router(scorer, layout, layout.collection, p, nprobe=cfg.nprobe,
                                    router_kind="moments", training=training, **values)
    return _served("moments", write, path, layout, val_q, val_parts, training)


def learned_candidate(layout, moments, queries: np.ndarray, labels: np.ndarray, tr, va,
                      val_parts: np.ndarray, cfg, path: Path) -> Candidate:
    """The trained router: over ``moments`` when given (no adaptive head: calibration runs
    on its scores), else linear with the second head for adaptive nprobe."""
    from .export import export_moment_router, export_router
    from .moments import MomentScorer
    from .train import LinearRouterTrainer

    val_set = (queries[va], val_parts)

    def fit_head(top1_weight: float, val_metric: str, with_moments) -> LinearRouterTrainer:
        return LinearRouterTrainer(
            n_partitions=layout.n_partitions, centroids=layout.centroids, metric=layout.metric,
            moments=with_moments, max_epochs=cfg.max_epochs, patience=cfg.patience,
            init=cfg.init, seed=cfg.seed, top1_weight=top1_weight, val_metric=val_metric,
            val_nprobe=cfg.nprobe, val_k=cfg.k).fit(queries[tr], labels[tr], eval_set=val_set)

    trainer = (fit_head(cfg.top1_weight, cfg.metric, moments) if moments is None
               else fit_head(*moments_objective(cfg.top1_weight), moments))
    head = None
    if moments is None and cfg.adaptive_head and cfg.label_k > 1 and cfg.top1_weight > 0:
        # the top-1 term that helps small fixed nprobes costs adaptive nprobe partitions at
        # high recall: recall_target gets its own head trained on top-k labels only
        log.info("training the adaptive-nprobe head (top-%d labels only)", cfg.label_k)
        adaptive_trainer = fit_head(0.0, "recall", None)
        head = (adaptive_trainer.coef_, adaptive_trainer.intercept_)
    kind = "learned" if moments is None else "learned-moments"
    training = {"router_kind": kind, "init": trainer.init_, "best_epoch": trainer.best_epoch_,
                "val_criterion": trainer.val_criterion_, "val_score": trainer.best_score_,
                "candidates": trainer.candidates_, "n_train": len(tr), "n_val": len(va),
                "label_k": cfg.label_k,
                "top1_weight": cfg.top1_weight if cfg.label_k > 1 else None,
                "adaptive_head": head is not None}
    if moments is None:
        def write(p, **values):
            return export_router(trainer.coef_, trainer.intercept_, layout, layout.collection,
                                 p, nprobe=cfg.nprobe, adaptive_head=head, training=training,
                                 **values)
    else:
        scorer = MomentScorer.from_moments(moments, weight=trainer.coef_,
                                           bias=trainer.intercept_,
                                           spread_weight=trainer.spread_coef_)
        training.update(rank=moments.rank, rescore_top=scorer.candidates)

        def write(p, **values):
            return export_moment_router(scorer, layout, layout.collection, p,
                                        nprobe=cfg.nprobe, router_kind=kind, training=training,
                                        **values)
    return _served("learned", write, path, layout, queries[va], val_parts, training)
