import json
import subprocess
import sys

import numpy as np
import pytest

from milvus_ltr_router.errors import InputError
from milvus_ltr_router.export import export_router, linear_router_model, router_metadata
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.router import CentroidRouter, Router, RouterError
from milvus_ltr_router.train import LinearRouterTrainer, multilabel_targets, split_indices


def make_layout(centroids, layout_id="L1", metric="IP"):
    n = len(centroids)
    return Layout(collection="docs", centroids=centroids, partition_names=partition_names_for(n),
                  sizes=np.ones(n, np.int64), metric=metric, algorithm="spherical",
                  dim=centroids.shape[1], layout_id=layout_id)


@pytest.fixture(scope="module")
def trained(small_layout_arrays):
    docs, queries, centroids, parts, nb = small_layout_arrays
    tr, va, te = split_indices(len(queries), seed=0)
    model = LinearRouterTrainer(centroids=centroids, max_epochs=60, patience=8).fit(
        queries[tr], nb.labels[tr], eval_set=(queries[va], nb.labels[va]))
    return model, (tr, va, te)


def test_split_is_64_16_20_and_seeded():
    tr, va, te = split_indices(1000, seed=1)
    assert (len(tr), len(va), len(te)) == (640, 160, 200)
    assert len(np.unique(np.concatenate([tr, va, te]))) == 1000
    np.testing.assert_array_equal(tr, split_indices(1000, seed=1)[0])


def test_learned_router_beats_centroids_on_held_out_real_queries(small_layout_arrays, trained):
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, (tr, va, te) = trained
    layout = make_layout(centroids)
    centroid = CentroidRouter(layout)
    learned_top1 = (np.argmax(model.decision_function(queries[te]), 1) == nb.labels[te]).mean()
    centroid_top1 = (centroid.rank(queries[te], 1)[:, 0] == nb.labels[te]).mean()
    assert model.init_ in ("centroids", "random")
    assert model.coef_.shape == (32, queries.shape[1])
    assert learned_top1 > centroid_top1, (learned_top1, centroid_top1)


def test_centroid_init_starts_at_centroid_routing(small_layout_arrays):
    docs, queries, centroids, parts, nb = small_layout_arrays
    tr, va, _ = split_indices(len(queries))
    m = LinearRouterTrainer(n_partitions=32, centroids=centroids, max_epochs=0,
                            init="centroids").fit(queries[tr], nb.labels[tr],
                                                  eval_set=(queries[va], nb.labels[va]))
    got = np.argsort(-m.decision_function(queries[:50]), 1)[:, :5]
    want = CentroidRouter(make_layout(centroids)).rank(queries[:50], 5)
    np.testing.assert_array_equal(got, want)


def test_multilabel_targets():
    t = multilabel_targets(np.array([[0, 0, 2], [1, -1, 1]]), 3)
    np.testing.assert_allclose(t, [[2 / 3, 0, 1 / 3], [0, 1, 0]])
    mixed = multilabel_targets(np.array([[0, 2, 2], [1, -1, 1]]), 3, top1_weight=0.5)
    np.testing.assert_allclose(mixed, [[0.5 + 1 / 6, 0, 1 / 3], [0, 1, 0]], rtol=1e-6)
    np.testing.assert_allclose(mixed.sum(axis=1), 1, rtol=1e-6)


def test_trainer_rejects_a_top1_weight_outside_0_1(small_layout_arrays):
    docs, queries, centroids, parts, nb = small_layout_arrays
    with pytest.raises(InputError, match=r"top1_weight must be in \[0, 1\], got 1.5"):
        LinearRouterTrainer(centroids=centroids, top1_weight=1.5).fit(
            queries[:50], nb.partitions[:50], eval_set=(queries[50:80], nb.partitions[50:80]))


