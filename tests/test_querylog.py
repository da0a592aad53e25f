import threading
import time

import numpy as np
from pymilvus import MilvusClient

from milvus_ltr_router.querylog import QueryLogger, log_size, sample_queries, write_queries


class FailingClient:
    """Stands in for a Milvus that is down: every call raises."""

    def has_collection(self, name):
        raise ConnectionError("milvus is down")


class SlowClient:
    """A Milvus that blocks until released, so the logger's queue fills up."""

    def __init__(self):
        self.release = threading.Event()

    def has_collection(self, name):
        self.release.wait(10)
        return True

    def insert(self, name, rows):
        return {"insert_count": len(rows)}


class RecordingClient:
    """A Milvus that accepts everything and remembers what was inserted."""

    def __init__(self):
        self.rows = []

    def has_collection(self, name):
        return True

    def insert(self, name, rows):
        self.rows.extend(rows)
        return {"insert_count": len(rows)}


def test_non_finite_vectors_are_never_written(caplog):
    import logging
    client = RecordingClient()
    logger = QueryLogger(client, max_queue=10)
    batch = np.arange(12, dtype=np.float32).reshape(4, 3)
    batch[1, 0], batch[3, 2] = np.nan, np.inf
    with caplog.at_level(logging.DEBUG, logger="milvus_ltr_router.querylog"):
        logger.submit("docs", batch)
        logger.submit("docs", np.full((2, 3), np.nan))      # nothing usable: nothing queued
        assert logger.flush(5)
    written = np.array([r["vector"] for r in client.rows])
    np.testing.assert_array_equal(written, batch[[0, 2]])
    s = logger.stats
    assert s.submitted == 6 and s.non_finite == 4 and s.written == 2 and s.failed == 0
    assert "query log of 'docs': dropped 2 of 4 vectors with NaN or inf" in caplog.text
    # the direct writer refuses them too
    assert write_queries(client, "docs", [[np.nan, 1, 2], [1, 2, 3]]) == 1
    assert client.rows[-1]["vector"] == [1, 2, 3]
    logger.close()


def test_failed_log_writes_are_counted_not_raised():
    logger = QueryLogger(FailingClient(), max_queue=10)
    logger.submit("c", np.ones((3, 4)))
    assert logger.flush(5)
    assert logger.stats.failed == 3 and logger.stats.written == 0
    assert "milvus is down" in logger.stats.last_error
    logger.close()


def test_full_queue_drops_without_blocking():
    client = SlowClient()
    logger = QueryLogger(client, max_queue=2)
    t0 = time.perf_counter()
    for _ in range(10):
        logger.submit("c", np.ones((1, 4)))
    assert time.perf_counter() - t0 < 0.5          # submit never waits on Milvus
    client.release.set()
    assert logger.flush(5)
    s = logger.stats
    assert s.submitted == 10 and s.dropped >= 7 and s.written + s.dropped == 10
    logger.close()


def test_log_round_trip_and_since_filter_on_lite(lite_uri, rng):
    client = MilvusClient(lite_uri)
    old = rng.standard_normal((50, 8)).astype(np.float32)
    new = rng.standard_normal((30, 8)).astype(np.float32)
    write_queries(client, "docs", old, ts_ms=int((time.time() - 3600) * 1000))
    write_queries(client, "docs", new)
    assert log_size(client, "docs") == 80
    everything = sample_queries(client, "docs", 1000)
    assert everything.shape == (80, 8)
    recent = sample_queries(client, "docs", 1000, since_seconds=600)
    assert recent.shape == (30, 8)
    assert {tuple(r) for r in recent} == {tuple(r) for r in new}
    assert sample_queries(client, "docs", 10).shape == (10, 8)
    assert sample_queries(client, "other", 10).shape[0] == 0
    client.close()
