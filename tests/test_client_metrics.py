"""Issue 24's client metrics and live recall, wired into both routed clients (and issue 21's
batch-planning bookkeeping, which the sync client now takes from ``SearchPlanner``).

On milvus-lite: 'src' (1,500 MiniLM documents, ids = row numbers) laid out as 'docs' (8
clusters, partition storage; the module-scoped ``lite`` fixture). Metrics go to a fresh
``CollectorRegistry`` per test; expected values are computed independently of the client
(the batch planner called directly, exact neighbours by numpy).
"""
import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
from milvus_ltr_router.batching import StorageFacts, max_queries_for, plan_batches
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.live_stats import read_live_recall
from milvus_ltr_router.metrics import NullMetrics
from milvus_ltr_router.querylog import QueryLogger
from milvus_ltr_router.search_planning import SearchPlanner, passthrough_reason, probed_counts
from milvus_ltr_router.serving import RoutedParamError

prom = pytest.importorskip("prometheus_client")

N_DOCS = 1500


def routed(uri, tmp_path, **kwargs):
    options = dict(model_dir=str(tmp_path / "models"), nprobe=3, log_rate=0)
    options.update(kwargs)
    return RoutedMilvusClient(uri, **options)


def value(registry, name, **labels):
    return registry.get_sample_value(f"milvus_ltr_router_{name}", labels)


def served_ids(result):
    return [[h["id"] for h in hits] for hits in result]


def offline_recall(docs, queries, served, k=10, min_id=None):
    """Mean recall@k of ``served`` ids against numpy's exact inner-product top-k (ids are row
    numbers; ``min_id``: the filter ``id >= min_id`` per query, None: none)."""
    scores = queries @ docs.T
    values = []
    for i, ids in enumerate(served):
        row = scores[i].copy()
        if min_id is not None and min_id[i] is not None:
            row[:min_id[i]] = -np.inf
        truth = set(np.argsort(-row)[:k].tolist())
        values.append(len(truth & set(ids[:k])) / k)
    return float(np.mean(values))


# ------------------------------------------------------------------------------ metrics
def test_a_routed_search_counts_the_search_its_queries_and_histograms(lite, fixture_data,
                                                                      tmp_path):
    registry = prom.CollectorRegistry()
    client = routed(lite, tmp_path, metrics=registry)
    try:
        kind = client.router("docs").kind
        queries = fixture_data.queries[:20]
        client.search("docs", data=queries, limit=5)                 # a batch, nprobe 3
        client.search("docs", data=[queries[0].tolist()], limit=5, nprobe=2)
        assert value(registry, "searches_total", collection="docs", routed="true") == 2
        assert value(registry, "searches_total", collection="docs", routed="false") is None
        assert value(registry, "routed_queries_total", collection="docs", router=kind) == 21
        assert value(registry, "probed_clusters_count", collection="docs") == 21
        assert value(registry, "probed_clusters_sum", collection="docs") == 20 * 3 + 2
        assert value(registry, "probed_clusters_bucket", collection="docs", le="2.0") == 1
        assert value(registry, "probed_clusters_bucket", collection="docs", le="3.0") == 21
        for hist in ("routing_seconds", "search_seconds"):
            assert value(registry, f"{hist}_count", collection="docs") == 2
            assert value(registry, f"{hist}_sum", collection="docs") > 0
        assert value(registry, "search_errors_total", collection="docs") is None
        # the routing table records what serves the collection (no router published)
        assert value(registry, "fallbacks_total", collection="docs", reason="no_router") == 1
        assert value(registry, "router_info", collection="docs", version="", kind=kind,
                     fallback_reason="no_router") == 1
    finally:
        client.close()


def test_a_pass_through_is_counted_with_its_reason(lite, fixture_data, tmp_path):
    registry = prom.CollectorRegistry()
    client = routed(lite, tmp_path, metrics=registry)
    try:
        q = [fixture_data.queries[0].tolist()]
        client.load_collection("src")                  # a reopened lite file: load it first
        assert len(client.search("src", data=q, limit=3)[0]) == 3
        part = client.layout("docs").partition_names[0]
        assert client.search("docs", data=q, limit=3, partition_names=[part])
        with pytest.raises(Exception):                 # no such field: pymilvus's own error
            client.search("docs", data=q, limit=3, anns_field="no_such_field")
        assert value(registry, "passthrough_searches_total", collection="src",
                     reason="no_layout") == 1
        assert value(registry, "passthrough_searches_total", collection="docs",
                     reason="partition_names") == 1
        assert value(registry, "passthrough_searches_total", collection="docs",
                     reason="anns_field") == 1
        assert value(registry, "searches_total", collection="docs", routed="false") == 2
        assert value(registry, "searches_total", collection="docs", routed="true") is None
        assert value(registry, "routed_queries_total", collection="docs",
                     router=client.router("docs").kind) is None
    finally:
        client.close()


