"""The live recall estimate: per-query recall, the interval's coverage on synthetic data, the
sliding window, the sampler, and the background auditor (queue bound and drops, failures
counted and never raised, a warning when the estimate is below its target)."""
import logging
import threading

import numpy as np
import pytest

from milvus_ltr_router.live_recall import (RecallAuditor, RecallEstimator, RecallJob,
                                           RecallSampler, query_recall, recall_interval,
                                           wilson_interval)
from milvus_ltr_router.metrics import NullMetrics


def job(collection="docs", served=(1, 2, 3, 4), limit=4, target=None, k=None, **kw):
    return RecallJob(collection, np.zeros(4, np.float32), list(served), limit,
                     recall_target=target, k=k, **kw)


def test_query_recall():
    assert query_recall([1, 2, 3], [1, 2, 3], 3) == 1.0
    assert query_recall([1, 9, 3], [3, 2, 1], 3) == pytest.approx(2 / 3)
    assert query_recall([1, 2, 3, 4], [4, 1, 7, 8], 2) == 0.5     # first k of each side only
    assert query_recall([1, 2], [1, 2, 3, 4], 4) == 0.5            # fewer served than exact
    assert query_recall(["a"], ["a"], 10) == 1.0                   # filter matches one row
    assert query_recall([1, 2], [], 10) is None                   # nothing to measure


def test_recall_k_is_at_most_the_limit():
    assert job(limit=10).recall_k == 10
    assert job(limit=100, k=10).recall_k == 10
    assert job(limit=5, k=10).recall_k == 5


def test_interval_is_never_degenerate_and_stays_in_range():
    p, lo, hi = recall_interval(np.ones(10), k=10)
    assert p == 1.0 and hi == 1.0 and 0.9 < lo < 1.0
    p, lo, hi = recall_interval(np.zeros(10), k=10)
    assert p == 0.0 and lo == 0.0 and 0.0 < hi < 0.1
    p, lo, hi = recall_interval([0.7], k=10)
    assert 0.0 <= lo < 0.7 < hi <= 1.0
    p, lo, hi = recall_interval([], k=10)
    assert np.isnan(p) and (lo, hi) == (0.0, 1.0)
    assert wilson_interval(0.5, 0, 1.96) == (0.0, 1.0)


@pytest.mark.parametrize("a,b,n", [(9, 1, 30), (9, 1, 2000), (30, 1, 10), (50, 0.5, 30),
                                   (2, 0.3, 100), (1, 1, 200)])
def test_interval_coverage_on_synthetic_data(a, b, n):
    """Per-query recall@10 = Binomial(10, p_i) / 10 with p_i ~ Beta(a, b): the 95% interval
    covers the true mean recall a/(a+b) in about 95% of 600 repetitions (at least 90%),
    where an interval on the pooled hits (n*10 trials) covers far less."""
    rng = np.random.default_rng(a * 1000 + n)
    mu, k, reps = a / (a + b), 10, 600
    covered = pooled = 0
    for _ in range(reps):
        x = rng.binomial(k, rng.beta(a, b, n)) / k
        _, lo, hi = recall_interval(x, k)
        covered += lo <= mu <= hi
        plo, phi = wilson_interval(x.mean(), n * k, 1.959964)
        pooled += plo <= mu <= phi
    assert covered / reps >= 0.90, covered / reps
    if b < 1 or a < 5:       # spread-out per-query recall: the pooled interval is too narrow
        assert pooled < covered


def test_estimator_window_series_and_reset():
    est = RecallEstimator(window=100, min_samples=10)
    for i in range(250):
        e = est.add("docs", 1.0 if i < 150 else 0.5, recall_target=0.9, k=10)
    assert (e.n, e.total) == (100, 250)
    assert e.recall == pytest.approx(0.5)           # only the last window counts
    assert e.below_target and e.upper < 0.9
    est.add("docs", 1.0, k=10)                      # fixed nprobe: its own series, no target
    est.add("docs", 1.0, recall_target=0.90000001, k=10)   # the same target
    est.add("other", 0.2, recall_target=0.9, k=10)
    targets = [(e.collection, e.recall_target, e.total) for e in est.estimates()]
    assert targets == [("docs", None, 1), ("docs", 0.9, 251), ("other", 0.9, 1)]
    assert [e.collection for e in est.estimates("other")] == ["other"]
    assert est.estimate("docs", None, 10).below_target is False
    assert est.estimate("docs", 0.5, 10) is None
    est.reset("docs")
    assert [e.collection for e in est.estimates()] == ["other"]
    est.reset()
    assert est.estimates() == []


