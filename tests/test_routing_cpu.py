"""The routing hot path's CPU savings (issue 21 item 2) change no score: a served moment
router's scores do not depend on how many queries share a run of its graph, and the numpy
scorer's stage one is bit for bit what it computed before its first directions were kept."""
import numpy as np
import pytest

from milvus_ltr_router.moments import MomentScorer, cluster_moments


def _moments(L=10, d=16, rank=5):
    rng = np.random.default_rng(0)
    c = rng.integers(0, L, 2000)
    x = (rng.standard_normal((L, d)) * 3)[c] + rng.standard_normal((2000, d)) * rng.uniform(
        0.2, 2.0, (L, d))[c]
    x = x.astype(np.float32)
    return cluster_moments(x, c, L, rank=rank)


def test_first_spread_is_bitwise_the_uncached_product():
    scorer = MomentScorer.from_moments(_moments(), rescore_top=4)
    q = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    L, _, d = scorer.scaled_bases.shape
    f = scorer.first_rank
    for rows in (q[:1], q):
        proj = (rows @ scorer.scaled_bases[:, :f].reshape(L * f, d).T).reshape(len(rows), L, f)
        var = (rows * rows) @ scorer.first_rest.T + np.einsum("qlf,qlf->ql", proj, proj)
        assert np.array_equal(scorer.first_spread(rows), np.sqrt(np.maximum(var, 0.0)))
    # the kept directions follow a replaced sketch
    scorer.scaled_bases = scorer.scaled_bases * 2
    again = MomentScorer(scorer.weight, scorer.bias, scorer.spread_weight, scorer.scaled_bases,
                         scorer.residual, scorer.first_rest, scorer.rescore_top, scorer.first_rank)
    assert np.array_equal(scorer.first_spread(q), again.first_spread(q))


def test_served_moment_router_scores_do_not_depend_on_the_block(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from milvus_ltr_router import router as router_mod
    from milvus_ltr_router.export import export_moment_router
    from milvus_ltr_router.layout import Layout, partition_names_for
    m = _moments()
    scorer = MomentScorer.from_moments(m, rescore_top=4)
    layout = Layout("t", m.means, partition_names_for(10), m.sizes, "IP", "spherical", 16, "lid")
    served = router_mod.Router.load(export_moment_router(scorer, layout, "t", tmp_path / "m.onnx"))
    q = np.random.default_rng(5).standard_normal((33, 16)).astype(np.float32)
    by_block = {}
    for gather in (1, 3 * 4 * 16 * 5 * 4, 1 << 30):
        monkeypatch.setattr(router_mod, "GATHER_BYTES", gather)
        by_block[served._block_rows()] = (served.scores(q), served.rank(q, 4))
    assert sorted(by_block)[:2] == [1, 3] and sorted(by_block)[2] >= len(q)   # 33, 11 and 1 runs
    whole = by_block[max(by_block)]
    for scores, ranked in by_block.values():
        assert np.array_equal(scores, whole[0]) and np.array_equal(ranked, whole[1])