def test_trainer_params_round_trip_like_scikit_learn(small_layout_arrays):
    from sklearn.base import clone
    _, _, centroids, _, _ = small_layout_arrays
    trainer = LinearRouterTrainer(n_partitions=32, centroids=centroids, metric="L2", lr=0.01,
                                  val_metric="recall", val_nprobe=4, seed=7)
    params = trainer.get_params()
    assert params["lr"] == 0.01 and params["val_nprobe"] == 4 and params["centroids"] is centroids
    assert set(params) >= {"n_partitions", "centroids", "metric", "init", "lr", "batch_size",
                           "max_epochs", "patience", "top1_weight", "val_metric", "val_k", "seed"}
    again = LinearRouterTrainer(**params)
    assert again.get_params() == params
    assert trainer.set_params(lr=0.5, max_epochs=3) is trainer
    assert (trainer.lr, trainer.max_epochs, trainer.seed) == (0.5, 3, 7)
    twin = clone(trainer)
    assert twin is not trainer and twin.get_params()["lr"] == 0.5
    with pytest.raises(ValueError, match="Invalid parameter"):
        trainer.set_params(learning_rate=1.0)


def test_fit_with_eval_set_learns_and_keeps_the_learned_state(small_layout_arrays):
    docs, queries, centroids, parts, nb = small_layout_arrays
    tr, va, te = split_indices(len(queries), seed=0)
    trainer = LinearRouterTrainer(centroids=centroids, init="random", max_epochs=15, patience=15,
                                  lr=0.01, val_metric="recall", val_nprobe=4, val_k=10)
    assert trainer.fit(queries[tr], nb.partitions[tr, :10],
                       eval_set=(queries[va], nb.partitions[va, :10])) is trainer
    assert trainer.coef_.shape == (32, 384) and trainer.intercept_.shape == (32,)
    assert trainer.init_ == "random" and trainer.val_criterion_ == "recall@nprobe=4"
    assert trainer.n_partitions_ == 32 and trainer.n_features_in_ == 384
    scores = [h.val_score for h in trainer.history_]
    assert trainer.best_score_ == max(scores) == scores[trainer.best_epoch_]
    assert trainer.best_score_ > scores[0] + 0.2       # random start: learned from the data
    assert trainer.candidates_ == {"random": trainer.best_score_}
    # the validation criterion is the retrain decision's: routing_quality's recall at nprobe 4
    from milvus_ltr_router.evaluate import routing_quality
    from milvus_ltr_router.labels import Neighbours
    order = np.argsort(-trainer.decision_function(queries[va]), axis=1)[:, :4]
    val_nb = Neighbours(nb.ids[va], nb.scores[va], nb.partitions[va])
    assert routing_quality(order, val_nb, 10).recall == pytest.approx(trainer.best_score_, abs=1e-6)
    assert "coef_" not in LinearRouterTrainer(centroids=centroids).__dict__   # state only from fit


@pytest.mark.parametrize("params, fit_args, message", [
    ({}, {"y": "labels", "eval_set": None}, r"eval_set=\(X_val, y_val\) is required"),
    ({}, {"X": np.ones((10, 384, 1))}, r"X must be a non-empty \[n, dim\] array, got shape"),
    ({}, {"X": np.full((10, 384), np.nan)}, "X holds NaN or inf in 10 rows"),
    ({}, {"y": np.zeros(9, np.int64)}, "y has 9 rows for 10 query vectors"),
    ({}, {"y": np.full(10, 32)}, r"y: the top-1 partition must be in \[0, 31\]"),
    ({}, {"y": np.zeros(10)}, "y must hold integer partition indices, got dtype float64"),
    ({}, {"y": np.full((10, 3), -2)}, r"the top-1 partition must be in \[0, 31\]"),
    ({}, {"eval_set": (np.ones((5, 10)), np.zeros(5, np.int64))},
     "eval_set X_val has dimension 10, expected 384"),
    ({"n_partitions": 16}, {}, "centroids has 32 rows for n_partitions=16"),
    ({"centroids": None}, {}, "n_partitions is needed when no centroids are given"),
    ({"centroids": None, "n_partitions": 32, "init": "centroids"}, {}, "init='centroids' needs"),
    ({"init": "zeros"}, {}, "init must be one of auto, moments, centroids, random, got 'zeros'"),
    ({"val_metric": "mrr"}, {}, "val_metric must be top1 or recall, got 'mrr'"),
    ({"val_nprobe": 33}, {}, "val_nprobe 33 is more than the 32 partitions"),
    ({"lr": -1.0}, {}, r"lr must be a finite number > 0, got -1.0"),
    ({"batch_size": 0}, {}, "batch_size must be an integer >= 1, got 0"),
    ({"max_epochs": 2.5}, {}, "max_epochs must be an integer >= 0, got 2.5"),
    ({"metric": "HAMMING"}, {}, "metric must be one of IP, COSINE, L2"),
])
def test_trainer_refuses_bad_input_naming_it(small_layout_arrays, params, fit_args, message):
    from milvus_ltr_router.errors import EXIT_USAGE, exit_code
    _, queries, centroids, _, nb = small_layout_arrays
    args = {"X": queries[:10], "y": nb.labels[:10],
            "eval_set": (queries[10:15], nb.labels[10:15]), **fit_args}
    if isinstance(args["y"], str):
        args["y"] = nb.labels[:10]
    trainer = LinearRouterTrainer(**{"centroids": centroids, "max_epochs": 1, **params})
    with pytest.raises(InputError, match=message) as info:
        trainer.fit(args["X"], args["y"], eval_set=args["eval_set"])
    assert exit_code(info.value) == EXIT_USAGE
    assert not hasattr(trainer, "coef_")