def test_estimator_needs_min_samples_before_below_target():
    est = RecallEstimator(min_samples=30)
    for _ in range(29):
        e = est.add("docs", 0.0, recall_target=0.9)
    assert not e.below_target
    assert est.add("docs", 0.0, recall_target=0.9).below_target


def test_estimator_arguments():
    with pytest.raises(ValueError):
        RecallEstimator(window=1)
    with pytest.raises(ValueError):
        RecallEstimator(confidence=1.0)


def test_sampler():
    assert len(RecallSampler(0.0).pick(1000)) == 0
    assert RecallSampler(1.0).pick(5).tolist() == [0, 1, 2, 3, 4]
    a, b = RecallSampler(0.1, seed=3), RecallSampler(0.1, seed=3)
    picks = [a.pick(100).tolist() for _ in range(20)]
    assert picks == [b.pick(100).tolist() for _ in range(20)]
    assert 100 < sum(map(len, picks)) < 300                      # ~200 of 2000
    with pytest.raises(ValueError):
        RecallSampler(1.5)


def test_auditor_feeds_the_estimate_and_status():
    seen = []

    def exact(j):
        seen.append((j.collection, j.filter, j.limit))
        return [1, 2, 3, 99]                                      # served (1,2,3,4): 3 of 4

    auditor = RecallAuditor(exact)
    try:
        for _ in range(5):
            assert auditor.submit(job(target=0.9, filter="year > 2000"))
        assert auditor.submit(job(collection="other", served=(), limit=4))
        assert auditor.flush(10)
        st = auditor.status("docs")
        assert (st["submitted"], st["done"], st["dropped"], st["failed"]) == (5, 5, 0, 0)
        (est,) = st["estimates"]
        assert est["recall"] == pytest.approx(0.75) and est["n"] == 5 and est["k"] == 4
        assert est["recall_target"] == 0.9
        assert auditor.status()["done"] == 6
        assert seen[0] == ("docs", "year > 2000", 4)
    finally:
        auditor.close()
    assert not auditor.alive


def test_empty_exact_result_is_counted_not_estimated():
    auditor = RecallAuditor(lambda j: [])
    auditor.submit(job())
    auditor.flush(10)
    st = auditor.status()
    auditor.close()
    assert st["empty"] == 1 and st["done"] == 0 and st["estimates"] == []


def test_queue_bound_and_drops():
    release, started = threading.Event(), threading.Event()

    def exact(j):
        started.set()
        release.wait(10)
        return [1, 2, 3, 4]

    auditor = RecallAuditor(exact, max_queue=3)
    try:
        assert auditor.submit(job())            # taken by the worker, which then blocks
        assert started.wait(10)
        accepted = [auditor.submit(job()) for _ in range(10)]
        assert accepted == [True] * 3 + [False] * 7           # submit never blocks
        st = auditor.status()
        assert (st["dropped"], st["queue"], st["max_queue"]) == (7, 3, 3)
        release.set()
        assert auditor.flush(10)
        st = auditor.status()
        assert (st["submitted"], st["done"], st["dropped"]) == (11, 4, 7)
    finally:
        release.set()
        auditor.close()


