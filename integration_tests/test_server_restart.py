"""Milvus stopped and restarted under routed clients that keep searching and writing.

A dedicated embedded Milvus 2.3.5 server (beside the session's, on its own ports) holds a
small laid-out collection with a published router. Four threads search through one
``RoutedMilvusClient`` and one thread upserts through it while the server process is stopped
and started again on the same data. Counted:

- searches before the stop and after recovery that failed or returned other hits than the
  same routed search before the outage (rows added meanwhile aside; must be 0);
- searches during the outage that failed with anything but a pymilvus ``MilvusException``
  (must be 0: an outage is Milvus's error, never a crash inside the plugin);
- rows lost or duplicated once every failed write was retried (must be 0);
- whether the client still serves the published router afterwards (it must: an outage is
  not a router problem) and whether a retrain against the stopped server publishes nothing
  and exits 1 naming the URI.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.export import export_router
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.milvus_io import count_rows
from milvus_ltr_router.writer import create_vector_collection
from milvus_ltr_router.registry import ModelRegistry
from milvus_ltr_router.router import linear_centroid_scorer

N_ROWS = 4000
N_CLUSTERS = 16
NPROBE = 3
LIMIT = 5
N_QUERIES = 24
OUTAGE_S = 4.0              # the server stays down this long
AFTER_S = 6.0               # searching goes on this long after recovery
RECOVER_TIMEOUT_S = 300.0     # a restart on 2 busy cores can take minutes


def _start(base: Path, port: int | None = None):
    try:
        from benchmarks.embedded_server import start_embedded_server
        import milvus  # noqa: F401  (the [server] extra)
    except ImportError as exc:
        pytest.skip(f"needs the embedded Milvus server ([server] extra): {exc}")
    return start_embedded_server(base, port=port)


@pytest.fixture(scope="module")
def restartable(tmp_path_factory, fixture_data):
    """A dedicated server with a laid-out collection and a published (shifted-centroid)
    router; yields (server, collection, model_dir, queries)."""
    base = tmp_path_factory.mktemp("restart-milvus")
    server = _start(base)
    model_dir = tmp_path_factory.mktemp("restart-models")
    try:
        client = MilvusClient(uri=server.uri)
        create_vector_collection(client, "restart_src", fixture_data.docs[:N_ROWS])
        client.load_collection("restart_src")
        layout = build_layout(client, "restart_src", "restart_ivf", n_clusters=N_CLUSTERS,
                              seed=0).layout
        client.close()
        reg = ModelRegistry(model_dir)
        w, b = linear_centroid_scorer(layout.centroids, layout.metric)
        version = "20260101T000000000000Z"
        export_router(np.roll(w, 5, axis=0), np.roll(b, 5), layout, layout.collection,
                      reg.version_path(layout.collection, version), nprobe=NPROBE)
        reg.publish(layout.collection, reg.version_path(layout.collection, version), version, {})
        queries = np.asarray(fixture_data.queries[:N_QUERIES], dtype=np.float32)
        yield server, layout.collection, model_dir, queries, version
    finally:
        server.stop()


def _wait_until_searchable(uri: str, collection: str, query: np.ndarray) -> float:
    """Seconds until a plain search answers again after a restart."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < RECOVER_TIMEOUT_S:
        try:
            c = MilvusClient(uri=uri, timeout=5)
            try:
                c.search(collection, data=[query.tolist()], limit=1)
                return time.monotonic() - t0
            finally:
                c.close()
        except Exception as exc:        # still starting or still loading
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"{collection} not searchable {RECOVER_TIMEOUT_S:.0f} s after the "
                         f"restart: {last!r}")


