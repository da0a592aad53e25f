"""Issue 23 item 2: layout upkeep (``maintain-layout``) - its pure plan, and on milvus-lite
the write log, the rewrite in cluster order and what a killed upkeep leaves."""
from __future__ import annotations

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.build import build_layout
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.layout import LayoutError, read_layout
from milvus_ltr_router.maintain import (UpkeepBusy, chunk_rows_for, maintain_layout, plan_rewrite,
                                        worth_running)
from milvus_ltr_router.switch import FROZEN, read_entries, read_stamp, set_stamp
from milvus_ltr_router.writer import create_vector_collection


# --------------------------------------------------------------------------- the plan (pure)
def test_plan_orders_distinct_keys_by_their_latest_cluster_and_chunks_them():
    seqs = [10, 11, 12, 13, 14, 15, 16]
    keys = [7, 3, 7, 9, 1, 4, 5]                     # 7 logged twice: its latest cluster counts
    clusters = [3, 0, 2, 1, 2, 0, 99]               # 5: cluster id outside the layout
    plan = plan_rewrite(seqs, keys, clusters, n_clusters=4, chunk_rows=2)
    assert plan.keys == [3, 4, 9, 1, 7]              # (cluster, key) order
    assert plan.clusters.tolist() == [0, 0, 1, 2, 2]
    assert [(c.start, c.stop) for c in plan.chunks] == [(0, 2), (2, 4), (4, 5)]
    assert plan.seqs == seqs and plan.logged == 7
    assert (plan.outside, plan.rows) == (1, 5)


def test_plan_handles_string_keys_and_rejects_mismatched_log():
    plan = plan_rewrite([1, 2, 3], ["b", "a", "c"], [1, 1, 0], 2, 10)
    assert plan.keys == ["c", "a", "b"]
    with pytest.raises(ValueError, match="2 log entries but 3 keys"):
        plan_rewrite([1, 2], ["a", "b", "c"], [0, 0, 0], 2, 10)


def test_chunk_rows_bounded_by_bytes_and_worth_running():
    assert chunk_rows_for(384, 4096) == 4096
    assert chunk_rows_for(8192, 4096) == (16 << 20) // (4 * 8192)
    with pytest.raises(ValueError):
        chunk_rows_for(8, 0)
    assert not worth_running(0, 100, 0.0)
    assert worth_running(5, 100, 0.05) and not worth_running(4, 100, 0.05)


# --------------------------------------------------------------------------- on milvus-lite
@pytest.fixture
def lite_layout(lite_uri, fixture_data):
    """``src`` (2,000 rows) laid out into ``docs`` (single storage, 8 clusters)."""
    client = MilvusClient(lite_uri)
    docs = fixture_data.docs
    create_vector_collection(client, "src", docs[:2000], scalars={"title": [f"d{i}" for i in range(2000)]})
    build_layout(client, "src", "docs", n_clusters=8, seed=0, storage="single")
    yield client, docs
    client.close()


def _rows(keys, docs, offset):
    return [{"id": int(k), "vector": np.asarray(docs[offset + j]).tolist(), "title": f"k{k}"}
            for j, k in enumerate(keys)]


def _snapshot(client, name):
    rows = client.query(name, filter="id >= 0", output_fields=["id", "vector", "title", "_ltr_cluster"],
                        limit=16384)
    return {r["id"]: (np.round(np.asarray(r["vector"], dtype=np.float32), 6).tobytes(), r["title"],
                      r["_ltr_cluster"]) for r in rows}


def test_routed_writes_are_logged_and_upkeep_rewrites_them_in_place(lite_layout, lite_uri, tmp_path):
    client, docs = lite_layout
    layout = read_layout(client, "docs")
    assert layout.write_log == "docs__ltr_writes" and client.has_collection(layout.write_log)
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0)
    try:
        routed.insert("docs", _rows(range(50_000, 50_300), docs, 5000))
        routed.upsert("docs", _rows(range(0, 40), docs, 6000))          # build rows, moved
        routed.delete("docs", ids=[50_000, 50_001])
    finally:
        routed.close()
    seqs, keys, clusters = read_entries(client, layout.write_log, clusters=True)
    assert len(seqs) == 340 and set(keys) == set(range(50_000, 50_300)) | set(range(40))
    stored = {r["id"]: r["_ltr_cluster"] for r in client.query(
        "docs", filter="id in [0, 1, 2, 50002, 50299]", output_fields=["id", "_ltr_cluster"])}
    logged = dict(zip(keys, clusters))
    assert all(logged[k] == c for k, c in stored.items())       # the cluster each row went to
    before = _snapshot(client, "docs")
    assert len(before) == 2000 + 300 - 2

    report = maintain_layout(client, "docs", chunk_rows=64, pause=0)
    assert (report.logged, report.rewritten, report.missing) == (340, 338, 2)
    assert report.chunks == -(-340 // 64) and report.skipped == ""
    after = _snapshot(client, "docs")
    assert after == before                              # same keys, vectors, fields, clusters
    assert client.query("docs", filter="", output_fields=["count(*)"])[0]["count(*)"] == 2298
    assert read_entries(client, layout.write_log) == ([], [])     # the log is trimmed
    stamp = read_stamp(client, "docs")
    assert stamp.state == "" and int(stamp.upkeep) == report.chunks   # one freeze per chunk
    again = maintain_layout(client, "docs")
    assert again.rewritten == 0 and again.skipped == "nothing logged"


def test_a_killed_upkeep_keeps_its_log_and_the_next_run_finishes(lite_layout, lite_uri, tmp_path):
    client, docs = lite_layout
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0)
    try:
        routed.insert("docs", _rows(range(60_000, 60_200), docs, 7000))
    finally:
        routed.close()
    before = _snapshot(client, "docs")

    class Killed(BaseException):
        pass

    def die(i):
        if i == 1:
            raise Killed()
    with pytest.raises(Killed):
        maintain_layout(client, "docs", chunk_rows=50, pause=0, after_chunk=die)
    assert _snapshot(client, "docs") == before          # half rewritten: nothing lost
    assert read_stamp(client, "docs").state == ""        # the freeze of the chunk ended
    assert len(read_entries(client, "docs__ltr_writes")[0]) == 200
    report = maintain_layout(client, "docs", chunk_rows=50, pause=0)
    assert report.rewritten == 200 and _snapshot(client, "docs") == before
    assert read_entries(client, "docs__ltr_writes") == ([], [])