def test_training_log_names_the_trainer_initialisations(small_layout_arrays, caplog):
    import logging
    docs, queries, centroids, parts, nb = small_layout_arrays
    with caplog.at_level(logging.INFO, logger="milvus_ltr_router.train"):
        LinearRouterTrainer(centroids=centroids, max_epochs=1, val_nprobe=2).fit(
            queries[:300], nb.labels[:300], eval_set=(queries[300:400], nb.labels[300:400]))
    line = next(r.getMessage() for r in caplog.records if r.name == "milvus_ltr_router.train")
    assert "2 initialisation(s) of the trainer" in line and "validation top1@nprobe=2" in line
    assert "centroid-initialised run" in line and "random-initialised run" in line


def test_onnx_export_round_trip(tmp_path, small_layout_arrays, trained):
    import onnx
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, _ = trained
    layout = make_layout(centroids)
    path = export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "r.onnx",
                         metrics={"top1": 0.5}, nprobe=4)
    onnx.checker.check_model(onnx.load(str(path)))
    router = Router.load(path, layout=layout)
    np.testing.assert_allclose(router.scores(queries[:100]), model.decision_function(queries[:100]),
                               rtol=1e-4, atol=1e-4)
    assert router.partition_names == layout.partition_names
    assert router.metadata["metric"] == "IP" and router.default_nprobe == 4
    assert router.metrics == {"top1": 0.5}
    order = router.rank(queries[:10], 3)
    assert order.shape == (10, 3)
    s = router.scores(queries[:10])
    assert (np.take_along_axis(s, order, 1)[:, 0] == s.max(1)).all()
    assert router.partitions(queries[0], 2)[0] == [layout.partition_names[i] for i in order[0, :2]]


def test_calibration_survives_export(tmp_path, small_layout_arrays, trained):
    """Temperature, stopping model and recall table travel in the ONNX metadata."""
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, (tr, va, te) = trained
    layout = make_layout(centroids)
    path = export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "r.onnx")
    fitted = Router.load(path).calibrate(queries[va], nb.partitions[va])
    assert fitted.stopping_model is not None and fitted.recall_thresholds
    path = export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "c.onnx",
                         temperature=fitted.temperature, recall_thresholds=fitted.recall_thresholds,
                         stopping_model=fitted.stopping_model.to_json())
    loaded = Router.load(path)
    assert loaded.stopping_model == fitted.stopping_model
    assert loaded.temperature == fitted.temperature
    want = fitted.route(queries[te[:50]], recall_target=0.8)
    got = loaded.route(queries[te[:50]], recall_target=0.8)
    assert [list(r) for r in got] == [list(r) for r in want]
    assert 1 < np.mean([len(r) for r in got]) < 32