def test_search_and_writes_survive_a_server_restart(restartable, fixture_data):
    server, collection, model_dir, queries, version = restartable
    if not server.running:           # another test left it stopped
        server.restart(timeout=RECOVER_TIMEOUT_S)
        _wait_until_searchable(server.uri, collection, queries[0])
    routed = RoutedMilvusClient(uri=server.uri, model_dir=str(model_dir), nprobe=NPROBE,
                                log_rate=0, reload_interval=0.2, timeout=10)
    assert routed.router_status(collection)["mode"] == "learned"
    reference = [[h["id"] for h in routed.search(collection, data=[q.tolist()], limit=LIMIT)[0]]
                 for q in queries]

    phase = ["before"]               # before -> down -> recovering -> after
    lock = threading.Lock()
    counts = {p: {"ok": 0, "milvus_error": 0} for p in ("before", "down", "recovering", "after")}
    problems: list[str] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        i = seed
        while not stop.is_set():
            j = i % len(queries)
            i += 7
            p = phase[0]
            try:
                hits = routed.search(collection, data=[queries[j].tolist()], limit=LIMIT)
                got = [h["id"] for h in hits[0]]
            except MilvusException as exc:
                with lock:
                    counts[p]["milvus_error"] += 1
                    if p in ("before", "after"):
                        problems.append(f"{p}: search failed: {exc!r}")
                time.sleep(0.05)
                continue
            except Exception as exc:    # anything else is the plugin's fault
                with lock:
                    problems.append(f"{p}: search raised {type(exc).__name__}: {exc!r}")
                continue
            # rows the writer adds may enter the hits; the rows that were there keep their order
            kept = [h for h in got if h < N_ROWS]
            with lock:
                counts[p]["ok"] += 1
                if kept != reference[j][:len(kept)]:
                    problems.append(f"{p}: query {j} hits {got} != before the outage {reference[j]}")

    # upserts of existing keys (same vectors) and inserts of new keys, retried until accepted
    new_ids = list(range(N_ROWS, N_ROWS + 60))
    write_failures = [0]

    def writer() -> None:
        for n, key in enumerate(new_ids):
            vec = fixture_data.docs[N_ROWS + n]
            old = n * 37 % N_ROWS
            rows = [{"id": key, "vector": vec.tolist()},
                    {"id": old, "vector": fixture_data.docs[old].tolist()}]
            while True:
                try:
                    routed.upsert(collection, rows)
                    break
                except MilvusException:
                    write_failures[0] += 1
                    if stop.is_set() and phase[0] != "after":
                        return
                    time.sleep(0.2)
                except Exception as exc:
                    with lock:
                        problems.append(f"upsert raised {type(exc).__name__}: {exc!r}")
                    return
            time.sleep(0.1)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    write_thread = threading.Thread(target=writer)
    for t in threads + [write_thread]:
        t.start()
    try:
        time.sleep(2.0)
        phase[0] = "down"
        server.stop()
        time.sleep(OUTAGE_S)
        phase[0] = "recovering"
        server.restart(timeout=RECOVER_TIMEOUT_S)
        recovered_s = _wait_until_searchable(server.uri, collection, queries[0])
        time.sleep(1.0)                  # the routed client's channel reconnects too
        phase[0] = "after"
        time.sleep(AFTER_S)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    write_thread.join(timeout=120)
    status = routed.router_status(collection)
    plain = MilvusClient(uri=server.uri)
    try:
        n_rows = count_rows(plain, collection)
        keys = [r["id"] for r in plain.query(collection, filter="id >= 0", output_fields=["id"],
                                             limit=16384)]
    finally:
        plain.close()
        routed.close()
    duplicated = len(keys) - len(set(keys))
    lost = N_ROWS + len(new_ids) - len(set(keys))
    print(f"\nfaults/restart: searches {counts}; recovered {recovered_s:.1f} s after the restart; "
          f"{len(problems)} problems; {write_failures[0]} failed writes retried, {lost} rows lost, "
          f"{duplicated} duplicated; router after: {status['mode']} {status['version']}")
    assert not any(t.is_alive() for t in threads) and not write_thread.is_alive(), "a thread hung"
    assert not problems, problems[:5]
    assert counts["before"]["ok"] > 0 and counts["after"]["ok"] > 0
    assert counts["down"]["milvus_error"] > 0, "the outage was never seen by a search"
    assert lost == 0 and duplicated == 0 and n_rows == N_ROWS + len(new_ids)
    assert status["mode"] == "learned" and status["version"] == version and status["error"] == ""


def _rows_by_key(client, collection) -> dict:
    from milvus_ltr_router.scan import iter_columns
    out, n = {}, 0
    for cols in iter_columns(client, collection, ["id", "vector"]):
        ids = np.asarray(cols["id"]).tolist()
        n += len(ids)
        out.update(zip(ids, np.asarray(cols["vector"], dtype=np.float32)))
    return out, n


