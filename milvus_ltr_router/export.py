"""Export a linear router ``scores = W q + b`` to ONNX, with the metadata serving needs.

The graph is built with :mod:`onnx` directly from numpy arrays, so exporting
needs no torch, and the centroid scorer can be exported the same way. What the
file holds - tensor names, the optional ``adaptive`` input of a router with a
second head trained for adaptive nprobe (see :mod:`.retrain`), the metadata
and its checks - is the contract in :mod:`.contract`, which serving reads
without importing this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .contract import ADAPTIVE_INPUT, QUERY_INPUT, SCORES_OUTPUT, RouterMetadata
from .errors import InputError

OPSET = 17
IR_VERSION = 8   # old enough for any onnxruntime >= 1.14


def router_metadata(layout, collection: str, metrics: dict | None = None,
                    nprobe: int | None = None, **values) -> dict[str, str]:
    """The ``metadata_props`` of a router for ``layout``, checked by
    :class:`~.contract.RouterMetadata` (a value out of range raises
    :class:`~.contract.ContractError`). ``values`` are further metadata:
    ``temperature``, ``recall_thresholds``, ``stopping_model``, ``training``."""
    return RouterMetadata.for_layout(layout, collection, metrics=metrics or {},
                                     nprobe=nprobe or None, **values).to_onnx()


def _check_head(weight, bias, metadata: dict[str, str], what: str = "router"
                ) -> tuple[np.ndarray, np.ndarray | None]:
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise InputError(f"{what} weight must be a [partitions, dim] matrix, got shape "
                         f"{weight.shape}")
    n_parts, dim = weight.shape
    if str(dim) != metadata.get("dim", str(dim)):
        raise InputError(f"{what} weight dim {dim} != metadata dim {metadata['dim']}")
    names = json.loads(metadata.get("partition_names", "[]"))
    if names and len(names) != n_parts:
        raise InputError(f"{what} weight has {n_parts} rows but metadata names {len(names)} "
                         "partitions")
    if bias is None:
        return weight, None
    bias = np.asarray(bias, dtype=np.float32)
    if bias.size != n_parts:
        raise InputError(f"{what} bias has {bias.size} values for {n_parts} partitions")
    return weight, bias.reshape(n_parts)


def linear_router_model(weight: np.ndarray, bias: np.ndarray | None,
                        metadata: RouterMetadata | dict[str, str],
                        adaptive_head: tuple[np.ndarray, np.ndarray | None] | None = None):
    """An :class:`onnx.ModelProto` computing ``scores = query @ weight.T + bias``; checked.

    ``metadata`` is a :class:`~.contract.RouterMetadata` or the raw string
    ``metadata_props`` (written as given: tests use that to make broken files).

    With ``adaptive_head = (weight, bias)`` the graph holds both heads behind an
    ``If`` on the optional boolean input ``adaptive`` (an initializer defaulting
    to false): a call computes one head only, so the fixed-nprobe hot path costs
    what a single-head router costs, and readers that never pass ``adaptive``
    get the fixed head.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(metadata, RouterMetadata):
        metadata = metadata.to_onnx()
    heads = [("", *_check_head(weight, bias, metadata))]
    if adaptive_head is not None:
        heads.append(("adaptive_", *_check_head(*adaptive_head, metadata, "adaptive head")))
    n_parts, dim = heads[0][1].shape
    inits, branches = [], []
    for prefix, w, b in heads:
        if w.shape != (n_parts, dim):
            raise InputError(f"{prefix}head has shape {w.shape}, expected {(n_parts, dim)}")
        out = SCORES_OUTPUT if adaptive_head is None else f"{prefix}head_scores"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{prefix}W_T"))
        nodes = [helper.make_node("MatMul", [QUERY_INPUT, f"{prefix}W_T"],
                                  [out if b is None else f"{prefix}qw"])]
        if b is not None:
            inits.append(numpy_helper.from_array(b, f"{prefix}b"))
            nodes.append(helper.make_node("Add", [f"{prefix}qw", f"{prefix}b"], [out]))
        branches.append((nodes, helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                              ["batch", n_parts])))
    inputs = [helper.make_tensor_value_info(QUERY_INPUT, TensorProto.FLOAT, ["batch", dim])]
    if adaptive_head is None:
        nodes = branches[0][0]
    else:
        (fixed_nodes, fixed_out), (adaptive_nodes, adaptive_out) = branches
        inits.append(numpy_helper.from_array(np.array(False), ADAPTIVE_INPUT))
        inputs.append(helper.make_tensor_value_info(ADAPTIVE_INPUT, TensorProto.BOOL, []))
        nodes = [helper.make_node(
            "If", [ADAPTIVE_INPUT], [SCORES_OUTPUT],
            then_branch=helper.make_graph(adaptive_nodes, "adaptive_head", [], [adaptive_out]),
            else_branch=helper.make_graph(fixed_nodes, "fixed_head", [], [fixed_out]))]
    graph = helper.make_graph(
        nodes, "linear_router", inputs,
        [helper.make_tensor_value_info(SCORES_OUTPUT, TensorProto.FLOAT, ["batch", n_parts])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="milvus-ltr-router")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model


def save_model(model, path: str | os.PathLike) -> Path:
    """Write atomically (temp file then rename): a reader never sees half a model."""
    return write_atomic(path, model.SerializeToString())


def export_router(weight, bias, layout, collection: str, path, metrics: dict | None = None,
                  nprobe: int | None = None, adaptive_head=None, **values) -> Path:
    """Export and save a linear router for ``layout``; returns the written path.

    ``values`` are further metadata (see :func:`router_metadata`), e.g. the
    calibration: ``**Calibration.to_metadata()``. Nothing is written when a
    value breaks the contract (:class:`~.contract.ContractError`) or the
    weights do not fit the layout (:class:`~.errors.InputError`).
    """
    meta = router_metadata(layout, collection, metrics=metrics, nprobe=nprobe, **values)
    return save_model(linear_router_model(weight, bias, meta, adaptive_head), path)


def moment_router_model(scorer, metadata: RouterMetadata | dict[str, str]):
    """An :class:`onnx.ModelProto` computing :class:`~.moments.MomentScorer` scores; checked.

    ``scores = W q + b + a * spread(q)``: with ``rescore_top >= L`` every cluster's
    spread comes from its rank-``r`` sketch (one ``[d, L r]`` MatMul); otherwise in two
    stages - every cluster scored with stage one's spread (its first directions and the
    diagonal of the rest: :meth:`~.moments.MomentScorer.first_spread`), the top ``rescore_top``
    re-scored with their sketch (TopK, Gather, batched MatMul) and scattered back above
    the rest, as the numpy scorer does.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(metadata, RouterMetadata):
        metadata = metadata.to_onnx()
    weight, bias = _check_head(scorer.weight, scorer.bias, metadata, "moment router")
    n_parts, dim = weight.shape
    scaled = np.asarray(scorer.scaled_bases, np.float32)
    rank = scaled.shape[1]
    if scaled.shape != (n_parts, rank, dim):
        raise InputError(f"moment router bases have shape {scaled.shape}, expected "
                         f"[{n_parts}, rank, {dim}]")
    m = scorer.candidates
    arr = numpy_helper.from_array
    inits = [arr(np.ascontiguousarray(weight.T), "W_T"),
             arr(np.zeros(n_parts, np.float32) if bias is None else bias, "b"),
             arr(np.asarray(scorer.spread_weight, np.float32), "a"),
             arr(np.asarray(scorer.residual, np.float32), "residual"),
             arr(np.array([1], np.int64), "axis1"), arr(np.array([2], np.int64), "axis2")]
    node = helper.make_node
    nodes = [node("MatMul", [QUERY_INPUT, "W_T"], ["qw"]), node("Add", ["qw", "b"], ["lin"]),
             node("Mul", [QUERY_INPUT, QUERY_INPUT], ["q2"]),
             node("ReduceSum", ["q2", "axis1"], ["qsq"], keepdims=1)]          # [B, 1]

    def spread(proj, resid, out):     # sqrt(sum_r proj^2 + residual * ||q||^2)
        return [node("Mul", [proj, proj], [f"{out}_p2"]),
                node("ReduceSum", [f"{out}_p2", "axis2"], [f"{out}_v"], keepdims=0),
                node("Mul", [resid, "qsq"], [f"{out}_rq"]),
                node("Add", [f"{out}_v", f"{out}_rq"], [f"{out}_var"]),
                node("Relu", [f"{out}_var"], [f"{out}_pos"]),
                node("Sqrt", [f"{out}_pos"], [out])]

    if m >= n_parts:
        inits += [arr(np.ascontiguousarray(scaled.reshape(n_parts * rank, dim).T), "V_T"),
                  arr(np.array([-1, n_parts, rank], np.int64), "shape_blr")]
        nodes += [node("MatMul", [QUERY_INPUT, "V_T"], ["proj_flat"]),
                  node("Reshape", ["proj_flat", "shape_blr"], ["proj"]),
                  *spread("proj", "residual", "sd"),
                  node("Mul", ["a", "sd"], ["asd"]),
                  node("Add", ["lin", "asd"], [SCORES_OUTPUT])]
    else:
        f = int(scorer.first_rank)
        inits += [arr(scaled, "V"), arr(np.ascontiguousarray(
                      np.asarray(scorer.first_rest, np.float32).T), "rest_T"),
                  arr(np.array([m], np.int64), "m"),
                  arr(np.array([0, m * rank, dim], np.int64), "shape_bkd"),
                  arr(np.array([0, m, rank], np.int64), "shape_bmr"),
                  arr(np.array(1.0, np.float32), "one")]
        # stage one: the first f directions of every cluster (one [d, L f] MatMul) and the
        # diagonal of the rest (one [d, L] MatMul of the squared query)
        inits += [arr(np.ascontiguousarray(scaled[:, :f].reshape(n_parts * f, dim).T), "V1_T"),
                  arr(np.array([-1, n_parts, f], np.int64), "shape_blf")]
        nodes += [node("MatMul", ["q2", "rest_T"], ["dvar"]),                 # [B, L]
                  node("MatMul", [QUERY_INPUT, "V1_T"], ["p1_flat"]),
                  node("Reshape", ["p1_flat", "shape_blf"], ["p1"]),          # [B, L, f]
                  node("Mul", ["p1", "p1"], ["p1_2"]),
                  node("ReduceSum", ["p1_2", "axis2"], ["p1_v"], keepdims=0),
                  node("Add", ["dvar", "p1_v"], ["fvar"]),
                  node("Relu", ["fvar"], ["dvar_pos"]),
                  node("Sqrt", ["dvar_pos"], ["dsd"]),
                  node("Mul", ["a", "dsd"], ["dterm"]),
                  node("Add", ["lin", "dterm"], ["first"]),
                  node("TopK", ["first", "m"], ["first_top", "top"], axis=1),
                  node("Gather", ["V", "top"], ["Vg"], axis=0),                 # [B, m, r, d]
                  node("Reshape", ["Vg", "shape_bkd"], ["Vg_flat"]),            # [B, m r, d]
                  node("Unsqueeze", [QUERY_INPUT, "axis2"], ["q_col"]),         # [B, d, 1]
                  node("MatMul", ["Vg_flat", "q_col"], ["proj_col"]),           # [B, m r, 1]
                  node("Reshape", ["proj_col", "shape_bmr"], ["proj"]),         # [B, m, r]
                  node("Gather", ["residual", "top"], ["resid_top"], axis=0),
                  *spread("proj", "resid_top", "sd"),
                  node("Gather", ["a", "top"], ["a_top"], axis=0),
                  node("Mul", ["a_top", "sd"], ["asd"]),
                  node("GatherElements", ["lin", "top"], ["lin_top"], axis=1),
                  node("Add", ["lin_top", "asd"], ["second"]),
                  node("ReduceMax", ["first"], ["first_max"], axes=[1], keepdims=1),
                  node("ReduceMin", ["second"], ["second_min"], axes=[1], keepdims=1),
                  node("Sub", ["first_max", "second_min"], ["gap"]),
                  node("Add", ["gap", "one"], ["shift"]),
                  node("Sub", ["first", "shift"], ["below"]),
                  node("ScatterElements", ["below", "top", "second"], [SCORES_OUTPUT], axis=1)]
    graph = helper.make_graph(
        nodes, "moment_router",
        [helper.make_tensor_value_info(QUERY_INPUT, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(SCORES_OUTPUT, TensorProto.FLOAT, ["batch", n_parts])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="milvus-ltr-router")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model


def export_moment_router(scorer, layout, collection: str, path, metrics: dict | None = None,
                         nprobe: int | None = None, router_kind: str = "moments",
                         **values) -> Path:
    """Export and save a :class:`~.moments.MomentScorer` for ``layout`` (the moment router,
    or a learned router over the moment features with ``router_kind="learned-moments"``);
    returns the written path. Nothing is written when a value breaks the contract."""
    # the sketch's rank and second-stage size: what a served router's runs gather per query
    training = {**(values.pop("training", None) or {}), "rank": int(scorer.scaled_bases.shape[1]),
                "rescore_top": int(scorer.candidates)}
    meta = router_metadata(layout, collection, metrics=metrics, nprobe=nprobe,
                           router_kind=router_kind, training=training, **values)
    return save_model(moment_router_model(scorer, meta), path)