def test_adaptive_head_travels_in_the_same_model(tmp_path, small_layout_arrays, trained):
    """A second head serves recall_target (scores, temperature, stopping model); fixed
    nprobe keeps ranking with the first; a router without one uses its scores for both."""
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, (tr, va, te) = trained
    layout = make_layout(centroids)
    w2 = centroids * 3.0
    b2 = np.linspace(-0.1, 0.1, len(centroids)).astype(np.float32)
    path = export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "h.onnx",
                         adaptive_head=(w2, b2))
    router = Router.load(path, layout=layout)
    assert router.has_adaptive_head
    import onnx
    graph = onnx.load(str(path)).graph       # one head per call: both sit behind one If node
    assert [n.op_type for n in graph.node] == ["If"] and [o.name for o in graph.output] == ["scores"]
    np.testing.assert_allclose(router.scores(queries[:20]), model.decision_function(queries[:20]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(router.adaptive_scores(queries[:20]), queries[:20] @ w2.T + b2,
                               rtol=1e-4, atol=1e-4)
    router = router.calibrate(queries[va], nb.partitions[va])
    expected = np.exp((queries[:5] @ w2.T + b2) / router.temperature)
    np.testing.assert_allclose(router.probabilities(queries[:5]),
                               expected / expected.sum(1, keepdims=True), rtol=1e-3)
    plain = Router.load(export_router(model.coef_, model.intercept_, layout, "docs",
                                      tmp_path / "p.onnx"))
    assert not plain.has_adaptive_head and not CentroidRouter(layout).has_adaptive_head
    np.testing.assert_array_equal(plain.adaptive_scores(queries[:5]), plain.scores(queries[:5]))
    with pytest.raises(ValueError, match="adaptive head weight dim 10 != metadata dim 384"):
        export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "x.onnx",
                      adaptive_head=(w2[:, :10], None))
    with pytest.raises(ValueError, match="adaptive head weight has 5 rows .* 32 partitions"):
        export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "x.onnx",
                      adaptive_head=(w2[:5], None))


def test_router_refuses_bad_input(tmp_path, small_layout_arrays, trained):
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, _ = trained
    layout = make_layout(centroids)
    path = export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "r.onnx")
    router = Router.load(path)
    with pytest.raises(ValueError, match=r"nprobe must be an integer in \[1, 32\]"):
        router.rank(queries[:2], 0)
    with pytest.raises(ValueError, match="nprobe"):
        router.rank(queries[:2], 33)
    with pytest.raises(ValueError, match=r"shape \(2, 10\) do not match the router.s dim=384"):
        router.rank(np.ones((2, 10)), 1)
    # a 3-D batch names its shape, not a dimension that looks equal to the expected one
    with pytest.raises(ValueError, match=r"shape \(2, 1, 384\) do not match the router.s dim=384"):
        router.rank(np.ones((2, 1, 384)), 1)
    with pytest.raises(RouterError, match="trained for layout 'L1'.*'L2'"):
        Router.load(path, layout=make_layout(centroids, layout_id="L2"))
    with pytest.raises(RouterError, match="not found"):
        Router.load(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RouterError, match="not a loadable ONNX model"):
        Router.load(corrupt)


