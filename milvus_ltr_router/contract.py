"""The ONNX router contract: what an exported router file holds and serving relies on.

Shared by the exporter (:mod:`.export`) and serving (:mod:`.router`), so that
serving never imports the exporter. A router file is an ONNX model with

* input :data:`QUERY_INPUT` - float32 ``[batch, dim]`` query vectors;
* output :data:`SCORES_OUTPUT` - float32 ``[batch, L]``, one score per cluster of
  the layout, higher is better;
* optionally :data:`ADAPTIVE_INPUT` - a boolean scalar, an overridable
  initializer defaulting to false; true ranks with a second head trained for
  adaptive nprobe (``recall_target``);
* string ``metadata_props`` under the keys of :data:`METADATA_KEYS`, read and
  checked by :class:`RouterMetadata`.

:class:`RouterMetadata` is the one place where metadata values are checked
(types and ranges); a file that breaks the contract raises
:class:`ContractError`, an operational error (exit code 1): the file is
corrupt or foreign, nothing the caller typed.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Mapping, Sequence

from .calibration import N_FEATURES, StoppingModel
from .errors import OperationalError
from .labels import METRICS

QUERY_INPUT = "query"          # float32 [batch, dim]
SCORES_OUTPUT = "scores"       # float32 [batch, L]
ADAPTIVE_INPUT = "adaptive"    # optional bool scalar: rank with the adaptive head (default false)

# metadata_props keys; REQUIRED_KEYS must be present
METADATA_KEYS = ("partition_names", "dim", "layout_id", "metric", "collection", "nprobe",
                 "temperature", "recall_thresholds", "stopping_model", "metrics", "training",
                 "created_at", "package_version", "router_kind")
REQUIRED_KEYS = ("partition_names", "dim", "layout_id", "metric")
#: What a router file scores with: a trained linear scorer, the training-free moment router
#: (cluster means and covariance sketches, :mod:`.moments`), a trained scorer over the moment
#: features, or the centroid scorer exported as a file.
ROUTER_KINDS = ("learned", "moments", "learned-moments", "centroid")
TABLE_TOLERANCE = 1e-9         # recall table rows may wobble this much in floating point


class ContractError(OperationalError):
    """Router metadata or a graph signature that breaks the contract. Exit code 1."""


def _finite_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _json(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class RouterMetadata:
    """The metadata of a router file, checked on construction.

    ``partition_names`` (distinct, non-empty; their number is ``L``), ``dim``
    (>= 1), ``layout_id`` (the clustering the router scores) and ``metric``
    (IP, COSINE or L2) are required. ``nprobe`` (the default, in ``[1, L]``),
    ``temperature`` (finite, > 0), ``recall_thresholds`` (rows ``(threshold,
    recall, mean partitions)`` with threshold and recall in ``[0, 1]``, mean
    partitions in ``[1, L]``, recall and partitions never falling as the
    threshold falls) and ``stopping_model`` make up the calibration;
    ``metrics``, ``training``, ``collection``, ``created_at`` and
    ``package_version`` are informational. Keys outside :data:`METADATA_KEYS`
    are kept in ``extra`` and written back unchanged.
    """

    partition_names: tuple
    dim: int
    layout_id: str
    metric: str = "IP"
    collection: str = ""
    nprobe: int | None = None
    temperature: float = 1.0
    recall_thresholds: list = field(default_factory=list)
    stopping_model: StoppingModel | None = None
    metrics: dict = field(default_factory=dict)
    training: dict | None = None
    created_at: str = ""
    package_version: str = ""
    router_kind: str = "learned"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        def setattr_(name, value):
            object.__setattr__(self, name, value)
        setattr_("partition_names", tuple(self.partition_names))
        for name in ("dim", "nprobe"):          # numpy integers are integers
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr_(name, int(value))
        if isinstance(self.temperature, numbers.Real) and not isinstance(self.temperature, bool):
            setattr_("temperature", float(self.temperature))
        if isinstance(self.stopping_model, dict):
            setattr_("stopping_model", _stopping_model(self.stopping_model))
        table = self.recall_thresholds
        if isinstance(table, (list, tuple)):       # rows as lists of floats, as JSON reads them
            setattr_("recall_thresholds", [[_as_float(x) for x in row]
                                           if isinstance(row, (list, tuple)) else row
                                           for row in table])
        self.validate()

    @property
    def n_partitions(self) -> int:
        return len(self.partition_names)

    def validate(self) -> None:
        """Raise :class:`ContractError` naming the first value out of its range."""
        names, n = self.partition_names, len(self.partition_names)
        if n == 0 or not all(isinstance(x, str) and x for x in names) or len(set(names)) != n:
            raise ContractError(f"metadata partition_names must be distinct non-empty names, "
                                f"got {n} names ({len(set(map(str, names)))} distinct)")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ContractError(f"metadata dim must be an integer >= 1, got {self.dim!r}")
        if not isinstance(self.layout_id, str) or not self.layout_id:
            raise ContractError(f"metadata layout_id must be a non-empty string, "
                                f"got {self.layout_id!r}")
        if self.router_kind not in ROUTER_KINDS:
            raise ContractError(f"metadata router_kind must be one of {', '.join(ROUTER_KINDS)}, "
                                f"got {self.router_kind!r}")
        if self.metric not in METRICS:
            raise ContractError(f"metadata metric must be one of {', '.join(METRICS)}, "
                                f"got {self.metric!r}")
        if self.nprobe is not None and (isinstance(self.nprobe, bool) or
                                        not isinstance(self.nprobe, int) or
                                        not 1 <= self.nprobe <= n):
            raise ContractError(f"metadata nprobe {self.nprobe} is outside [1, {n}] "
                                "(the number of partitions)")
        if not (_finite_number(self.temperature) and self.temperature > 0):
            raise ContractError(f"metadata temperature must be finite and > 0, "
                                f"got {self.temperature}")
        self._check_recall_table()
        model = self.stopping_model
        if model is not None:
            if not isinstance(model, StoppingModel) or len(model.coef) != N_FEATURES:
                raise ContractError(f"metadata stopping_model must be a stopping model with "
                                    f"{N_FEATURES} coefficients, got {model!r}")
            if not all(map(_finite_number, [*model.coef, model.intercept])):
                raise ContractError("metadata stopping_model has non-finite coefficients")
        for key in ("metrics", "extra"):
            if not isinstance(getattr(self, key), dict):
                raise ContractError(f"metadata {key} must be a JSON object, "
                                    f"got {type(getattr(self, key)).__name__}")

    def _check_recall_table(self) -> None:
        table, n = self.recall_thresholds, self.n_partitions
        if not isinstance(table, list):
            raise ContractError(f"metadata recall_thresholds must be a list of (threshold, recall, "
                                f"mean partitions) rows, got {type(table).__name__}")
        for row in table:
            ok = isinstance(row, list) and len(row) == 3 and all(map(_finite_number, row))
            if not ok or not (0 <= row[0] <= 1 and 0 <= row[1] <= 1 and 1 <= row[2] <= n):
                raise ContractError(f"metadata recall_thresholds row {row!r} is not (threshold in "
                                    f"[0, 1], recall in [0, 1], mean partitions in [1, {n}])")
        # a lower threshold probes a superset of partitions: never less recall, never fewer
        ordered = sorted(table, key=lambda row: -row[0])
        for hi, lo in zip(ordered, ordered[1:]):
            if lo[1] < hi[1] - TABLE_TOLERANCE or lo[2] < hi[2] - TABLE_TOLERANCE:
                raise ContractError(f"metadata recall_thresholds row {lo!r} has less recall or "
                                    f"fewer partitions than row {hi!r} of a higher threshold")

    # ------------------------------------------------------------------ ONNX metadata_props
    def to_onnx(self) -> dict[str, str]:
        """The string ``metadata_props`` of a router file (None-valued keys left out)."""
        out: dict[str, str] = {
            "partition_names": json.dumps(list(self.partition_names)),
            "dim": str(self.dim),
            "layout_id": self.layout_id,
            "metric": self.metric,
            "collection": self.collection,
            "metrics": json.dumps(self.metrics),
            "created_at": self.created_at,
            "package_version": self.package_version,
            "router_kind": self.router_kind,
        }
        if self.nprobe is not None:
            out["nprobe"] = str(self.nprobe)
        out["temperature"] = json.dumps(self.temperature)
        out["recall_thresholds"] = json.dumps(self.recall_thresholds)
        out["stopping_model"] = json.dumps(None if self.stopping_model is None
                                           else self.stopping_model.to_json())
        if self.training is not None:
            out["training"] = json.dumps(self.training, default=str)
        out.update({k: _json(v) for k, v in self.extra.items()})
        return out

    @classmethod
    def from_onnx(cls, props: Mapping[str, str]) -> "RouterMetadata":
        """Read and check the ``metadata_props`` of a router file.

        Raises :class:`ContractError` for a missing or unparsable value (a file
        not exported by this package) and for values out of their range.
        Informational values (``metrics``, ``training``) that do not parse are
        read as empty: they never change routing.
        """
        try:
            missing = [k for k in REQUIRED_KEYS if k not in props]
            if missing:
                raise KeyError(", ".join(missing))
            names = json.loads(props["partition_names"])
            if not isinstance(names, list):
                raise TypeError(f"partition_names is a JSON {type(names).__name__}, not a list")
            nprobe = props.get("nprobe")
            values = dict(
                partition_names=names, dim=int(props["dim"]), layout_id=str(props["layout_id"]),
                metric=str(props["metric"]), collection=str(props.get("collection", "")),
                nprobe=int(nprobe) if nprobe else None,
                temperature=float(props.get("temperature", 1.0)),
                recall_thresholds=json.loads(props.get("recall_thresholds", "[]")),
                stopping_model=StoppingModel.from_json(
                    json.loads(props.get("stopping_model", "null"))),
                created_at=str(props.get("created_at", "")),
                package_version=str(props.get("package_version", "")),
                router_kind=str(props.get("router_kind", "learned")))
        except (KeyError, ValueError, TypeError) as exc:
            raise ContractError(f"lacks valid metadata ({exc}); was it exported by "
                                "milvus-ltr-router?") from exc
        values["metrics"] = _lenient_json(props.get("metrics"), {})
        values["training"] = _lenient_json(props.get("training"), None)
        values["extra"] = {k: v for k, v in props.items() if k not in METADATA_KEYS}
        return cls(**values)

    @classmethod
    def for_layout(cls, layout, collection: str | None = None, **values) -> "RouterMetadata":
        """Metadata of a router scoring ``layout``'s clusters (its clustering, not its storage:
        the same router serves every storage of the same clusters), stamped now."""
        from . import __version__
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in values.items() if k not in known and v is not None}
        values = {k: v for k, v in values.items() if k in known and v is not None}
        values.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        values.setdefault("package_version", __version__)
        return cls(partition_names=tuple(layout.partition_names), dim=int(layout.dim),
                   layout_id=layout.clustering_id, metric=layout.metric,
                   collection=layout.collection if collection is None else collection,
                   extra={**values.pop("extra", {}), **extra}, **values)


def _as_float(value):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _stopping_model(value: dict) -> StoppingModel:
    try:
        return StoppingModel.from_json(value)
    except (KeyError, ValueError, TypeError) as exc:
        raise ContractError(f"metadata stopping_model is not a stopping model ({exc})") from exc


def _lenient_json(text, default):
    if text is None:
        return default
    try:
        value = json.loads(text)
    except ValueError:
        return default
    return value if isinstance(value, dict) else default


def check_signature(inputs: Sequence[tuple[str, Sequence]], outputs: Sequence[str],
                    overridable: Sequence[str], dim: int) -> bool:
    """Check a router graph's inputs ``(name, shape)``, output names and overridable
    initializer names against the contract; return whether it has the adaptive head."""
    if len(inputs) != 1 or inputs[0][0] != QUERY_INPUT:
        raise ContractError(f"expected one input named {QUERY_INPUT!r}, got "
                            f"{[name for name, _ in inputs]}")
    if SCORES_OUTPUT not in outputs:
        raise ContractError(f"no output named {SCORES_OUTPUT!r}")
    shape = list(inputs[0][1])
    if len(shape) != 2 or shape[1] != dim:
        raise ContractError(f"graph input shape {shape} is not [batch, {dim}] (metadata dim {dim})")
    return ADAPTIVE_INPUT in overridable
