"""What a search request costs on one server, and what a layout's storage makes it touch.

:class:`CostModel` holds the milliseconds a request costs (fitted on a real server by
``benchmarks/bench_costs.py``; :data:`DEFAULT_COST_MODEL` is the fit on the ``large`` set);
:class:`StorageFacts` says how a layout's clusters sit in segments and storage parts. The
batch planner (:mod:`.batching`) prices its plans with both. A request with ``nq`` queries
naming the cluster set ``C`` costs, in ms::

    request_ms + cluster_ms * |C| + segment_ms * S(C) + row_walked_ms * W(C)
      + nq * (query_ms + row_scanned_ms * R(C) + query_row_walked_ms * W(C))

(see :mod:`.batching` for what ``R``, ``S`` and ``W`` count). Pure numpy, no pymilvus.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

@dataclass(frozen=True)
class CostModel:
    """Milliseconds a search request costs on one server (see the module docstring).

    The defaults are the fit of ``python -m benchmarks.bench_costs --dataset large --scales
    0.25 1 --rounds 12`` (embedded Milvus 2.3.5, FLAT IP, 256-d; 72k-289k rows in 1, 2 and 4
    segments and as 8 partitions of clusters, L 538, ``_ltr_cluster in [...]`` with STL_SORT;
    12 interleaved rounds, median per configuration, median |error| of the fit 5.3%) on a
    2-core machine at load average 1.9-2.2 with the server beside the client. The partitioned
    copy resolves the per-segment cost (0.10 ms; the earlier default, fitted at load 11-13
    without it, had none). Per-row costs grow with the vector dimension (``dim``). Measure
    your own server with that command and load the result with :meth:`read`.
    """

    request_ms: float = 2.88                # fixed, per request
    cluster_ms: float = 0.0137              # per cluster named (a filter term, a partition)
    segment_ms: float = 0.102               # per sealed segment searched
    row_walked_ms: float = 5.62e-7          # per row of the segments searched, per filtered request
    query_ms: float = 0.0572                # per query of a request
    row_scanned_ms: float = 1.62e-5         # per query and row of the clusters named
    query_row_walked_ms: float = 9.44e-8    # per query and row walked (bitset tested per query)
    dim: int | None = 256
    source: str = ("benchmarks/bench_costs.py --dataset large --scales 0.25 1 --rounds 12: Milvus "
                   "v2.3.5, FLAT IP 256-d, N 72346-289382 (1-4 segments, 8 partitions), L 538, "
                   "2026-12-04, load average 1.9")

    def __post_init__(self):
        for f in fields(self):
            if f.name.endswith("_ms"):
                v = getattr(self, f.name)
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise InputError(f"CostModel.{f.name} must be a finite number >= 0, got {v!r}")

    def request_cost(self, nq: int, clusters: Sequence[int], facts: "StorageFacts") -> float:
        """Predicted ms of one request of ``nq`` queries naming ``clusters``."""
        c = np.unique(np.asarray(clusters, dtype=np.int64))
        parts = np.unique(facts.part_of_cluster[c]) if len(c) else np.zeros(0, np.int64)
        rows = float(facts.sizes[c].sum())
        segs = float(facts.part_segments[parts].sum())
        walked = float(facts.part_rows[parts].sum()) if facts.filtered else 0.0
        return (self.request_ms + self.cluster_ms * len(c) + self.segment_ms * segs
                + self.row_walked_ms * walked
                + nq * (self.query_ms + self.row_scanned_ms * rows + self.query_row_walked_ms * walked))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """From :meth:`to_dict`'s keys, or a ``bench_costs`` result (its ``cost_model`` key).
        Unknown keys are refused (a typo would silently keep a default)."""
        d = d.get("cost_model", d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown CostModel keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: str | Path) -> "CostModel":
        """From a JSON file: :meth:`to_json`'s output or a ``bench_costs`` result."""
        return cls.from_json(Path(path).read_text())

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