def test_router_refuses_foreign_onnx(tmp_path):
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (tmp_path / "foreign.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(RouterError, match="metadata"):
        Router.load(tmp_path / "foreign.onnx")


def test_l2_centroid_routing_is_nearest_centroid(rng):
    c = rng.standard_normal((20, 6)).astype(np.float32)
    q = rng.standard_normal((30, 6)).astype(np.float32)
    router = CentroidRouter(make_layout(c, metric="L2"))
    want = np.argsort(((q[:, None] - c[None]) ** 2).sum(-1), axis=1)[:, :4]
    np.testing.assert_array_equal(router.rank(q, 4), want)


def test_export_checks_shapes(small_layout_arrays):
    _, _, centroids, _, _ = small_layout_arrays
    meta = router_metadata(make_layout(centroids), "docs")
    assert json.loads(meta["partition_names"])[0] == "c0000"
    with pytest.raises(ValueError, match="rows"):
        linear_router_model(centroids[:5], None, meta)


def test_serving_imports_no_torch():
    code = ("import sys, milvus_ltr_router.client, milvus_ltr_router.router, "
            "milvus_ltr_router.layout, milvus_ltr_router.cli, milvus_ltr_router.evaluate; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_retrain_without_train_extra_names_the_extra(monkeypatch):
    from milvus_ltr_router.retrain import RetrainConfig, RetrainError, retrain
    monkeypatch.setitem(sys.modules, "torch", None)      # as if torch were not installed
    with pytest.raises(RetrainError, match=r"\[train\] extra \(torch is missing\)"):
        retrain(client=None, cfg=RetrainConfig(collection="c"))


def test_rank_single_query_path_matches_batch_path(rng):
    c = rng.standard_normal((50, 8)).astype(np.float32)
    router = CentroidRouter(make_layout(c))
    q = rng.standard_normal((20, 8)).astype(np.float32)
    batch = router.rank(q, 7)
    for i in range(20):
        np.testing.assert_array_equal(router.rank(q[i], 7)[0], batch[i])
    np.testing.assert_array_equal(router.rank(q[:1], 50)[0], np.argsort(-(q[0] @ c.T)))


def test_linear_router_is_public_and_centroid_routing_is_one():
    """A numpy linear router from weights, and centroid routing as LinearRouter.from_layout."""
    from milvus_ltr_router.router import CentroidRouter, LinearRouter
    layout = make_layout(np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32))
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    w, b = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    lin = LinearRouter(w, b, layout.partition_names, layout.layout_id, kind="learned")
    np.testing.assert_allclose(lin.scores(q), q @ w.T + b, rtol=1e-5)
    assert lin.kind == "learned" and lin.rank(q, 3).shape == (5, 3)
    cen = LinearRouter.from_layout(layout)
    assert isinstance(cen, CentroidRouter) and cen.kind == "centroid"
    np.testing.assert_array_equal(cen.rank(q, 4), CentroidRouter(layout).rank(q, 4))
    with pytest.raises(ValueError, match="do not agree"):
        LinearRouter(w, b[:3], layout.partition_names)
    with pytest.raises(ValueError, match="finite"):
        LinearRouter(np.full((16, 8), np.nan), b, layout.partition_names)


# ---------------------------------------------------------------- the ONNX router contract
def contract_metadata(n=8, **changes):
    from milvus_ltr_router.contract import RouterMetadata
    values = dict(partition_names=partition_names_for(n), dim=4, layout_id="L1", metric="IP")
    return RouterMetadata(**{**values, **changes})


@pytest.mark.parametrize("change, message", [
    ({"temperature": 0.0}, "temperature must be finite and > 0"),
    ({"temperature": float("inf")}, "temperature must be finite and > 0"),
    ({"nprobe": 9}, r"nprobe 9 is outside \[1, 8\]"),
    ({"nprobe": 0}, r"nprobe 0 is outside \[1, 8\]"),
    ({"dim": 0}, "dim must be an integer >= 1"),
    ({"metric": "HAMMING"}, "metric must be one of IP, COSINE, L2"),
    ({"layout_id": ""}, "layout_id must be a non-empty string"),
    ({"partition_names": ["a", "a"]}, "distinct non-empty names"),
    ({"partition_names": []}, "distinct non-empty names"),
    ({"recall_thresholds": [[0.5, 1.2, 2.0]]}, "recall_thresholds row"),
    ({"recall_thresholds": [[0.5, 0.9, 9.0]]}, r"mean partitions in \[1, 8\]"),
    ({"recall_thresholds": [[0.5, 0.9, 2.0], [0.1, 0.8, 3.0]]}, "less recall or fewer partitions"),
    ({"recall_thresholds": [[0.5, 0.9, 3.0], [0.1, 0.95, 2.0]]}, "less recall or fewer partitions"),
    ({"stopping_model": {"coef": [0.0] * 3, "intercept": 0.0}}, "not a stopping model"),
    ({"stopping_model": {"coef": [float("nan")] * 8, "intercept": 0.0}}, "non-finite"),
])
def test_contract_rejects_out_of_range_metadata(change, message):
    from milvus_ltr_router.contract import ContractError
    from milvus_ltr_router.errors import EXIT_FAIL, exit_code
    with pytest.raises(ContractError, match=message) as info:
        contract_metadata(**change)
    assert exit_code(info.value) == EXIT_FAIL       # a broken router file is operational


def test_contract_metadata_round_trips_through_onnx_props():
    from milvus_ltr_router.contract import ContractError, RouterMetadata
    meta = contract_metadata(nprobe=np.int64(3), temperature=np.float32(0.5),
                             recall_thresholds=[(0.9, 0.5, 1.0), (0.1, 0.9, 4.0)],
                             stopping_model={"coef": [0.5] * 8, "intercept": -1.0},
                             metrics={"top1": 0.7}, training={"init": "random"},
                             extra={"owner": "team-a"})
    props = meta.to_onnx()
    assert all(isinstance(v, str) for v in props.values()) and props["owner"] == "team-a"
    back = RouterMetadata.from_onnx(props)
    assert back == meta and back.nprobe == 3 and type(back.nprobe) is int
    assert back.recall_thresholds == [[0.9, 0.5, 1.0], [0.1, 0.9, 4.0]]
    with pytest.raises(ContractError, match=r"lacks valid metadata \('layout_id'\)"):
        RouterMetadata.from_onnx({k: v for k, v in props.items() if k != "layout_id"})
    with pytest.raises(ContractError, match="lacks valid metadata"):
        RouterMetadata.from_onnx({**props, "dim": "four"})
    # informational values that do not parse never block routing
    assert RouterMetadata.from_onnx({**props, "metrics": "{not json"}).metrics == {}


def test_export_load_round_trip_goes_through_the_contract(tmp_path, small_layout_arrays, trained):
    from milvus_ltr_router.contract import ContractError, RouterMetadata
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, (tr, va, te) = trained
    layout = make_layout(centroids)
    path = export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "r.onnx",
                         metrics={"top1": 0.5}, nprobe=4, training={"best_epoch": 3})
    router = Router.load(path, layout=layout)
    assert isinstance(router.info, RouterMetadata)
    assert router.info == RouterMetadata.from_onnx(router.metadata)
    assert (router.info.n_partitions, router.info.dim, router.info.nprobe) == (32, 384, 4)
    assert router.info.training == {"best_epoch": 3} and router.info.collection == "docs"
    with pytest.raises(ContractError, match="temperature must be finite and > 0"):
        export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "bad.onnx",
                      temperature=-1.0)
    with pytest.raises(ContractError, match=r"nprobe 40 is outside \[1, 32\]"):
        export_router(model.coef_, model.intercept_, layout, "docs", tmp_path / "bad.onnx",
                      nprobe=40)
    assert not (tmp_path / "bad.onnx").exists()