def test_upkeep_interrupted_by_a_server_restart_is_finished_by_the_next_run(restartable,
                                                                             fixture_data):
    """``maintain-layout`` running when Milvus stops: nothing lost or duplicated, the layout
    serves after the restart, and the next run finishes the upkeep (its log emptied)."""
    from milvus_ltr_router.layout import read_layout
    from milvus_ltr_router.maintain import maintain_layout
    from milvus_ltr_router.switch import read_entries, read_stamp
    server, collection, model_dir, queries, version = restartable
    if not server.running:
        server.restart(timeout=RECOVER_TIMEOUT_S)
        _wait_until_searchable(server.uri, collection, queries[0])
    client = MilvusClient(uri=server.uri, timeout=10)
    layout = read_layout(client, collection)
    assert layout.write_log, "a server layout in single storage keeps a write log"
    routed = RoutedMilvusClient(uri=server.uri, model_dir=str(model_dir), nprobe=NPROBE,
                                log_rate=0, timeout=10)
    try:
        docs = fixture_data.docs
        for i in range(40):
            keys = range(7_000_000 + 20 * i, 7_000_020 + 20 * i)
            routed.insert(collection, [{"id": k, "vector": docs[N_ROWS + 20 * i + j].tolist()}
                                       for j, k in enumerate(keys)])
    finally:
        routed.close()
    before, n_before = _rows_by_key(client, collection)
    assert n_before == len(before)
    logged = len(read_entries(client, layout.write_log)[0])
    assert logged >= 800
    client.close()

    failure: list = []

    def upkeep():
        c = MilvusClient(uri=server.uri, timeout=10)
        try:
            maintain_layout(c, collection, chunk_rows=40, pause=0.3, lease=3.0)
        except Exception as exc:
            failure.append(exc)
    thread = threading.Thread(target=upkeep)
    thread.start()
    time.sleep(2.0)                  # a few chunks rewritten, the rest not
    server.stop()
    thread.join(120)
    assert not thread.is_alive(), "the upkeep hung on a stopped server"
    server.restart(timeout=RECOVER_TIMEOUT_S)
    _wait_until_searchable(server.uri, collection, queries[0])
    client = MilvusClient(uri=server.uri, timeout=10)
    try:
        time.sleep(3.5)              # a freeze left by the interrupted chunk has lapsed
        assert read_stamp(client, collection).writable
        mid, n_mid = _rows_by_key(client, collection)
        left = len(read_entries(client, layout.write_log)[0])
        report = maintain_layout(client, collection, pause=0)
        after, n_after = _rows_by_key(client, collection)
        print(f"\nfaults/upkeep across a restart: first run {failure[0] if failure else 'finished'!r}"
              f"; {left} of {logged} log entries left; next run rewrote {report.rewritten}; rows "
              f"{n_before} -> {n_mid} -> {n_after}")
        assert failure, "the restart came after the upkeep had finished: nothing was tested"
        for rows, n in ((mid, n_mid), (after, n_after)):
            assert n == n_before and set(rows) == set(before)       # none lost, none twice
            assert all(np.allclose(rows[k], v) for k, v in before.items())
        assert report.rewritten == left or report.rewritten >= 800
        assert read_entries(client, layout.write_log) == ([], [])
    finally:
        client.close()


def test_retrain_against_a_stopped_server_exits_1_and_publishes_nothing(restartable, tmp_path):
    server, collection, model_dir, queries, version = restartable
    qfile = tmp_path / "queries.npy"
    np.save(qfile, np.repeat(queries, 10, axis=0))
    script = Path(sys.executable).with_name("retrain-router")
    head = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from milvus_ltr_router.cli import retrain_main; "
        "sys.exit(retrain_main())"]
    pointer = ModelRegistry(model_dir).pointer_path(collection)
    before = pointer.read_bytes()
    server.stop()                    # left stopped: the fixture is done with it afterwards
    run = subprocess.run(head + ["--uri", server.uri, "--collection", collection,
                                 "--model-dir", str(model_dir), "--queries", str(qfile),
                                 "--min-queries", "50", "--epochs", "1"],
                         capture_output=True, text=True, timeout=300)
    print(f"\nfaults/retrain with Milvus stopped: exit {run.returncode}: "
          f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''}")
    assert run.returncode == 1, run.stderr[-2000:]
    assert server.uri in run.stderr
    assert pointer.read_bytes() == before
    assert not [p for p in pointer.parent.iterdir() if p.name.startswith(".candidate-")]
