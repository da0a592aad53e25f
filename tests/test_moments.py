"""Cluster moments, the moment score and its ONNX export (no server)."""
import json

import numpy as np
import pytest

from milvus_ltr_router.moments import (FIRST_RANK, ClusterMoments, MomentAccumulator,
                                       MomentScorer, cluster_moments, moment_scores, size_factor)


def _clusters(seed=0, L=6, d=12, n=900):
    """Anisotropic Gaussian clusters with very different spreads and sizes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 2 * n // L, L)
    xs, cs = [], []
    for i, m in enumerate(sizes):
        scale = rng.uniform(0.05, 2.0, d) * (1 + 3 * (i % 2))
        xs.append(rng.standard_normal((m, d)) * scale + rng.standard_normal(d))
        cs.append(np.full(m, i))
    order = rng.permutation(int(sizes.sum()))
    return (np.vstack(xs)[order].astype(np.float32), np.concatenate(cs)[order])


def _exact_cov(x, c, L):
    return np.stack([np.cov(x[c == i].T, bias=True) for i in range(L)])


def test_full_rank_moments_are_exact():
    x, c = _clusters()
    L, d = 6, x.shape[1]
    m = cluster_moments(x, c, L, rank=d, block_rows=97)
    assert m.sizes.tolist() == np.bincount(c, minlength=L).tolist()
    np.testing.assert_allclose(m.means, np.stack([x[c == i].mean(0) for i in range(L)]),
                               atol=1e-5)
    q = np.random.default_rng(1).standard_normal((5, d)).astype(np.float32)
    cov = _exact_cov(x, c, L)
    want = np.sqrt(np.einsum("qd,lde,qe->ql", q, cov, q))
    np.testing.assert_allclose(m.spread(q), want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(m.total_variance, np.trace(cov, axis1=1, axis2=2), rtol=1e-4)
    np.testing.assert_allclose(m.diagonal(), np.diagonal(cov, axis1=1, axis2=2), rtol=1e-3,
                               atol=1e-5)


@pytest.mark.parametrize("exact_bytes", [0, 1 << 30], ids=["sketch", "exact"])
def test_top_directions_and_trace(exact_bytes):
    """Streamed in small blocks and centred on a wrong anchor, both the exact second
    moments and a Frequent Directions sketch of 4r rows find the top-r eigenvalues of
    each cluster's covariance (a decaying spectrum, as real embeddings have)."""
    rng = np.random.default_rng(7)
    L, r, d = 6, 4, 40
    spectrum = 3.0 * 0.8 ** np.arange(d)
    xs = [rng.standard_normal((int(n), d)) * np.sqrt(spectrum) @
          np.linalg.qr(rng.standard_normal((d, d)))[0] + rng.standard_normal(d)
          for n in rng.integers(200, 800, L)]
    c = np.concatenate([np.full(len(v), i) for i, v in enumerate(xs)])
    x = np.vstack(xs).astype(np.float32)
    anchors = rng.standard_normal((L, d)).astype(np.float32) * 3
    m = cluster_moments(x, c, L, rank=r, anchors=anchors, block_rows=50,
                        exact_bytes=exact_bytes)
    cov = _exact_cov(x, c, L)
    for i in range(L):
        top = np.sort(np.linalg.eigvalsh(cov[i]))[::-1][:r]
        np.testing.assert_allclose(m.variances[i], top, rtol=0.05 if exact_bytes == 0 else 1e-4)
        assert m.total_variance[i] == pytest.approx(np.trace(cov[i]), rel=1e-3)
        basis = m.bases[i]
        np.testing.assert_allclose(basis @ basis.T, np.eye(r), atol=1e-4)


