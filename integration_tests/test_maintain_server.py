"""Issue 23 items 2-3 on a real server: ``maintain-layout`` under load and killed.

The goal runs: the upkeep of a layout that routed writes have worn, under 4 searching
threads and 1 routed writer (inserts of new keys, upserts of old ones), with chunks small
enough that the writer meets many freezes: 0 failed searches, 0 acknowledged writes lost,
0 duplicate keys, every row in its cluster, the row count what the writes make it. Then
``maintain-layout`` as a process killed with SIGKILL in each phase (under the same load):
after each kill the layout serves correctly and nothing is lost, and the next run finishes
the upkeep (the write log empty). The figures are printed (``-s`` shows them).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

from integration_tests.test_rebuild_server import _Load, _check_final, _source

N_SOURCE = 6000
L = 24


def _wear(uri, alias, docs, model_dir, n_requests=60):
    """Routed inserts (new keys) and upserts (old keys) before any upkeep: the rows to rewrite."""
    from milvus_ltr_router.client import RoutedMilvusClient
    rc = RoutedMilvusClient(uri=uri, model_dir=model_dir, nprobe=4, log_rate=0.0)
    acked = {}
    rng = np.random.default_rng(3)
    try:
        for i in range(n_requests):
            if i % 3:
                keys = [20_000_000 + 10 * i + j for j in range(10)]
                kind = "insert"
            else:
                keys = [int(k) * 3 + 1 for k in rng.choice(N_SOURCE, 10, replace=False)]
                kind = "upsert"
            vecs = docs[rng.integers(N_SOURCE, len(docs), len(keys))]
            getattr(rc, kind)(alias, [{"id": k, "vector": v.tolist(), "title": f"p{i}"}
                                      for k, v in zip(keys, vecs)])
            acked.update(zip(keys, vecs))
    finally:
        rc.close()
    return acked


def _log_entries(client, layout):
    from milvus_ltr_router.switch import read_entries
    return len(read_entries(client, layout.write_log)[0])


def _figures(load, out):
    return {"searches_ok": load.ok, "searches_failed": len(load.failed),
            "routed_writes": load.writes, "acked_keys": len(load.acked),
            "write_errors": len(load.write_errors), "lost": out["lost"],
            "duplicates": out["duplicates"], "wrong_cluster": out["wrong_cluster"],
            "rows": out["rows"], "expected_rows": out["expected_rows"]}


def _assert_clean(load, out):
    # Milvus 2.3.5 can fail a search through an alias once with "can't find collection" while
    # collection properties (the freeze) are altered: seen once in ~42k searches in a CI run.
    # Tolerated at that rate and reported (issue 23's note); any other failure is not.
    other = [f for f in load.failed if "can't find collection" not in f]
    assert other == [], other[:5]
    assert len(load.failed) <= max(1, load.ok // 5000), load.failed[:5]
    assert load.write_errors == [], load.write_errors[:5]
    assert out["lost"] == 0 and out["duplicates"] == 0 and out["wrong_cluster"] == 0
    assert out["rows"] == out["expected_rows"]


def test_upkeep_under_load_loses_nothing_and_fails_nothing(client, milvus_server, fixture_data,
                                                            tmp_path):
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout, read_layout
    from milvus_ltr_router.maintain import maintain_layout
    src = _source(client, fixture_data, N_SOURCE)
    target, alias = f"mt_{uuid.uuid4().hex[:6]}", f"mt_app_{uuid.uuid4().hex[:6]}"
    models = str(tmp_path / "models")
    try:
        layout = build_layout(client, src, target, n_clusters=L, storage="single", alias=alias,
                              seed=0).layout
        pre = _wear(milvus_server.uri, alias, fixture_data.docs, models)
        logged = _log_entries(client, layout)
        assert logged == 600
        with _Load(milvus_server.uri, alias, [target], fixture_data.queries, fixture_data.docs,
                   models) as load:
            load.acked.update(pre)
            time.sleep(2)
            report = maintain_layout(client, alias, chunk_rows=100, pause=0.05)
            time.sleep(2)
        out = _check_final(client, alias, load, N_SOURCE, target)    # acked includes pre
        figures = {**_figures(load, out), "rewritten": report.rewritten, "chunks": report.chunks,
                   "frozen_s": round(report.frozen_seconds, 2),
                   "longest_freeze_s": round(report.longest_freeze, 3),
                   "seconds": {k: round(v, 2) for k, v in report.seconds.items()}}
        print("\nUPKEEP GOAL FIGURES", figures)
        _assert_clean(load, out)
        assert report.rewritten >= 500 and report.chunks >= 5
        assert load.writes > 20 and load.ok > 100
        stamp_layout = read_layout(client, alias)
        assert stamp_layout.layout_id == layout.layout_id          # clusters and router kept
        # the entries it read are gone; the writer's writes since are logged for the next one
        assert 0 < _log_entries(client, layout) < logged + 5 * load.writes
    finally:
        drop_layout(client, target)
        client.drop_collection(src)


PHASES = [  # (phase, log line that starts it; the kill follows after the delay)
    ("reading the log", "reading the write log", 0.0),
    ("mid-rewrite", "rewriting", 0.6),
    ("during a freeze", "rewriting", "frozen"),     # killed once the stamp reads frozen
    ("flush", "flushing", 0.0),
    ("trimming the log", "trimming the write log", 0.0),
]


def _maintain_process(uri, collection, out_path):
    cmd = [sys.executable, "-m", "milvus_ltr_router.cli", "-v", "maintain-layout", "--uri", uri,
           "--collection", collection, "--chunk-rows", "30", "--lease", "4"]
    return subprocess.Popen(cmd, stdout=open(out_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_line(path, pattern, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pattern in open(path).read():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def test_upkeep_killed_in_each_phase_leaves_a_serving_layout_and_finishes_next_run(
        client, milvus_server, fixture_data, tmp_path):
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    from milvus_ltr_router.maintain import maintain_layout
    from milvus_ltr_router.switch import FROZEN, read_stamp
    src = _source(client, fixture_data, N_SOURCE)
    target, alias = f"mk_{uuid.uuid4().hex[:6]}", f"mk_app_{uuid.uuid4().hex[:6]}"
    models = str(tmp_path / "models")
    outcomes = []
    try:
        layout = build_layout(client, src, target, n_clusters=L, storage="single", alias=alias,
                              seed=0).layout
        pre = _wear(milvus_server.uri, alias, fixture_data.docs, models, n_requests=90)
        with _Load(milvus_server.uri, alias, [target], fixture_data.queries, fixture_data.docs,
                   models) as load:
            load.acked.update(pre)
            for phase, line, delay in PHASES:
                out_path = tmp_path / f"maintain_{phase.replace(' ', '_')}.log"
                proc = _maintain_process(milvus_server.uri, alias, out_path)
                seen = _wait_line(out_path, line, proc)
                if delay == "frozen":
                    deadline = time.monotonic() + 60
                    while proc.poll() is None and time.monotonic() < deadline and \
                            read_stamp(client, target).state != FROZEN:
                        time.sleep(0.005)
                else:
                    time.sleep(delay)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                rc = proc.wait(30)
                stamp = read_stamp(client, target)
                outcomes.append(f"{phase}: line seen {seen}, rc {rc}, stamp {stamp.state or 'serving'}")
                assert seen, open(out_path).read()[-2000:]
                # a short phase (the log's trim is one request) may end before the kill lands:
                # then the run finished (rc 0); enough kills must land (checked below)
                assert rc in (-signal.SIGKILL, 0), f"{phase}: rc {rc}: {open(out_path).read()[-2000:]}"
                # a freeze left behind holds writers (and refuses the next upkeep) until its
                # lease lapses: 4 s
                time.sleep(4.5 if stamp.state == FROZEN else 1)
            assert sum(", rc -9," in o for o in outcomes) >= 3, outcomes
            assert any("stamp frozen" in o for o in outcomes), outcomes     # a freeze left behind
            assert read_stamp(client, target).writable
            report = maintain_layout(client, alias, chunk_rows=200, pause=0.05)
            time.sleep(2)
        out = _check_final(client, alias, load, N_SOURCE, target)    # acked includes pre
        figures = {**_figures(load, out), "kills": outcomes, "final_rewritten": report.rewritten}
        print("\nUPKEEP KILL FIGURES", figures)
        _assert_clean(load, out)
        assert report.rewritten > 0
        assert _log_entries(client, layout) < 900 + 5 * load.writes
        assert load.writes > 20 and load.ok > 100
    finally:
        drop_layout(client, target)
        client.drop_collection(src)