def test_calibration_returns_a_new_router_and_leaves_the_served_one_alone(tmp_path,
                                                                          small_layout_arrays,
                                                                          trained):
    docs, queries, centroids, parts, nb = small_layout_arrays
    model, (tr, va, te) = trained
    layout = make_layout(centroids)
    served = Router.load(export_router(model.coef_, model.intercept_, layout, "docs",
                                       tmp_path / "r.onnx"), layout=layout)
    before = (served.temperature, served.recall_thresholds, served.stopping_model, served.info)
    calibration = served.fit_calibration(queries[va], nb.partitions[va])
    assert (served.temperature, served.recall_thresholds, served.stopping_model,
            served.info) == before                                        # pure data, nothing set
    calibrated = served.with_calibration(calibration)
    assert calibrated is not served and served.recall_thresholds == []
    assert calibrated.temperature == calibration.temperature != 1.0
    assert calibrated.info.recall_thresholds == calibration.recall_thresholds
    assert calibrated.calibration == calibration
    with pytest.raises(ValueError, match="no recall calibration"):
        served.route(queries[:2], recall_target=0.8)
    assert len(calibrated.route(queries[:2], recall_target=0.8)) == 2
    centroid = CentroidRouter(layout)
    assert centroid.calibrate(queries[va], nb.partitions[va]).recall_thresholds
    assert centroid.recall_thresholds == [] and centroid.temperature == 1.0


def test_serving_does_not_import_the_exporter_and_training_not_serving():
    code = ("import sys, milvus_ltr_router.router, milvus_ltr_router.client; "
            "assert 'milvus_ltr_router.export' not in sys.modules, 'export imported'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    code = ("import sys, milvus_ltr_router.train; "
            "assert 'milvus_ltr_router.router' not in sys.modules, 'router imported'; "
            "assert 'milvus_ltr_router.export' not in sys.modules, 'export imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