def test_passthrough_reasons_match_what_is_routable():
    from milvus_ltr_router.plan import search_is_routable
    cases = [([[1.0]], None, None, ()), ([[1.0]], ["p"], None, ()), ([[1.0]], None, [1], ()),
             (None, None, None, ()), ([[1.0]], None, None, ("ranker",))]
    reasons = [passthrough_reason(*c) for c in cases]
    assert reasons == [None, "partition_names", "ids", "no_data", "positional_args"]
    assert [r is None for r in reasons] == [search_is_routable(*c) for c in cases]
    assert probed_counts(np.zeros((3, 4))).tolist() == [4, 4, 4]
    assert probed_counts([np.arange(2), np.arange(5)]).tolist() == [2, 5]


def test_a_failed_routed_search_is_counted_and_still_raises(lite, tmp_path):
    registry = prom.CollectorRegistry()
    client = routed(lite, tmp_path, metrics=registry)
    try:
        with pytest.raises(RoutedParamError):
            client.search("docs", data=[[0.1, 0.2]], limit=3)      # wrong dimension
        assert value(registry, "search_errors_total", collection="docs") == 1
        assert value(registry, "searches_total", collection="docs", routed="true") is None
    finally:
        client.close()


def test_a_failing_recorder_never_fails_a_search(lite, fixture_data, tmp_path):
    class Broken(NullMetrics):
        enabled = True

        def search_routed(self, *a):
            raise RuntimeError("metrics down")
        search_passed_through = query_log = router_info = fallback = search_routed

    client = routed(lite, tmp_path, metrics=Broken(), log_rate=1.0)
    try:
        res = client.search("docs", data=fixture_data.queries[:3], limit=4)
        assert [len(r) for r in res] == [4, 4, 4]
        assert client.flush_query_log(30)
    finally:
        client.close()


def test_query_log_counts_sampled_written_and_dropped(lite, fixture_data, tmp_path):
    registry = prom.CollectorRegistry()
    client = routed(lite, tmp_path, metrics=registry, log_rate=1.0)
    try:
        client.search("docs", data=fixture_data.queries[:5], limit=3)
        assert client.flush_query_log(60)
        assert value(registry, "query_log_sampled_total", collection="docs") == 5
        assert value(registry, "query_log_written_total", collection="docs") == 5
        assert value(registry, "query_log_dropped_total", collection="docs") is None
    finally:
        client.close()
    # a full queue and NaN rows are dropped and counted; a failed write is counted
    release, calls = threading.Event(), []

    class Slow:
        def has_collection(self, name):
            release.wait(10)
            return True

        def insert(self, name, rows):
            calls.append(len(rows))
            if len(calls) > 1:
                raise ConnectionError("lost")
            return {"insert_count": len(rows)}

    registry = prom.CollectorRegistry()
    from milvus_ltr_router.metrics import metrics_recorder
    logger = QueryLogger(Slow(), max_queue=1, metrics=metrics_recorder(registry))
    try:
        batch = np.ones((3, 4), np.float32)
        logger.submit("docs", batch)           # taken by the worker, which waits in Slow
        for _ in range(50):
            if logger._queue.qsize() == 0:
                break
            threading.Event().wait(0.01)
        logger.submit("docs", batch)           # queued
        logger.submit("docs", batch)           # queue full: dropped
        bad = batch.copy()
        bad[0, 0] = np.nan
        logger.submit("docs", bad[:1])         # NaN: refused
        release.set()
        assert logger.flush(10)
        assert value(registry, "query_log_sampled_total", collection="docs") == 10
        assert value(registry, "query_log_dropped_total", collection="docs") == 4
        assert value(registry, "query_log_written_total", collection="docs") == 3
        assert value(registry, "query_log_failed_total", collection="docs") == 3
        assert vars(logger.stats)["dropped"] == 3 and logger.stats.non_finite == 1
    finally:
        release.set()
        logger.close(5)


