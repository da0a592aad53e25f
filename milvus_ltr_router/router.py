"""Routers: score the partitions of a layout for each query and pick the best ``nprobe``.

Serving uses onnxruntime only (no torch). :class:`Router` loads a published
ONNX model (a learned router, the moment router or a learned router over the
moment features: ``Router.kind`` says which); :class:`MomentRouter` scores a
layout's stored cluster moments in numpy, the cold-start router before any
file is published; :class:`CentroidRouter` ranks the layout's centroids, the
baseline every router must beat and the fallback of a layout without moments.

onnxruntime (1.2x) writes a device id and a telemetry database under
``~/.cache/Microsoft`` and a ``.ses`` file in the temp dir whenever it opens a model,
unless ``ORT_DISABLE_TELEMETRY`` is set when it is imported. Serving must write
nothing outside the model dir, so importing this module sets it (``setdefault``:
an application's own value wins; it has no effect if onnxruntime was imported first).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .blas import serial_blas
from .calibration import Calibration, fit_calibration
from .clustering import as_vector_batch, linear_centroid_scorer
from .contract import ADAPTIVE_INPUT, QUERY_INPUT, SCORES_OUTPUT, ContractError, RouterMetadata, \
    check_signature
from .errors import OperationalError

#: Bytes a moment router's second stage may gather in one run of its graph (see
#: :meth:`Router._block_rows`). About a cache's worth: the gathered rows are read again
#: at once, and a batch of 32 queries at 384-d cost 0.61 ms of CPU per query in runs of
#: 14 queries (64 MB) against 0.24 ms one query a run (benchmarks/bench_client_cpu.py).
GATHER_BYTES = 8 << 20

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)


class RouterError(OperationalError):
    """A router file that is missing, corrupt, or made for another layout."""


class BaseRouter:
    """Ranking logic shared by every router; subclasses provide :meth:`scores`."""

    partition_names: list[str]
    dim: int
    layout_id: str
    kind: str = "base"

    @property
    def n_partitions(self) -> int:
        return len(self.partition_names)

    def scores(self, queries: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_queries(self, queries) -> np.ndarray:
        return as_vector_batch(queries, self.dim, "the router's")

    def _check_nprobe(self, nprobe: int) -> int:
        if not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= self.n_partitions:
            raise ValueError(f"nprobe must be an integer in [1, {self.n_partitions}], got {nprobe!r}")
        return int(nprobe)

    def rank(self, queries, nprobe: int) -> np.ndarray:
        """Indices ``[Q, nprobe]`` into :attr:`partition_names`, best first."""
        nprobe = self._check_nprobe(nprobe)
        s = self.scores(self._check_queries(queries))
        n_parts = s.shape[1]
        if len(s) == 1:              # one query: 1-D selection is ~3x cheaper (serving hot path)
            row = s[0]
            top = np.argpartition(row, n_parts - nprobe)[n_parts - nprobe:] if nprobe < n_parts \
                else np.arange(n_parts)
            return top[np.argsort(-row[top], kind="stable")][None, :]
        if nprobe < n_parts:
            top = np.argpartition(s, n_parts - nprobe, axis=1)[:, n_parts - nprobe:]
        else:
            top = np.broadcast_to(np.arange(n_parts), s.shape)
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
        return np.take_along_axis(top, order, 1)

    temperature: float = 1.0
    recall_thresholds: list = []     # (threshold, held-out recall@k, mean probed), from calibrate()
    stopping_model = None            # calibration.StoppingModel, from calibrate()
    has_adaptive_head = False        # True: adaptive nprobe ranks with its own trained head

    def adaptive_scores(self, queries: np.ndarray) -> np.ndarray:
        """Scores that adaptive nprobe ranks and calibrates: :meth:`scores` unless the
        router carries a separate head for it."""
        return self.scores(queries)

    def probabilities(self, queries) -> np.ndarray:
        """Calibrated softmax over partitions ``[Q, L]`` of the adaptive scores
        (see :mod:`.calibration`)."""
        from .calibration import softmax
        return softmax(self.adaptive_scores(self._check_queries(queries)), self.temperature)

    def fit_calibration(self, queries, neighbour_partitions, stopping_model: bool = True,
                        seed: int = 0) -> Calibration:
        """What adaptive nprobe needs, fitted on held-out queries and their neighbours'
        partitions (:func:`.calibration.fit_calibration` on this router's adaptive scores).
        Pure: the router is unchanged."""
        scores = self.adaptive_scores(self._check_queries(queries))
        return fit_calibration(scores, neighbour_partitions, stopping_model, seed)

    def with_calibration(self, calibration: Calibration) -> "BaseRouter":
        """A copy of this router that routes adaptive nprobe with ``calibration``; this
        router is unchanged (a served router may be in use by other threads)."""
        new = copy.copy(self)
        new._set_calibration(calibration)
        return new

    def _set_calibration(self, calibration: Calibration) -> None:
        self.temperature = calibration.temperature
        self.recall_thresholds = [list(row) for row in calibration.recall_thresholds]
        self.stopping_model = calibration.stopping_model

    def calibrate(self, queries, neighbour_partitions, stopping_model: bool = True,
                  seed: int = 0) -> "BaseRouter":
        """A calibrated copy: ``with_calibration(fit_calibration(...))``; self is unchanged."""
        return self.with_calibration(self.fit_calibration(queries, neighbour_partitions,
                                                          stopping_model, seed))

    @property
    def calibration(self) -> Calibration:
        """This router's calibration (temperature 1 and no table when uncalibrated)."""
        return Calibration(self.temperature, self.recall_thresholds, self.stopping_model)

    def rank_adaptive(self, queries, recall_target: float, min_nprobe: int = 1,
                      max_nprobe: int | None = None) -> list[np.ndarray]:
        """Per query, every partition whose predicted neighbour share reaches the threshold
        that gave ``recall_target`` on held-out queries (best first, between the bounds)."""
        from .calibration import expected_shares, threshold_counts, threshold_for
        lam = threshold_for(self.recall_thresholds, recall_target)
        order, values = expected_shares(self.probabilities(queries), self.stopping_model)
        counts = threshold_counts(values, lam, min_nprobe, max_nprobe)
        return [row[:n] for row, n in zip(order, counts)]

    def route(self, queries, nprobe: int | None = None, recall_target: float | None = None,
              min_nprobe: int = 1, max_nprobe: int | None = None):
        """``[Q, nprobe]`` indices for a fixed nprobe, or a list of variable-length index
        arrays for a ``recall_target`` (adaptive nprobe, between ``min_nprobe`` and ``max_nprobe``)."""
        if recall_target is not None:
            return self.rank_adaptive(queries, recall_target, min_nprobe, max_nprobe)
        if nprobe is None:
            raise ValueError("give nprobe or recall_target")
        return self.rank(queries, nprobe)

    def partitions(self, queries, nprobe: int) -> list[list[str]]:
        """Partition names to search for each query, best first."""
        names = self.partition_names
        return [[names[i] for i in row] for row in self.rank(queries, nprobe)]

    def check_layout(self, layout) -> None:
        """Refuse to serve a layout other than the one this router was made for."""
        # a router scores clusters: it is bound to the build that made them, whatever the storage
        if layout.clustering_id != self.layout_id:
            raise RouterError(f"router was trained for layout {self.layout_id!r} but the collection "
                              f"has layout {layout.clustering_id!r}; retrain the router")
        if layout.dim != self.dim:
            raise RouterError(f"router dim={self.dim} does not match layout dim={layout.dim}")
        if list(layout.partition_names) != list(self.partition_names):
            raise RouterError("router partition names differ from the layout's partitions")


class LinearRouter(BaseRouter):
    """A linear router in numpy: ``scores = q @ weight.T + bias``, one row per cluster.

    For routers held in memory (benchmarks, experiments, a trainer's ``coef_`` before
    export); :meth:`from_layout` is centroid routing. Served routers come from ONNX files
    (:class:`Router`).
    """

    kind = "linear"

    def __init__(self, weight, bias, partition_names, layout_id: str = "",
                 temperature: float = 1.0, kind: str | None = None, metric: str = "IP"):
        weight = np.asarray(weight, dtype=np.float32)
        bias = np.zeros(len(weight), np.float32) if bias is None else np.asarray(bias, np.float32)
        if weight.ndim != 2 or bias.shape != (len(weight),) or len(partition_names) != len(weight):
            raise ValueError(f"weight {weight.shape}, bias {bias.shape} and {len(partition_names)} "
                             f"partition names do not agree")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ValueError("weight and bias must be finite")
        self.partition_names = list(partition_names)
        self.dim = int(weight.shape[1])
        self.layout_id = layout_id
        self.temperature = temperature
        self.metadata = {"metric": metric, "layout_id": layout_id}
        if kind is not None:
            self.kind = kind
        self._wt = np.ascontiguousarray(weight.T)
        self._b = bias

    @classmethod
    def from_layout(cls, layout, temperature: float = 1.0) -> "CentroidRouter":
        """Centroid routing for ``layout`` (classic IVF: rank clusters by their centroid)."""
        return CentroidRouter(layout, temperature)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"), serial_blas():
            s = queries @ self._wt          # NaN/inf queries: searched as pymilvus does, no warnings
            s += self._b
        return s


class CentroidRouter(LinearRouter):
    """Rank partitions by their centroid: classic IVF routing, from a layout."""

    kind = "centroid"

    def __init__(self, layout, temperature: float = 1.0):
        w, b = linear_centroid_scorer(layout.centroids, layout.metric)
        super().__init__(w, b, layout.partition_names, layout.clustering_id, temperature,
                         metric=layout.metric)


class MomentRouter(BaseRouter):
    """The training-free moment router of a layout (:mod:`.moments`), in numpy.

    Scores ``<q, mu_i> + c * spread_i(q) * sqrt(2 ln n_i)`` from the layout's stored
    cluster moments: what a collection is routed by before any router is published.
    The same scorer exported to ONNX (:func:`.export.moment_router_model`) is what
    ``retrain-router`` publishes when the moment router wins its gate.
    """

    kind = "moments"

    def __init__(self, layout, optimism: float | None = None, rescore_top: int | None = None,
                 temperature: float = 1.0, scorer=None):
        from .moments import DEFAULT_OPTIMISM, DEFAULT_RESCORE_TOP, MomentScorer
        moments = getattr(layout, "moments", None)
        if scorer is None:
            if moments is None:
                raise RouterError(f"layout of {layout.collection!r} has no cluster moments; "
                                  "rebuild it or run retrain-router to compute them")
            scorer = MomentScorer.from_moments(
                moments, optimism=DEFAULT_OPTIMISM if optimism is None else optimism,
                rescore_top=DEFAULT_RESCORE_TOP if rescore_top is None else rescore_top)
        self.scorer = scorer
        self.optimism = optimism
        self.partition_names = list(layout.partition_names)
        self.dim = int(layout.dim)
        self.layout_id = layout.clustering_id
        self.temperature = temperature
        self.metadata = {"metric": layout.metric, "layout_id": self.layout_id}

    def scores(self, queries: np.ndarray) -> np.ndarray:
        with serial_blas():                 # many threads routing at once: :mod:`.blas`
            return self.scorer.scores(queries)


class Router(BaseRouter):
    """A router file served by onnxruntime: learned, moments or learned over moments
    (:attr:`kind`, from the file's metadata)."""

    kind = "learned"

    def __init__(self, session, metadata: dict | RouterMetadata, path: str | None = None):
        self._session = session
        self.path = path
        where = f"router {path or ''}".rstrip()
        try:
            info = metadata if isinstance(metadata, RouterMetadata) else \
                RouterMetadata.from_onnx(metadata)
            adaptive = check_signature([(i.name, i.shape) for i in session.get_inputs()],
                                       [o.name for o in session.get_outputs()],
                                       [i.name for i in session.get_overridable_initializers()],
                                       info.dim)
        except ContractError as exc:
            raise RouterError(f"{where}: {exc}") from exc
        self._set_info(info)
        self._input = QUERY_INPUT
        self._output = [SCORES_OUTPUT]
        # a second head trained for adaptive nprobe (top-k labels only), when exported with one:
        # selected by the optional boolean input (an overridable initializer, default false)
        self._adaptive_feed = {ADAPTIVE_INPUT: np.array(True)} if adaptive else None
        self._probe(where)

    def _set_info(self, info: RouterMetadata) -> None:
        self.info = info
        self.kind = info.router_kind
        self.partition_names = list(info.partition_names)
        self.dim = info.dim
        self.layout_id = info.layout_id
        self.temperature = info.temperature
        self.recall_thresholds = info.recall_thresholds
        self.stopping_model = info.stopping_model

    def _set_calibration(self, calibration: Calibration) -> None:
        self._set_info(replace(self.info, **calibration.to_metadata()))

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata as an exported file holds it (with the current calibration)."""
        return self.info.to_onnx()

    def _probe(self, where: str) -> None:
        """Run each head once on fixed random queries: it must give one finite score per
        partition of the layout (a graph with more or fewer outputs than partitions, or
        NaN/inf weights, is refused here rather than failing or misrouting searches)."""
        queries = np.random.default_rng(0).standard_normal((2, self.dim)).astype(np.float32)
        heads = [("scores", self.scores)]
        if self._adaptive_feed is not None:
            heads.append(("adaptive head scores", self.adaptive_scores))
        for what, head in heads:
            try:
                scores = np.asarray(head(queries))
            except Exception as exc:  # onnxruntime raises several private exception types
                raise RouterError(f"{where}: computing {what} of a probe query failed: {exc}") from exc
            if scores.shape != (len(queries), self.n_partitions):
                per_query = scores.shape[-1] if scores.ndim else 0
                raise RouterError(f"{where}: {what} give {per_query} values per query (shape "
                                  f"{list(scores.shape)} for {len(queries)} probe queries) but its "
                                  f"metadata names {self.n_partitions} partitions; it is corrupt "
                                  "or was not exported for this layout")
            if not np.isfinite(scores).all():
                raise RouterError(f"{where}: {what} of a probe query are not finite (NaN or "
                                  "inf); the router's weights are corrupt")

    @classmethod
    def load(cls, path: str | os.PathLike, layout=None, num_threads: int = 1) -> "Router":
        """Load an ONNX router; with ``layout``, refuse one made for another layout."""
        import onnxruntime as ort
        path = Path(path)
        try:
            found = path.is_file()
        except OSError as exc:      # e.g. a directory on the way that this user cannot read
            raise RouterError(f"router file {path} cannot be read: {exc}") from exc
        if not found:
            raise RouterError(f"router file not found: {path}")
        try:        # read here: onnxruntime reports EACCES as "system error number 13"
            model_bytes = path.read_bytes()
        except OSError as exc:
            raise RouterError(f"router file {path} cannot be read: {exc}") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(model_bytes, sess_options=opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several private exception types
            raise RouterError(f"router file {path} is not a loadable ONNX model: {exc}") from exc
        try:
            meta = dict(session.get_modelmeta().custom_metadata_map)
        except Exception as exc:
            raise RouterError(f"router file {path} has unreadable metadata: {exc}") from exc
        router = cls(session, meta, str(path))
        if layout is not None:
            router.check_layout(layout)
        return router

    def _block_rows(self) -> int | None:
        """Queries per run of the graph: a moment router's second stage gathers ``m r d``
        floats per query (96 x 32 x 384 floats: 4.7 MB), so a batch, or a calibration's
        thousands of validation queries, runs in blocks of at most :data:`GATHER_BYTES` (each
        query's scores are the same whatever the block); None: one run."""
        if self.kind not in ("moments", "learned-moments"):
            return None
        training = self.info.training if isinstance(self.info.training, dict) else {}
        try:
            rank = int(training.get("rank") or 32)
            top = int(training.get("rescore_top") or self.n_partitions)
        except (TypeError, ValueError):
            rank, top = 32, self.n_partitions
        per_query = 4 * self.dim * max(1, rank) * max(1, min(top, self.n_partitions))
        return max(1, GATHER_BYTES // per_query)

    def _run(self, queries: np.ndarray, feed: dict) -> np.ndarray:
        block = self._block_rows()
        if block is None or len(queries) <= block:
            return self._session.run(self._output, {self._input: queries, **feed})[0]
        return np.concatenate([self._session.run(self._output, {self._input: queries[s:s + block],
                                                                **feed})[0]
                               for s in range(0, len(queries), block)])

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return self._run(queries, {})

    def adaptive_scores(self, queries: np.ndarray) -> np.ndarray:
        if self._adaptive_feed is None:
            return self.scores(queries)
        return self._run(queries, self._adaptive_feed)

    @property
    def has_adaptive_head(self) -> bool:
        return self._adaptive_feed is not None

    @property
    def metrics(self) -> dict:
        return self.info.metrics

    @property
    def default_nprobe(self) -> int | None:
        return self.info.nprobe


def validate_nprobes(nprobes: Sequence[int], n_partitions: int) -> list[int]:
    bad = [n for n in nprobes if not 1 <= int(n) <= n_partitions]
    if bad:
        raise ValueError(f"nprobe values {bad} out of range [1, {n_partitions}]")
    return sorted({int(n) for n in nprobes})