def test_upkeep_refuses_a_frozen_layout_until_its_lease_expires(lite_layout):
    client, _ = lite_layout
    import time
    set_stamp(client, "docs", state=FROZEN, until=f"{time.time() + 60:.3f}")
    with pytest.raises(UpkeepBusy, match="frozen"):
        maintain_layout(client, "docs")
    assert not read_stamp(client, "docs").writable
    set_stamp(client, "docs", state=FROZEN, until=f"{time.time() - 1:.3f}")   # a dead holder's
    assert read_stamp(client, "docs").writable
    assert maintain_layout(client, "docs").skipped == "nothing logged"


def test_upkeep_of_a_layout_without_write_log_says_how_to_start_one(lite_uri, fixture_data):
    client = MilvusClient(lite_uri)
    try:
        create_vector_collection(client, "src", fixture_data.docs[:500])
        build_layout(client, "src", "parts", n_clusters=4, seed=0, storage="partition")
        assert read_layout(client, "parts").write_log is None
        with pytest.raises(LayoutError, match="--keep-clusters"):
            maintain_layout(client, "parts")
    finally:
        client.close()


def test_writes_go_on_when_the_write_log_is_dropped(lite_layout, lite_uri, tmp_path, caplog):
    client, docs = lite_layout
    client.drop_collection("docs__ltr_writes")          # an operator stops the recording
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0)
    try:
        with caplog.at_level("WARNING", logger="milvus_ltr_router.writes"):
            for i in range(3):
                routed.insert("docs", _rows(range(70_000 + 10 * i, 70_010 + 10 * i), docs, 8000))
    finally:
        routed.close()
    assert client.query("docs", filter="id >= 70000", output_fields=["count(*)"])[0]["count(*)"] == 30
    warned = [r for r in caplog.records
              if r.name == "milvus_ltr_router.writes" and "docs__ltr_writes" in r.getMessage()]
    assert len(warned) == 1                              # once, then not tried for a minute


def test_a_freeze_lease_is_renewed_while_held_and_lapses_after(lite_layout):
    from milvus_ltr_router.switch import FreezeLease, LeaseLapsed
    import time
    client, _ = lite_layout
    freeze = FreezeLease(client, lease=0.8)
    assert freeze.freeze("docs")
    time.sleep(1.5)                                  # past one lease: renewed meanwhile
    assert not read_stamp(client, "docs").writable
    freeze.check()
    freeze.stop()                                    # the holder is gone: no more renewals
    time.sleep(1.0)
    stamp = read_stamp(client, "docs")
    assert stamp.state == FROZEN and stamp.writable  # the freeze lapsed on its own
    stale = FreezeLease(client, lease=0.8)
    stale._ok_at -= 10                               # as if its renewals had failed for 10 s
    stale._names.append("docs")
    with pytest.raises(LeaseLapsed, match="nothing was switched"):
        stale.check()


def test_retrain_maintain_step_runs_the_upkeep_and_never_fails_the_retrain(lite_layout, lite_uri,
                                                                           tmp_path, caplog, capsys):
    from types import SimpleNamespace
    from milvus_ltr_router.cli.retrain_cmd import maintain_before_retrain
    client, docs = lite_layout
    routed = RoutedMilvusClient(lite_uri, model_dir=str(tmp_path / "m"), nprobe=2, log_rate=0.0)
    try:
        routed.insert("docs", _rows(range(80_000, 80_050), docs, 9000))
    finally:
        routed.close()
    args = SimpleNamespace(collection="docs", json=False, retrain_phases={})
    maintain_before_retrain(client, args)
    assert "50 rows written since the last upkeep rewritten" in capsys.readouterr().out
    assert read_entries(client, "docs__ltr_writes") == ([], [])
    assert args.retrain_phases["maintain"] > 0
    bad = SimpleNamespace(collection="no_such_collection", json=False, retrain_phases={})
    with caplog.at_level("ERROR"):
        maintain_before_retrain(client, bad)          # logged, not raised: the retrain goes on
    assert any("upkeep of 'no_such_collection' failed" in r.getMessage() for r in caplog.records)