def test_query_log_sample_rate_is_seeded():
    class Sink:
        def has_collection(self, name):
            return True

        def insert(self, name, rows):
            return {"insert_count": len(rows)}
    picks = []
    for _ in range(2):
        logger = QueryLogger(Sink(), rate=0.3, seed=7)
        picks.append([logger.sample("docs", np.ones((20, 4), np.float32)) for _ in range(5)])
        logger.close(5)
    assert picks[0] == picks[1] and 0 < sum(picks[0]) < 100
    with pytest.raises(ValueError, match="log_rate"):
        QueryLogger(Sink(), rate=1.5)


# ------------------------------------------------------------------------------ batch planning
def test_zero_searches_give_totals_without_a_raw_extra_clusters_key():
    planner = SearchPlanner(None, submit=lambda fn: None, cluster_sizes=lambda layout: None,
                            is_lite=lambda: True, reload_interval=lambda: 10.0)
    totals = planner.totals("docs")
    assert "extra_clusters" not in totals
    assert totals == {"searches": 0, "planned": 0, "queries": 0, "requests": 0,
                      "requests_per_search": None, "extra_clusters_per_query": None,
                      "batch_planning": True, "cost_model": planner.cost_model.source}


def test_the_planner_keeps_last_plan_and_plan_totals(lite, fixture_data, tmp_path):
    queries = fixture_data.queries[:40]
    client = routed(lite, tmp_path, reload_interval=3600.0)
    try:
        before = client.router_status("docs")["batches"]
        assert before["searches"] == 0 and "extra_clusters" not in before
        assert client.last_plan is None
        layout = client.layout("docs")
        probed = np.asarray(client.route("docs", queries))
        # the first search plans with the build-time sizes (the live ones are read afterwards)
        want = plan_batches(probed, StorageFacts.from_storage(layout.storage, layout.sizes),
                            client.cost_model, max_queries=max_queries_for(layout.dim))
        client.search("docs", data=queries, limit=5)
        plan = client.last_plan
        assert plan["planned"] is True and plan["queries"] == 40
        assert plan["requests"] == len(want.groups())
        assert plan["extra_clusters"] == want.extra_clusters.tolist()
        for key in ("distinct_sets", "mean_extra_clusters", "max_extra_clusters",
                    "extra_rows_share", "predicted_ms", "per_set_ms", "per_query_ms"):
            assert plan[key] == pytest.approx(want.stats[key]), key
        client.search("docs", data=[queries[0].tolist()], limit=5)
        assert client.last_plan == {"queries": 1, "requests": 1, "planned": False}
        seen = []                                      # last_plan is this thread's
        t = threading.Thread(target=lambda: seen.append(client.last_plan))
        t.start()
        t.join()
        assert seen == [None]
        requests = len(want.groups()) + 1
        totals = client.plan_totals("docs")
        assert totals == {"searches": 2, "planned": 1, "queries": 41, "requests": requests,
                          "requests_per_search": requests / 2,
                          "extra_clusters_per_query": pytest.approx(
                              want.extra_clusters.sum() / 41),
                          "batch_planning": True, "cost_model": client.cost_model.source}
        assert client.router_status("docs")["batches"] == totals
        # without batch planning: one request per distinct cluster set
        client.batch_planning = False
        client.search("docs", data=queries, limit=5)
        distinct = len({tuple(sorted(row)) for row in probed.tolist()})
        assert client.last_plan == {"queries": 40, "requests": distinct, "planned": False}
        assert client.plan_totals("docs")["batch_planning"] is False
    finally:
        client.close()


