"""Issue 24's drift goal on milvus-lite: rows written around the layout take the real
questions' nearest neighbours into clusters the router never probes, and the live recall
estimate of the searches that asked for a recall target falls below it, with a warning.

'src' (1,500 MiniLM documents) laid out as 'docs' (8 clusters, partition storage; this
module's own ``lite`` file, so the rows written here reach no other test module).
"""
import logging

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient

TARGET = 0.8


def _target_series(client):
    status = client.router_status("docs")["live_recall"]
    (est,) = [e for e in status["estimates"] if e["recall_target"] == TARGET]
    return status, est


def test_live_recall_falls_below_the_target_when_rows_drift_around_the_layout(
        lite, fixture_data, tmp_path, caplog):
    queries = fixture_data.queries[:160]
    client = RoutedMilvusClient(lite, model_dir=str(tmp_path / "models"), nprobe=6, log_rate=0,
                                recall_sample=1.0, seed=0)
    caplog.set_level(logging.WARNING, logger="milvus_ltr_router")
    try:
        # before: real questions probing 6 of 8 clusters get what they ask for
        for q in queries[:40]:
            client.search("docs", data=[q.tolist()], limit=10, recall_target=TARGET)
        assert client.flush_live_recall(60)
        status, before = _target_series(client)
        assert status["failed"] == 0 and before["n"] == 40
        assert before["upper"] >= TARGET and not before["below_target"], before
        assert not [r for r in caplog.records if "below the target" in r.getMessage()]

        # drift: 5 near-copies of each later question written (around the router, as a plain
        # client would) into the cluster the router ranks last for it
        layout = client.layout("docs")
        later = queries[40:]
        last = [ranked[-1] for ranked in client.route("docs", later, nprobe=layout.n_partitions)]
        rng = np.random.default_rng(0)
        key = 1_000_000
        for q, cluster in zip(later, last):
            near = q + 0.01 * rng.standard_normal((5, len(q))).astype(np.float32)
            rows = [{"id": key + i, "vector": v.tolist()} for i, v in enumerate(near)]
            key += len(rows)
            MilvusClient.insert(client, "docs", rows,
                                partition_name=layout.partition_names[cluster])

        for q in later:
            client.search("docs", data=[q.tolist()], limit=10, recall_target=TARGET)
        assert client.flush_live_recall(60)
        status, after = _target_series(client)
        assert status["failed"] == 0 and after["n"] == len(queries)
        # each later question misses at least its 5 new nearest rows: recall <= .5 for those
        assert after["recall"] <= (40 * 1.0 + len(later) * 0.5) / len(queries) + 1e-9
        assert after["upper"] < TARGET and after["below_target"], after
        assert after["recall"] < before["recall"] - 0.2
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "below the target" in r.getMessage()]
        assert any("'docs'" in w and f"recall_target={TARGET:g}" in w for w in warnings), warnings
    finally:
        client.close()