def test_exceptions_are_counted_and_the_estimate_resumes(caplog):
    down = threading.Event()
    down.set()

    def exact(j):
        if down.is_set():
            raise ConnectionError("milvus connection lost")
        return [1, 2, 3, 4]

    auditor = RecallAuditor(exact)
    try:
        with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.live_recall"):
            for _ in range(5):
                assert auditor.submit(job())            # the caller never sees the error
            assert auditor.flush(10)
        st = auditor.status()
        assert st["failed"] == 5 and st["done"] == 0
        assert "ConnectionError: milvus connection lost" in st["last_error"]
        failures = [r for r in caplog.records if "exact re-run" in r.getMessage()]
        assert len(failures) == 1                       # logged once per warn_interval
        down.clear()
        auditor.submit(job())
        assert auditor.flush(10)
        st = auditor.status()
        assert st["done"] == 1 and st["estimates"][0]["recall"] == 1.0
        assert auditor.alive
    finally:
        auditor.close()


def test_warning_when_below_target_and_recovery(caplog):
    now = [0.0]
    exact_ids = [[1, 2, 3, 4]]
    auditor = RecallAuditor(lambda j: exact_ids[0], estimator=RecallEstimator(window=50,
                            min_samples=20), warn_interval=60, clock=lambda: now[0])
    try:
        with caplog.at_level(logging.INFO, logger="milvus_ltr_router.live_recall"):
            for _ in range(40):                          # recall 1.0: no warning
                auditor.submit(job(target=0.9))
            auditor.flush(10)
            assert not [r for r in caplog.records if r.levelno == logging.WARNING]
            exact_ids[0] = [1, 2, 7, 8]                  # drift: recall 0.5
            for _ in range(50):
                auditor.submit(job(target=0.9))
            auditor.flush(10)
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1                    # throttled to one per warn_interval
            msg = warnings[0].getMessage()
            assert "below the target by more than its interval" in msg and "'docs'" in msg
            assert "recall_target=0.9" in msg
            now[0] = 61.0
            auditor.submit(job(target=0.9))
            auditor.flush(10)
            assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
            assert auditor.status()["warnings"] == 2
            exact_ids[0] = [1, 2, 3, 4]                  # recovered
            for _ in range(50):
                auditor.submit(job(target=0.9))
            auditor.flush(10)
            assert any("back within its interval" in r.getMessage() for r in caplog.records)
            for _ in range(50):                          # fixed nprobe: never a warning
                auditor.submit(job(target=None, served=(9, 9, 9, 9)))
            auditor.flush(10)
            assert auditor.status()["warnings"] == 2
    finally:
        auditor.close()


def test_metrics_recorded_and_a_failing_recorder_does_not_stop_audits():
    prom = pytest.importorskip("prometheus_client")
    from milvus_ltr_router.metrics import metrics_recorder
    registry = prom.CollectorRegistry()
    auditor = RecallAuditor(lambda j: [1, 2, 3, 99], metrics=metrics_recorder(registry))
    for _ in range(4):
        auditor.submit(job(target=0.9))
    auditor.flush(10)
    auditor.close()
    get = registry.get_sample_value
    assert get("milvus_ltr_router_recall_audits_total", {"collection": "docs",
                                                         "outcome": "done"}) == 4
    labels = {"collection": "docs", "target": "0.9", "k": "4"}
    assert get("milvus_ltr_router_live_recall", labels) == pytest.approx(0.75)
    assert get("milvus_ltr_router_live_recall_samples", labels) == 4

    class Broken(NullMetrics):
        def recall(self, collection, estimate):
            raise RuntimeError("registry trouble")

    auditor = RecallAuditor(lambda j: [1, 2, 3, 4], metrics=Broken())
    for _ in range(3):
        auditor.submit(job())
    auditor.flush(10)
    assert auditor.status()["done"] == 3 and auditor.alive
    auditor.close()


def test_close_joins_discards_and_refuses_later_jobs():
    release = threading.Event()
    auditor = RecallAuditor(lambda j: (release.wait(10), [1])[1], max_queue=5)
    for _ in range(4):
        auditor.submit(job())
    release.set()
    auditor.close(timeout=10)
    assert not auditor.alive
    assert auditor.submit(job()) is False
    assert auditor.status()["dropped"] == 1
    auditor.close()                                      # twice is fine

    drained = RecallAuditor(lambda j: [1, 2, 3, 4])
    for _ in range(3):
        drained.submit(job())
    drained.close(drain=True)
    assert drained.status()["done"] == 3 and not drained.alive