# ------------------------------------------------------------------------------ live recall
def test_live_recall_matches_an_exact_offline_evaluation(lite, fixture_data, tmp_path):
    """recall_sample=1.0: every routed query is re-run exactly in the background; the
    estimate in router_status equals the recall@10 of the served ids against numpy's exact
    top-10, also where the caller filtered (the re-run keeps the caller's filter)."""
    docs = fixture_data.docs[:N_DOCS]
    queries = fixture_data.queries[:40]
    registry = prom.CollectorRegistry()
    client = routed(lite, tmp_path, nprobe=1, recall_sample=1.0, seed=0, metrics=registry)
    try:
        assert client.router_status("docs")["live_recall"]["done"] == 0
        served, min_id = [], []
        for start in range(0, 20, 5):                          # batches, no filter
            served += served_ids(client.search("docs", data=queries[start:start + 5], limit=10))
            min_id += [None] * 5
        for q in queries[20:]:                                 # single queries, filtered
            served += served_ids(client.search("docs", data=[q.tolist()], limit=10,
                                               filter="id >= 700"))
            min_id.append(700)
        assert client.flush_live_recall(60)
        status = client.router_status("docs")["live_recall"]
        assert status["sample_rate"] == 1.0
        assert status["done"] == 40 and status["dropped"] == 0 and status["failed"] == 0
        (est,) = status["estimates"]
        want = offline_recall(docs, queries, served, min_id=min_id)
        assert 0.2 < want < 0.99                      # nprobe 1 misses neighbours: a real test
        assert est["n"] == 40 and est["k"] == 10 and est["recall_target"] is None
        assert est["recall"] == pytest.approx(want, abs=1e-9)
        assert est["lower"] < want < est["upper"]
        assert value(registry, "live_recall", collection="docs", target="none",
                     k="10") == pytest.approx(want)
        assert value(registry, "recall_audits_total", collection="docs", outcome="done") == 40
        # flushed: published to the model directory for `status` (live_stats), same estimate
        published = read_live_recall(tmp_path / "models", "docs",
                                     layout_id=client.layout("docs").layout_id, version=None)
        (pub,) = published["estimates"]
        assert pub["n"] == 40 and pub["recall"] == pytest.approx(want)
        assert published["clients"][0]["current"] and not published["clients"][0]["stale"]
    finally:
        client.close()
    assert not client._telemetry.live.auditor.alive          # close() stopped the worker


def test_live_recall_is_off_by_default(lite, fixture_data, tmp_path):
    client = routed(lite, tmp_path)
    try:
        assert client.recall_sample == 0.0 and client.metrics.enabled is False
        client.search("docs", data=fixture_data.queries[:3], limit=3)
        assert client.router_status("docs")["live_recall"] is None
        assert client._telemetry.live.auditor is None         # no worker thread at all
    finally:
        client.close()


def test_async_client_records_the_same_metrics_and_live_recall(lite, fixture_data, tmp_path):
    docs = fixture_data.docs[:N_DOCS]
    queries = fixture_data.queries[:12]
    registry = prom.CollectorRegistry()
    client = AsyncRoutedMilvusClient(lite, model_dir=str(tmp_path / "models"), nprobe=1,
                                     log_rate=0, metrics=registry, recall_sample=1.0, seed=0)

    async def main():
        try:
            kind = (await client.router("docs")).kind
            got = served_ids(await client.search("docs", data=queries, limit=10))
            assert served_ids(await client.search("docs", data=[queries[0].tolist()], limit=10,
                                                  partition_names=["_default"]))
            with pytest.raises(RoutedParamError):
                await client.search("docs", data=[[0.5, 0.5]], limit=3)
            assert await client.flush_live_recall(60)
            status = (await client.router_status("docs"))["live_recall"]
            return kind, got, status
        finally:
            await client.close()
    kind, got, status = asyncio.run(main())
    assert value(registry, "searches_total", collection="docs", routed="true") == 1
    assert value(registry, "routed_queries_total", collection="docs", router=kind) == 12
    assert value(registry, "probed_clusters_sum", collection="docs") == 12
    assert value(registry, "search_seconds_count", collection="docs") == 1
    assert value(registry, "passthrough_searches_total", collection="docs",
                 reason="partition_names") == 1
    assert value(registry, "search_errors_total", collection="docs") == 1
    (est,) = status["estimates"]
    assert est["n"] == 12 and status["done"] == 12
    assert est["recall"] == pytest.approx(offline_recall(docs, queries, got), abs=1e-9)
    published = read_live_recall(tmp_path / "models", "docs", check_router=False)
    assert [e["n"] for e in published["estimates"]] == [12]


def test_importing_the_clients_needs_no_prometheus_client():
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"        # any import of it fails
        "import milvus_ltr_router.client, milvus_ltr_router.async_client\n"
        "from milvus_ltr_router.client import RoutedMilvusClient\n"
        "try:\n"
        "    RoutedMilvusClient('http://127.0.0.1:9', metrics=True)\n"
        "except ImportError as exc:\n"
        "    assert '[metrics]' in str(exc), exc\n"
        "    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"        # asked for metrics: refused before connecting
