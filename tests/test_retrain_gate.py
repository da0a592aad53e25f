"""Retrain's candidates: the moment router and the learned router over the moments go
through one gate with centroid routing and the live router (milvus-lite, real data)."""
import numpy as np
import pytest

from milvus_ltr_router.evaluate import RoutingQuality
from milvus_ltr_router.registry import ModelRegistry
from milvus_ltr_router.retrain import RetrainConfig, pick_candidate


def q(top1, recall=0.5):
    return RoutingQuality(nprobe=1, top1_accuracy=top1, recall=recall, k=10, mean_probed=1)


def test_pick_candidate_takes_the_best_and_the_trained_router_on_ties():
    assert pick_candidate({"learned": q(0.4), "moments": q(0.5)}, "top1") == "moments"
    assert pick_candidate({"learned": q(0.5), "moments": q(0.5)}, "top1") == "learned"
    assert pick_candidate({"learned": q(0.6, 0.3), "moments": q(0.5, 0.4)}, "recall") == "moments"
    assert pick_candidate({"learned": q(0.1)}, "top1") == "learned"


@pytest.fixture(scope="module")
def gate_docs(tmp_path_factory, fixture_data):
    """milvus-lite with 3,000 MiniLM documents in 24 clusters (moments stored or not: the
    retrain computes them from its read-out), and the fixture's real queries."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.milvus_io import release_lite
    from milvus_ltr_router.writer import create_vector_collection
    tmp = tmp_path_factory.mktemp("gate")
    uri = str(tmp / "gate.db")
    client = MilvusClient(uri)
    create_vector_collection(client, "src", fixture_data.docs[:3000])
    build_layout(client, "src", "docs", n_clusters=24, seed=0)
    for n in (1000, 4000):
        np.save(tmp / f"q{n}.npy", fixture_data.queries[:n])
    yield client, tmp
    client.close()
    release_lite(uri)


def _retrain(client, tmp, models, n_queries, **cfg):
    from milvus_ltr_router import retrain as job
    cfg = {"nprobe": 1, "min_gain": -1.0, "min_queries": 100, **cfg}
    return job.retrain(client, RetrainConfig(
        collection="docs", model_dir=str(models), queries_file=str(tmp / f"q{n_queries}.npy"),
        **cfg))


def test_the_moment_router_wins_over_an_untrained_router(gate_docs, tmp_path):
    """One epoch from the centroid start is centroid routing; the training-free moment
    router beats it on held-out queries and is what gets published."""
    pytest.importorskip("torch")
    from milvus_ltr_router.router import Router
    client, tmp = gate_docs
    result = _retrain(client, tmp, tmp_path / "m", 1000, init="centroids", max_epochs=1,
                      patience=1)
    held_out = result.training["candidates_held_out"]
    assert held_out["moments"] > held_out["learned"] + 0.05
    assert result.decision == "published" and result.training["router_kind"] == "moments"
    assert result.reason.startswith("published moments router")
    router = Router.load(ModelRegistry(tmp_path / "m").current("docs").path)
    assert router.kind == "moments" and router.recall_thresholds
    assert result.training["optimism"] in result.training["optimism_grid"]
    # the table shows all three on the held-out split; the moment router beats centroids
    top1 = {name: rows[0]["top1_accuracy"] for name, rows in result.table.items()}
    assert set(top1) == {"centroid", "learned", "moments"}
    assert top1["moments"] > top1["centroid"] + 0.05


def test_the_learned_router_over_moments_wins_with_enough_queries(gate_docs, tmp_path):
    """Trained from the moment router's start on 2,560 real queries, the learned router
    beats the moment router on the held-out split, and replaces a live moment router."""
    pytest.importorskip("torch")
    from milvus_ltr_router.router import Router
    client, tmp = gate_docs
    models = tmp_path / "m"
    first = _retrain(client, tmp, models, 1000, init="centroids", max_epochs=1, patience=1)
    assert first.training["router_kind"] == "moments"
    result = _retrain(client, tmp, models, 4000, max_epochs=100, min_gain=0.0)
    held_out = result.training["candidates_held_out"]
    assert held_out["learned"] > held_out["moments"]
    assert result.decision == "published" and result.training["router_kind"] == "learned-moments"
    assert result.training["init"] == "moments" and result.baseline == "current"
    assert Router.load(ModelRegistry(models).current("docs").path).kind == "learned-moments"


def test_moments_off_trains_the_linear_router_with_its_adaptive_head(gate_docs, tmp_path):
    pytest.importorskip("torch")
    from milvus_ltr_router.router import Router
    client, tmp = gate_docs
    result = _retrain(client, tmp, tmp_path / "m", 1000, max_epochs=3, moments="off")
    assert result.training["router_kind"] == "learned" and "moments" not in result.table
    router = Router.load(ModelRegistry(tmp_path / "m").current("docs").path)
    assert router.kind == "learned" and router.has_adaptive_head
