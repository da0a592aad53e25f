"""Bad routing arguments raise pymilvus's exception types (and ValueError), the same way
whatever serves the collection; nprobe above the cluster count is clipped, explicit or default."""
import asyncio
import math

import numpy as np
import pytest
from pymilvus import AnnSearchRequest, RRFRanker
from pymilvus.exceptions import MilvusException, ParamError

from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.errors import InputError
from milvus_ltr_router.plan import ProbeArgumentError, check_probe_args, probe_clusters

BAD = [dict(nprobe=0), dict(nprobe=-1), dict(nprobe=2.5), dict(nprobe="3"), dict(nprobe=True),
       dict(recall_target=0), dict(recall_target=1.5), dict(recall_target=math.nan),
       dict(recall_target="high"), dict(recall_target=-0.1),
       dict(min_nprobe=0), dict(max_nprobe=0), dict(min_nprobe=4, max_nprobe=2)]


class _Router:
    """A router that ranks clusters 0..L-1 in order; calibrated or not."""

    def __init__(self, calibrated: bool, n: int = 8):
        self.n_partitions = n
        self.recall_thresholds = [(0.5, 0.9, 2.0), (0.1, 0.99, 5.0)] if calibrated else []

    def rank(self, queries, nprobe):
        assert 1 <= nprobe <= self.n_partitions
        return np.tile(np.arange(nprobe), (len(queries), 1))

    def rank_adaptive(self, queries, recall_target, min_nprobe, max_nprobe):
        assert 1 <= min_nprobe <= self.n_partitions
        return [np.arange(min_nprobe) for _ in queries]


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_routing_arguments_are_refused_whatever_the_router(bad, calibrated):
    with pytest.raises(ProbeArgumentError):
        probe_clusters(_Router(calibrated), np.zeros((2, 4), np.float32), 3, **bad)
    with pytest.raises(ValueError):
        check_probe_args(**bad)


@pytest.mark.parametrize("calibrated", [False, True])
def test_nprobe_above_the_cluster_count_is_clipped(calibrated):
    q = np.zeros((2, 4), np.float32)
    assert probe_clusters(_Router(calibrated), q, 3, nprobe=50).shape == (2, 8)
    assert probe_clusters(_Router(calibrated), q, 3, nprobe=np.int64(8)).shape == (2, 8)
    assert [len(r) for r in probe_clusters(_Router(True), q, 3, recall_target=0.9,
                                           min_nprobe=20)] == [8, 8]


@pytest.fixture
def routed(lite, tmp_path):
    client = RoutedMilvusClient(lite, model_dir=str(tmp_path / "models"), nprobe=3, log_rate=0)
    yield client
    client.close()


def _assert_pymilvus_param_error(exc):
    assert isinstance(exc, MilvusException) and isinstance(exc, ParamError)
    assert isinstance(exc, InputError) and isinstance(exc, ValueError)


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_routed_calls_raise_pymilvus_types_for_bad_arguments(routed, fixture_data, bad):
    q = fixture_data.queries[:2]
    layout = routed.layout("docs")
    calls = {
        "search": lambda: routed.search("docs", q.tolist(), limit=5, **bad),
        "route": lambda: routed.route("docs", q, **bad),
        "hybrid_search": lambda: routed.hybrid_search(
            "docs", [AnnSearchRequest(q.tolist(), layout.vector_field,
                                      {"metric_type": layout.metric}, 5)], RRFRanker(), 5, **bad),
        "search_iterator": lambda: routed.search_iterator("docs", q[:1].tolist(), batch_size=5,
                                                          **bad),
    }
    for name, call in calls.items():
        with pytest.raises(MilvusException) as err:
            call()
        _assert_pymilvus_param_error(err.value)


def test_explicit_and_default_nprobe_above_L_both_search_every_cluster(lite, routed, fixture_data,
                                                                       tmp_path):
    q = fixture_data.queries[:4].tolist()
    L = routed.layout("docs").n_clusters
    full = routed.search("docs", q, limit=10, nprobe=L)
    explicit = routed.search("docs", q, limit=10, nprobe=L + 5)
    wide = RoutedMilvusClient(lite, model_dir=str(tmp_path / "models"), nprobe=L + 5, log_rate=0)
    try:
        default = wide.search("docs", q, limit=10)
        assert wide.router_status("docs")["nprobe"] == L
    finally:
        wide.close()
    ids = [[[h["id"] for h in hits] for hits in r] for r in (full, explicit, default)]
    assert ids[0] == ids[1] == ids[2]
    assert routed.route("docs", q[0], nprobe=L + 5)[0] == routed.route("docs", q[0], nprobe=L)[0]


@pytest.mark.parametrize("nprobe", [0, -2, 1.5])
def test_constructor_nprobe_is_refused_with_pymilvus_types(lite, tmp_path, nprobe):
    with pytest.raises(MilvusException) as err:
        RoutedMilvusClient(lite, model_dir=str(tmp_path / "m"), nprobe=nprobe, log_rate=0)
    _assert_pymilvus_param_error(err.value)


def test_async_client_raises_pymilvus_types_for_bad_arguments(lite, fixture_data, tmp_path):
    q = fixture_data.queries[:2].tolist()

    async def go():
        client = AsyncRoutedMilvusClient(lite, model_dir=str(tmp_path / "m"), nprobe=3, log_rate=0)
        try:
            for bad in (dict(nprobe=0), dict(recall_target=1.5), dict(recall_target=math.nan)):
                with pytest.raises(MilvusException) as err:
                    await client.search("docs", q, limit=5, **bad)
                _assert_pymilvus_param_error(err.value)
            L = (await client.layout("docs")).n_clusters
            assert (await client.route("docs", q, nprobe=L + 3)) == \
                (await client.route("docs", q, nprobe=L))
        finally:
            await client.close()
    asyncio.run(go())
    with pytest.raises(MilvusException):
        AsyncRoutedMilvusClient(lite, model_dir=str(tmp_path / "m"), nprobe=0, log_rate=0)