@dataclass(frozen=True, eq=False)
class StorageFacts:
    """How a layout's clusters sit in segments: what a request naming some clusters touches.

    Clusters live in storage *parts* (partitions): one part per cluster in
    ``partition`` storage, G groups in ``grouped``, one part in ``single``.
    Naming a cluster searches every sealed segment of its part and, when the
    request carries a filter, walks every row of that part.
    """

    sizes: np.ndarray               # [L] rows per cluster
    part_of_cluster: np.ndarray     # [L] the part each cluster lives in
    part_segments: np.ndarray       # [P] sealed segments per part
    part_rows: np.ndarray           # [P] rows per part
    filtered: bool = True           # requests carry a filter (cluster-id field modes)

    def __post_init__(self):
        sizes = np.asarray(self.sizes, dtype=np.float64)
        part = np.asarray(self.part_of_cluster, dtype=np.int64)
        segs = np.asarray(self.part_segments, dtype=np.float64)
        prows = np.asarray(self.part_rows, dtype=np.float64)
        if sizes.ndim != 1 or part.shape != sizes.shape or len(sizes) == 0:
            raise InputError("StorageFacts needs one size and one part per cluster")
        if segs.ndim != 1 or prows.shape != segs.shape or part.min() < 0 or part.max() >= len(segs):
            raise InputError("StorageFacts: part_of_cluster must index part_segments / part_rows")
        if (sizes < 0).any() or (segs < 0).any() or (prows < 0).any():
            raise InputError("StorageFacts: sizes, segments and rows must be >= 0")
        for name, v in (("sizes", sizes), ("part_of_cluster", part), ("part_segments", segs),
                        ("part_rows", prows)):
            v.setflags(write=False)
            object.__setattr__(self, name, v)

    @property
    def n_clusters(self) -> int:
        return len(self.sizes)

    @property
    def n_parts(self) -> int:
        return len(self.part_segments)

    @staticmethod
    def _segments(rows: np.ndarray, segments, rows_per_segment) -> np.ndarray:
        if segments is not None:
            return np.broadcast_to(np.asarray(segments, dtype=np.float64), rows.shape).copy()
        if rows_per_segment:
            return np.maximum(1.0, np.ceil(rows / float(rows_per_segment)))
        return np.ones_like(rows)

    @classmethod
    def single(cls, sizes, *, segments: int | None = None, rows_per_segment: int | None = None,
               extra_rows: int = 0) -> "StorageFacts":
        """One collection plus a cluster-id filter: every request searches every segment and
        walks every row (``extra_rows``: rows outside the layout, walked too)."""
        sizes = np.asarray(sizes, dtype=np.float64)
        rows = np.array([sizes.sum() + extra_rows])
        return cls(sizes, np.zeros(len(sizes), np.int64), cls._segments(rows, segments, rows_per_segment),
                   rows, filtered=True)

    @classmethod
    def partition(cls, sizes, *, segments_per_cluster=None, rows_per_segment: int | None = None,
                  filtered: bool = False) -> "StorageFacts":
        """One partition per cluster (at least one segment each); no filter unless the caller
        passes one (``filtered``)."""
        sizes = np.asarray(sizes, dtype=np.float64)
        return cls(sizes, np.arange(len(sizes)), cls._segments(sizes, segments_per_cluster, rows_per_segment),
                   sizes, filtered=filtered)

    @classmethod
    def grouped(cls, sizes, group_of_cluster, *, segments_per_group=None,
                rows_per_segment: int | None = None) -> "StorageFacts":
        """G partitions of clusters plus the cluster-id filter: a request searches and walks the
        groups of the clusters it names."""
        sizes = np.asarray(sizes, dtype=np.float64)
        group = np.asarray(group_of_cluster, dtype=np.int64)
        rows = np.bincount(group, weights=sizes, minlength=int(group.max()) + 1 if len(group) else 0)
        return cls(sizes, group, cls._segments(rows, segments_per_group, rows_per_segment), rows,
                   filtered=True)

    @classmethod
    def from_storage(cls, storage, sizes, *, rows_per_segment: int | None = None,
                     segments=None) -> "StorageFacts":
        """From a :class:`milvus_ltr_router.storage.Storage` and the live cluster sizes.
        ``segments``: the total (``single``) or per part; else from ``rows_per_segment``."""
        if storage.mode == "single":
            return cls.single(sizes, segments=segments, rows_per_segment=rows_per_segment)
        if storage.mode == "partition":
            return cls.partition(sizes, segments_per_cluster=segments, rows_per_segment=rows_per_segment)
        index = {p: i for i, p in enumerate(storage.partitions)}
        return cls.grouped(sizes, [index[p] for p in storage.cluster_partitions],
                           segments_per_group=segments, rows_per_segment=rows_per_segment)


DEFAULT_COST_MODEL = CostModel()

# What one request may carry on a Milvus server: ``nq`` at most 16384 (the proxy's limit on
# 2.3-2.5), and a request message well below gRPC's receive limits (the server's default is
# 256 MiB on 2.3+, some deployments set 64 MiB): float32 vectors of ``dim`` within 32 MiB.
MAX_NQ = 16384
MAX_REQUEST_BYTES = 32 * 1024 * 1024


def max_queries_for(dim: int, *, max_nq: int = MAX_NQ, max_bytes: int = MAX_REQUEST_BYTES) -> int:
    """The most queries of ``dim`` float32 values one request may carry (see :data:`MAX_NQ`)."""
    return max(1, min(max_nq, max_bytes // max(1, 4 * int(dim))))


def resolve_cost_model(model) -> CostModel:
    """A :class:`CostModel` from one (returned as is), a JSON file path (:meth:`CostModel.read`:
    its own JSON or a ``bench_costs`` result), a dict of its fields, or None (the default)."""
    if model is None:
        return DEFAULT_COST_MODEL
    if isinstance(model, CostModel):
        return model
    if isinstance(model, dict):
        return CostModel.from_dict(model)
    if isinstance(model, (str, Path)):
        try:
            return CostModel.read(model)
        except OSError as exc:
            raise InputError(f"cannot read the cost model {str(model)!r}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise InputError(f"{str(model)!r} is not a cost model: {exc}") from exc
    raise InputError(f"cost_model must be a CostModel, a path to its JSON or None, got "
                     f"{type(model).__name__}")