def test_subset_moves_dropped_directions_to_the_rest():
    x, c = _clusters()
    m = cluster_moments(x, c, 6, rank=8)
    s = m.subset(3)
    assert s.rank == 3
    np.testing.assert_allclose(s.total_variance, m.total_variance, rtol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        m.subset(9)


def test_empty_cluster_and_bad_blocks():
    x, c = _clusters()
    c = np.where(c == 2, 1, c)              # cluster 2 empty
    m = cluster_moments(x, c, 6, rank=3)
    assert m.sizes[2] == 0 and np.isfinite(m.spread(x[:3])).all()
    acc = MomentAccumulator(6, x.shape[1], rank=3)
    with pytest.raises(ValueError, match="cluster ids outside"):
        acc.update(x[:4], np.array([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="does not fit"):
        acc.update(x[:4, :5], np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        ClusterMoments(m.sizes, np.full_like(m.means, np.nan), m.bases, m.variances, m.residual)


def test_moment_score_prefers_the_wide_cluster_of_equal_mean():
    """Two clusters with the same mean: the one spread along the query holds the larger
    inner products, and only the moment score sees it."""
    rng = np.random.default_rng(0)
    d = 8
    narrow = rng.standard_normal((500, d)) * 0.01
    wide = rng.standard_normal((500, d)) * 0.01
    wide[:, 0] += rng.standard_normal(500)          # spread along e0
    x = np.vstack([narrow, wide]).astype(np.float32)
    c = np.repeat([0, 1], 500)
    m = cluster_moments(x, c, 2, rank=2)
    q = np.eye(d, dtype=np.float32)[:1]
    s = moment_scores(m, q)
    assert s[0, 1] > s[0, 0] + 1.0
    best = [float((x[c == i] @ q[0]).max()) for i in range(2)]
    assert best[1] > best[0]
    assert size_factor([0, 1, 2, np.e ** 2])[-1] == pytest.approx(2.0)


@pytest.mark.parametrize("rescore_top", [3, 100])
def test_two_stage_scorer(rescore_top):
    x, c = _clusters(L=6)
    m = cluster_moments(x, c, 6, rank=FIRST_RANK + 2)
    q = np.random.default_rng(3).standard_normal((20, x.shape[1])).astype(np.float32)
    scorer = MomentScorer.from_moments(m, rescore_top=rescore_top)
    s = scorer.scores(q)
    assert s.shape == (20, 6) and np.isfinite(s).all()
    full = moment_scores(m, q)
    if rescore_top >= 6:
        np.testing.assert_allclose(s, full, rtol=1e-4, atol=1e-4)
    else:
        # the re-scored clusters keep their full moment score and rank above all others
        lin = q @ m.means.T
        # stage one: the first FIRST_RANK directions and the diagonal of the rest
        f = FIRST_RANK
        sb = m.scaled_bases()
        rest = m.residual[:, None] + (sb[:, f:] ** 2).sum(axis=1)
        np.testing.assert_allclose(rest + (sb[:, :f] ** 2).sum(axis=1), m.diagonal(),
                                   rtol=1e-4, atol=1e-6)
        var1 = (q * q) @ rest.T + (np.einsum("lfd,qd->qlf", sb[:, :f], q) ** 2).sum(-1)
        np.testing.assert_allclose(scorer.first_spread(q), np.sqrt(var1), rtol=1e-4, atol=1e-5)
        first = lin + size_factor(m.sizes) * np.sqrt(var1)
        top = np.argsort(-first, axis=1)[:, :rescore_top]
        np.testing.assert_allclose(np.take_along_axis(s, top, 1),
                                   np.take_along_axis(full, top, 1), rtol=1e-4, atol=1e-4)
        rest = np.ones_like(s, bool)
        np.put_along_axis(rest, top, False, 1)
        assert (s[rest].reshape(20, -1).max(1) < np.take_along_axis(s, top, 1).min(1)).all()


@pytest.mark.parametrize("rescore_top", [4, 64])
def test_onnx_export_computes_the_numpy_scores(rescore_top):
    pytest.importorskip("onnx")
    import onnxruntime as ort
    from milvus_ltr_router.export import moment_router_model
    x, c = _clusters(L=10, d=16, n=2000)
    m = cluster_moments(x, c, 10, rank=5)
    scorer = MomentScorer.from_moments(m, rescore_top=rescore_top, optimism=1.3)
    meta = {"partition_names": json.dumps([f"p{i}" for i in range(10)]), "dim": "16"}
    model = moment_router_model(scorer, meta)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q = np.random.default_rng(4).standard_normal((7, 16)).astype(np.float32)
    got = sess.run(None, {"query": q})[0]
    np.testing.assert_allclose(got, scorer.scores(q), rtol=1e-4, atol=1e-4)


def test_trainer_with_moments_starts_at_the_moment_router_and_keeps_the_best():
    pytest.importorskip("torch")
    from milvus_ltr_router.train import LinearRouterTrainer
    x, c = _clusters(L=6, d=12, n=3000)
    m = cluster_moments(x, c, 6, rank=4)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((600, 12)).astype(np.float32)
    y = np.argmax(q @ x.T, axis=1)
    y = c[y]
    est = LinearRouterTrainer(n_partitions=6, moments=m, init="moments", max_epochs=0)
    est.fit(q[:400], y[:400], eval_set=(q[400:], y[400:]))
    # no epoch: exactly the moment router, up to the fitted scale
    want = moment_scores(m, q[:5])
    got = est.decision_function(q[:5])
    ratio = got / want
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-3)
    assert est.spread_coef_.shape == (6,) and est.init_ == "moments"
    trained = LinearRouterTrainer(n_partitions=6, moments=m, max_epochs=20, patience=3).fit(
        q[:400], y[:400], eval_set=(q[400:], y[400:]))
    assert set(trained.candidates_) == {"moments"}
    assert trained.best_score_ >= est.best_score_


def test_served_moment_router_scores_large_batches_in_blocks(tmp_path, monkeypatch):
    """A calibration scores thousands of validation queries at once: the second stage's
    gather (m r d floats per query) runs in blocks under GATHER_BYTES, with the same scores."""
    pytest.importorskip("onnx")
    from milvus_ltr_router import router as router_mod
    from milvus_ltr_router.export import export_moment_router
    from milvus_ltr_router.layout import Layout, partition_names_for
    x, c = _clusters(L=10, d=16, n=2000)
    m = cluster_moments(x, c, 10, rank=5)
    scorer = MomentScorer.from_moments(m, rescore_top=4)
    layout = Layout("t", m.means, partition_names_for(10), m.sizes, "IP", "spherical", 16, "lid")
    path = export_moment_router(scorer, layout, "t", tmp_path / "m.onnx")
    served = router_mod.Router.load(path)
    assert served.info.training["rank"] == 5 and served.info.training["rescore_top"] == 4
    monkeypatch.setattr(router_mod, "GATHER_BYTES", 3 * 4 * 16 * 5 * 4)   # 3 queries a run
    assert served._block_rows() == 3
    runs = []
    real_run = served._session.run
    monkeypatch.setattr(served._session, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k),
                        raising=False)
    q = np.random.default_rng(5).standard_normal((10, 16)).astype(np.float32)
    np.testing.assert_allclose(served.scores(q), scorer.scores(q), rtol=1e-4, atol=1e-4)
    assert len(runs) == 4
