"""Fault injection through the session's real Milvus server, with counts.

1. ``retrain-router`` killed with SIGKILL at several phases (labelling, training, right before
   and right after publishing, found by watching its log): the live router is the previous
   one or the new one, completely published; the lock is free; the next retrain succeeds and
   removes backdated ``.tmp-*`` / ``.candidate-*`` leftovers (and keeps young ones).
2. Hot reload under load: 4 threads search through ``RoutedMilvusClient(reload_interval=0)``
   while a thread alternates publish / rollback between two genuinely different routers;
   every result equals a plain restricted search with one of the two routers' clusters.
3. Publish (this process) and rollback (another process) race for seconds: the pointer
   always names an existing router, history (read under the lock) never names a pruned file,
   nothing but ``LockedError`` escapes.
4. Corrupt and foreign files while a client searches (truncated or foreign bytes, pointer
   garbage or naming ``../x`` or a missing file, a router of another layout, one with more or
   fewer outputs than partitions, NaN weights): no failed search, the layout's training-free
   fallback (its cluster moments, else centroids: ``serving.fallback_kind``) with the reason
   in ``router_status``, recovery once the file is fixed.

Each test prints its counts and asserts the bad ones are zero.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.atomic import write_atomic
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.export import export_router, linear_router_model, router_metadata
from milvus_ltr_router.layout import partition_names_for
from milvus_ltr_router.layout import Layout
from milvus_ltr_router.registry import (LEFTOVER_MIN_AGE_S, LEFTOVER_PREFIXES, LockedError,
                                        ModelRegistry, RegistryError, retry_delay)
from milvus_ltr_router.router import Router, linear_centroid_scorer
from milvus_ltr_router.serving import fallback_kind

NPROBE = 2
LIMIT = 5
RELOAD = 0.2                  # test 4's reload interval (seconds)
RUN_TIMEOUT = 120.0           # one retrain-router run, at most
SEARCH_SECONDS = 12.0         # test 2's searchers stop after this (or after their searches)
WAIT_S = 30.0                 # test 4: longest wait for a state change (ends at the change)


@dataclass
class Env:
    uri: str
    token: str
    layout: Layout
    collection: str
    queries: np.ndarray


@pytest.fixture(scope="module")
def env(milvus_server, wordnet_layout, fixture_data):
    layout = wordnet_layout.layout
    return Env(milvus_server.uri, milvus_server.token, layout, layout.collection,
               np.asarray(fixture_data.queries, dtype=np.float32))


def routed_client(env: Env, model_dir, **kwargs) -> RoutedMilvusClient:
    return RoutedMilvusClient(uri=env.uri, token=env.token, model_dir=str(model_dir), nprobe=NPROBE,
                              log_rate=0, **kwargs)


def export_version(reg: ModelRegistry, layout: Layout, version: str, shift: int = 0,
                   other_layout: Layout | None = None, path: Path | None = None) -> Path:
    """A router file for ``layout``: centroid scoring, its rows rolled by ``shift`` (so the
    router sends each query ``shift`` clusters away: a genuinely different router)."""
    w, b = linear_centroid_scorer(layout.centroids, layout.metric)
    return export_router(np.roll(w, shift, axis=0), np.roll(b, shift), other_layout or layout,
                         layout.collection, path or reg.version_path(layout.collection, version),
                         nprobe=NPROBE)


def write_mismatched_router(layout: Layout, path: Path, n_outputs: int) -> Path:
    """A router file whose metadata is right for ``layout`` but whose graph scores
    ``n_outputs`` partitions (export refuses to write one; finding 8 found 40 outputs for 32
    partitions raising IndexError in searches, and 16 silently routing to 0-15 only)."""
    w = np.random.default_rng(n_outputs).standard_normal((n_outputs, layout.dim)).astype(np.float32)
    meta = router_metadata(layout, layout.collection, nprobe=NPROBE)
    graph_meta = dict(meta, partition_names=json.dumps(partition_names_for(n_outputs)))
    model = linear_router_model(w, None, graph_meta)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return path


def publish_locked(reg: ModelRegistry, collection: str, version: str) -> None:
    """Publish as retrain does: under the collection's lock."""
    with reg.lock(collection):
        reg.publish(collection, reg.version_path(collection, version), version, {})


def pointer_history(reg: ModelRegistry, collection: str) -> list[str]:
    return list(json.loads(reg.pointer_path(collection).read_text()).get("history", []))


def leftovers(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(LEFTOVER_PREFIXES))


# ----------------------------------------------------------------------------- 1: kill -9
class LoggedRun:
    """A retrain-router subprocess whose log lines (stderr) are read as they come."""

    def __init__(self, cmd: list[str], stdout_path: Path):
        self.stdout_path = stdout_path
        self._stdout = open(stdout_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._stdout, stderr=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """True once a log line matches ``pattern``; False at EOF or after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
            if regex.search(line):
                return True

    def kill(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.finish(30)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            self._reader.join(timeout=10)
            self._stdout.close()
            while True:          # the rest of the log, for failure messages
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    break
                if line is not None:
                    self.lines.append(line)
        return rc


def retrain_command(env: Env, model_dir: Path, queries_file: Path) -> list[str]:
    script = Path(sys.executable).with_name("retrain-router")
    head = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from milvus_ltr_router.cli import retrain_main; "
        "sys.exit(retrain_main())"]
    cmd = head + ["--uri", env.uri, "--collection", env.collection, "--model-dir", str(model_dir),
                  "--queries", str(queries_file), "--nprobe", str(NPROBE), "--min-queries", "50",
                  "--epochs", "2", "--seed", "0", "--min-gain", "-1", "--json"]
    return cmd + (["--token", env.token] if env.token else [])


# phase, log line that starts it (the kill follows at once)
KILL_PHASES = [
    ("labelling", r"retrain: labelling \d+ queries"),
    # the first trained router is done, more to come (the linear router's adaptive head, or
    # the moment router's tuning when the layout has moments)
    ("training", r"train: router trained from \d+ initialisation"),
    ("before publish", r"retrain: adaptive nprobe, recall_target 0\.95"),
    ("after publish", r"registry: published router \S+ for"),
]


def check_live(reg: ModelRegistry, env: Env, previous: str, before: set[str]) -> list[str]:
    """What is wrong with the live router after a kill (empty: the previous one, or a new one
    completely published: pointer readable, file there and loadable, history files there)."""
    try:
        live = reg.current(env.collection)
    except RegistryError as exc:
        return [f"pointer unreadable: {exc}"]
    if live is None:
        return ["no live router"]
    problems = []
    if live.version != previous and live.version in before:
        problems.append(f"live router {live.version} is neither the previous one nor a new one")
    try:
        Router.load(live.path, layout=env.layout)
    except Exception as exc:
        problems.append(f"live router {live.version} does not load: {exc}")
    missing = [v for v in pointer_history(reg, env.collection)
               if not reg.version_path(env.collection, v).is_file()]
    if missing:
        problems.append(f"history names missing routers {missing}")
    return problems


def lock_is_free(reg: ModelRegistry, collection: str) -> bool:
    try:
        with reg.lock(collection):
            return True
    except LockedError:
        return False


def test_retrain_killed_at_each_phase_never_half_publishes(env, tmp_path):
    model_dir = tmp_path / "models"
    reg = ModelRegistry(model_dir)
    coll = env.collection
    queries_file = tmp_path / "queries.npy"
    np.save(queries_file, env.queries[:200])
    export_version(reg, env.layout, "0-initial")
    publish_locked(reg, coll, "0-initial")
    client = routed_client(env, model_dir, reload_interval=3600)
    cmd = retrain_command(env, model_dir, queries_file)
    outcomes, bad, held, failed, searches = [], [], 0, 0, 0
    try:
        for i, (phase, pattern) in enumerate(KILL_PHASES):
            previous = reg.current(coll).version
            before = set(reg.versions(coll))
            run = LoggedRun(cmd, tmp_path / f"run{i}.json")
            try:
                reached = run.wait_for(pattern, RUN_TIMEOUT)
                rc = run.kill()
            except BaseException:
                run.kill()
                raise
            assert reached, f"{phase}: log line {pattern!r} never came (rc {rc}):\n" + \
                "\n".join(run.lines[-20:])
            problems = check_live(reg, env, previous, before)
            bad += [f"{phase}: {p}" for p in problems]
            held += not lock_is_free(reg, coll)
            live = reg.current(coll).version
            try:                                           # the kind its file says it is
                kind = Router.load(reg.current(coll).path, layout=env.layout).kind
            except Exception:                              # check_live reported it
                kind = None
            status = client.reload_router(coll)            # what a serving client loads now
            if status["mode"] != kind or status["version"] != live:
                bad.append(f"{phase}: client serves {status['mode']} {status['version']} "
                           f"({status['error']}), pointer names {live}")
            try:
                hits = client.search(coll, data=env.queries[3000:3002].tolist(), limit=LIMIT)
                failed += not (len(hits) == 2 and all(len(h) == LIMIT for h in hits))
            except Exception:
                failed += 1
            searches += 1
            outcomes.append(f"{phase}: rc {rc}, "
                            f"{'new router live' if live != previous else 'previous router live'}, "
                            f"{len(leftovers(reg.collection_dir(coll)))} leftover(s)")
            assert rc == -signal.SIGKILL or phase == "after publish", \
                f"{phase}: retrain-router was not killed (rc {rc})"

        # leftovers of a killed writer, old enough to be nobody's: the next retrain removes them
        directory = reg.collection_dir(coll)
        (directory / ".tmp-0123456789abcdef.json").write_text("{half a pointer")
        (directory / ".candidate-20200101T000000000000Z.onnx").write_bytes(b"half a router")
        old = time.time() - 2 * LEFTOVER_MIN_AGE_S
        stale = leftovers(directory)
        for path in stale:
            os.utime(path, (old, old))
        young = directory / ".tmp-fedcba9876543210.json"     # may be a live writer's: kept
        young.write_text("{being written")
        previous, before = reg.current(coll).version, set(reg.versions(coll))
        run = LoggedRun(cmd, tmp_path / "final.json")
        rc = run.finish(RUN_TIMEOUT)
        assert rc == 0, "\n".join(run.lines[-30:])
        result = json.loads(run.stdout_path.read_text())
        assert result["decision"] in ("published", "kept"), result["reason"]
        bad += [f"after the final retrain: {p}" for p in check_live(reg, env, previous, before)]
        if result["decision"] == "published" and reg.current(coll).version != result["version"]:
            bad.append(f"final retrain published {result['version']} but the pointer names "
                       f"{reg.current(coll).version}")
        left = [p.name for p in stale if p.exists()]
        held += not lock_is_free(reg, coll)
    finally:
        client.close()
    print(f"\nfaults/kill -9: {len(KILL_PHASES)} kills ({'; '.join(outcomes)}); final retrain "
          f"{result['decision']}; {searches} searches, {failed} failed, {len(bad)} bad publishes, "
          f"{held} held locks, {len(left)} of {len(stale)} stale leftovers left, young leftover "
          f"{'kept' if young.exists() else 'REMOVED'}")
    assert not bad, bad
    assert held == 0 and failed == 0
    assert not left, left
    assert young.exists(), "a leftover younger than the cleanup age was removed"
    assert len(stale) >= 2


# ----------------------------------------------------------------------------- 2: hot reload
def test_hot_reload_under_load_serves_one_of_two_routers_exactly(env, tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    coll = env.collection
    va, vb = "a-centroid", "b-shifted"
    export_version(reg, env.layout, va)
    publish_locked(reg, coll, va)           # (a publish prunes unpublished files: one by one)
    export_version(reg, env.layout, vb, shift=17)
    publish_locked(reg, coll, vb)
    queries = env.queries[3000:3032]
    client = routed_client(env, tmp_path / "models", reload_interval=0, max_workers=4)
    plain = MilvusClient(uri=env.uri, token=env.token)
    try:
        layout = client.layout(coll)
        def restricted_ids(q: np.ndarray, clusters: list[int]) -> list:
            parts, expr = layout.storage.search_target(clusters, "")
            hits = plain.search(coll, data=[q.tolist()], limit=LIMIT, partition_names=parts,
                                filter=expr)[0]
            return [h["id"] for h in hits]

        expected, batch_ranks = {}, {}   # router -> per query: clusters, restricted hits' ids
        with ThreadPoolExecutor(4) as pool:
            for name, version in (("A", va), ("B", vb)):
                router = Router.load(reg.version_path(coll, version), layout=layout)
                batch_ranks[name] = router.rank(queries, NPROBE).tolist()
                clusters = [router.rank(q[None, :], NPROBE)[0].tolist() for q in queries]
                expected[name] = (clusters, list(pool.map(restricted_ids, queries, clusters)))
        # the public API agrees: route() gives the live router's clusters
        assert client.router_status(coll)["version"] == vb
        assert client.route(coll, queries) == batch_ranks["B"]
        assert reg.rollback(coll).version == va
        assert client.route(coll, queries) == batch_ranks["A"]
        publish_locked(reg, coll, vb)
        different = sum(a != b for a, b in zip(expected["A"][1], expected["B"][1]))
        assert different > len(queries) // 2, "the two routers must give different results"

        per_thread, min_per_thread, counts, problems = 50, 10, {"A": 0, "B": 0, "both": 0}, []
        stop_at = time.monotonic() + SEARCH_SECONDS       # a slow, shared server: fewer searches
        count_lock, searchers_done = threading.Lock(), threading.Event()
        swaps, swap_errors = [0], []

        def searcher(seed: int) -> None:
            for i in range(per_thread):
                if i >= min_per_thread and time.monotonic() > stop_at:
                    return
                j = (seed * 11 + i * 7) % len(queries)
                try:
                    hits = client.search(coll, data=[queries[j].tolist()], limit=LIMIT)
                    got = [h["id"] for h in hits[0]]
                except Exception as exc:
                    with count_lock:
                        problems.append(f"query {j}: search failed: {exc!r}")
                    continue
                a, b = got == expected["A"][1][j], got == expected["B"][1][j]
                with count_lock:
                    if a and b:
                        counts["both"] += 1
                    elif a or b:
                        counts["A" if a else "B"] += 1
                    else:
                        problems.append(f"query {j}: hits {got} match neither router "
                                        f"(A {expected['A'][1][j]}, B {expected['B'][1][j]})")

        def swapper() -> None:
            deadline = time.monotonic() + 60
            while not searchers_done.is_set() and time.monotonic() < deadline:
                try:
                    reg.rollback(coll)                      # -> A
                    time.sleep(0.01)
                    publish_locked(reg, coll, vb)           # -> B
                    time.sleep(0.01)
                    swaps[0] += 2
                except Exception as exc:
                    swap_errors.append(repr(exc))
                    return

        swap_thread = threading.Thread(target=swapper)
        threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
        t0 = time.monotonic()
        swap_thread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SEARCH_SECONDS + 120)
        searchers_done.set()
        swap_thread.join(timeout=30)
        seconds = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads + [swap_thread]), "a thread hung"
        status = client.router_status(coll)
    finally:
        plain.close()
        client.close()
    n = sum(counts.values()) + len(problems)
    failed = sum("search failed" in p for p in problems)
    print(f"\nfaults/hot reload: {n} searches in {seconds:.1f} s, {failed} failed, "
          f"{len(problems) - failed} matching neither router; served by A {counts['A']}, "
          f"B {counts['B']}, either {counts['both']}; {swaps[0]} publishes/rollbacks, "
          f"{len(swap_errors)} swap errors")
    assert not problems, problems[:5]
    assert not swap_errors, swap_errors
    assert counts["A"] > 0 and counts["B"] > 0, f"hot reload never switched routers: {counts}"
    assert status["mode"] == "learned" and status["error"] == ""


# ----------------------------------------------------------------------------- 3: publish vs rollback
ROLLBACKER = r"""
import json, sys, time
from milvus_ltr_router.registry import LockedError, ModelRegistry
model_dir, collection, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
reg = ModelRegistry(model_dir)
counts = {"rollbacks": 0, "locked": 0, "skipped": 0, "errors": []}
pointer = reg.pointer_path(collection)
print("ready", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        # only rollbacks shorten the history (a publish keeps at least what it found): with
        # 3 entries read here, a rollback now always has an earlier router to go back to
        if len(json.loads(pointer.read_text())["history"]) < 3:
            counts["skipped"] += 1
            time.sleep(0.05)
            continue
        reg.rollback(collection)
        counts["rollbacks"] += 1
    except LockedError:
        counts["locked"] += 1
    except Exception as exc:
        counts["errors"].append(f"{type(exc).__name__}: {exc}")
    time.sleep(0.05)
print(json.dumps(counts), flush=True)
"""


def test_concurrent_publish_and_rollback_from_two_processes(env, tmp_path):
    keep, seconds = 20, 3.0
    model_dir = tmp_path / "models"
    reg = ModelRegistry(model_dir, keep=keep)
    coll = env.collection
    base = export_version(reg, env.layout, "base", path=tmp_path / "base.onnx")
    reg.collection_dir(coll).mkdir(parents=True)
    for _ in range(keep):                   # a full history: rollbacks never run out of it
        version = reg.new_version()
        shutil.copyfile(base, reg.version_path(coll, version))
        publish_locked(reg, coll, version)
    proc = subprocess.Popen([sys.executable, "-c", ROLLBACKER, str(model_dir), coll, str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    pub = {"published": 0, "locked": 0, "errors": []}
    obs = {"checks": 0, "locked_checks": 0, "stale_reads": 0, "violations": []}

    def publisher() -> None:
        while not stop.is_set():
            version = reg.new_version()
            path = reg.version_path(coll, version)
            shutil.copyfile(base, path)
            try:
                publish_locked(reg, coll, version)
                pub["published"] += 1
            except LockedError:
                pub["locked"] += 1
                path.unlink(missing_ok=True)
            except Exception as exc:
                pub["errors"].append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)                # leave the lock free some of the time

    def observer() -> None:
        while not stop.is_set():
            try:
                stamp = reg.pointer_stamp(coll)
                live = reg.current(coll)
                there = live is not None and live.path.is_file()
                if not there and reg.pointer_stamp(coll) == stamp:
                    obs["violations"].append(f"pointer names missing router {live}")
                elif not there:
                    obs["stale_reads"] += 1          # replaced meanwhile: not a violation
                obs["checks"] += 1
                with reg.lock(coll):                # no publish/rollback in flight: all settled
                    history = pointer_history(reg, coll)
                    live = reg.current(coll)
                    pruned = [v for v in history if not reg.version_path(coll, v).is_file()]
                    if pruned or live.version not in history:
                        obs["violations"].append(f"history {history} names pruned {pruned}, "
                                                 f"live {live.version}")
                    obs["locked_checks"] += 1
            except LockedError:
                pass
            except Exception as exc:
                obs["violations"].append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.002)

    threads = [threading.Thread(target=publisher), threading.Thread(target=observer)]
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for t in threads:
            t.start()
        out, err = proc.communicate(timeout=seconds + 60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    roll = json.loads(out.strip().splitlines()[-1])
    final_history = pointer_history(reg, coll)
    on_disk = set(reg.versions(coll))
    escaped = pub["errors"] + roll["errors"]
    print(f"\nfaults/publish vs rollback: {pub['published']} publishes ({pub['locked']} locked "
          f"out), {roll['rollbacks']} rollbacks in another process ({roll['locked']} locked out, "
          f"{roll['skipped']} skipped on a short history), "
          f"{obs['checks']} pointer checks ({obs['locked_checks']} under the lock, "
          f"{obs['stale_reads']} stale reads), {len(obs['violations'])} violations, "
          f"{len(escaped)} other exceptions; {len(final_history)} in history, {len(on_disk)} "
          f"files")
    assert not escaped, escaped[:5]
    assert not obs["violations"], obs["violations"][:5]
    assert pub["published"] > 0 and roll["rollbacks"] > 0 and obs["locked_checks"] > 0
    assert set(final_history) <= on_disk and reg.current(coll).version in on_disk


# ----------------------------------------------------------------------------- 4: bad files
def test_corrupt_and_foreign_files_while_searching(env, tmp_path):
    model_dir = tmp_path / "models"
    reg = ModelRegistry(model_dir)
    coll = env.collection
    good = export_version(reg, env.layout, "good")
    good_bytes = good.read_bytes()
    publish_locked(reg, coll, "good")
    # a valid router where '../x' would lead: following the pointer there would serve it
    export_router(*linear_centroid_scorer(env.layout.centroids, env.layout.metric), env.layout,
                  coll, model_dir / "x.onnx")
    other = Layout(**{**env.layout.__dict__, "layout_id": "another-layout",
                      "clustering_id": "another-layout"})
    client = routed_client(env, model_dir, reload_interval=RELOAD)
    stop = threading.Event()
    counts = {"searches": 0, "failed": 0, "centroid": 0}
    errors: list[str] = []
    queries = env.queries[3100:3200]

    def searcher() -> None:
        i = 0
        while not stop.is_set() and counts["searches"] < 5000:
            batch = queries[(i * 2) % len(queries):(i * 2) % len(queries) + 2]
            i += 1
            try:
                hits = client.search(coll, data=batch.tolist(), limit=LIMIT)
                if not (len(hits) == 2 and all(len(h) == LIMIT for h in hits)):
                    raise AssertionError(f"short result {[len(h) for h in hits]}")
            except Exception as exc:
                counts["failed"] += 1
                errors.append(repr(exc))
            counts["searches"] += 1
            time.sleep(0.005)

    def wait_status(pred, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            status = client.router_status(coll)
            if pred(status) or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    pointer = reg.pointer_path(coll)
    faults = []

    fallback = fallback_kind(client.layout(coll))     # the layout's training-free router

    def inject(name: str, expect_error: str, break_it, fix_it, expect_version: str) -> None:
        break_it()
        status = wait_status(lambda s: s["mode"] == fallback, WAIT_S)
        fell_back = status["mode"] == fallback and expect_error in status["error"]
        searched = counts["searches"]
        fix_it()
        # a changed pointer is read at the next check; a file fixed under an unchanged pointer
        # at the next retry (backoff after 1 failure, or 2 if it was re-read before the fix)
        status2 = wait_status(lambda s: s["mode"] == "learned",
                              retry_delay(1, RELOAD) + retry_delay(2, RELOAD) + WAIT_S)
        recovered = status2["mode"] == "learned" and status2["version"] == expect_version \
            and status2["error"] == ""
        faults.append((name, fell_back, recovered, status["error"][:160],
                       counts["searches"] - searched))

    thread = threading.Thread(target=searcher)
    try:
        assert wait_status(lambda s: s["mode"] == "learned", WAIT_S)["version"] == "good"
        thread.start()
        saved = pointer.read_text()

        truncated = reg.version_path(coll, "truncated")
        truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
        inject("truncated .onnx", "not a loadable ONNX model",
               lambda: publish_locked(reg, coll, "truncated"),
               lambda: write_atomic(truncated, good_bytes), "truncated")      # fixed in place
        saved = pointer.read_text()
        inject("garbage pointer", "corrupt", lambda: pointer.write_text("{garbage, not json"),
               lambda: write_atomic(pointer, saved.encode()), "truncated")
        inject("pointer naming ../x", "invalid router version",
               lambda: write_atomic(pointer, json.dumps({**json.loads(saved),
                                                         "version": "../x"}).encode()),
               lambda: write_atomic(pointer, saved.encode()), "truncated")
        export_version(reg, env.layout, "foreign-layout", other_layout=other)
        inject("router of another layout", "trained for layout 'another-layout'",
               lambda: publish_locked(reg, coll, "foreign-layout"),
               lambda: reg.rollback(coll), "truncated")
        reg.version_path(coll, "foreign-bytes").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4096))
        inject("foreign bytes as .onnx", "not a loadable ONNX model",
               lambda: publish_locked(reg, coll, "foreign-bytes"),
               lambda: reg.rollback(coll), "truncated")
        n_parts = env.layout.n_partitions
        for n_out in (n_parts + 8, n_parts // 2):
            name = f"outputs-{n_out}"
            write_mismatched_router(env.layout, reg.version_path(coll, name), n_out)
            inject(f"router with {n_out} outputs for {n_parts} partitions",
                   f"scores give {n_out} values per query",
                   lambda name=name: publish_locked(reg, coll, name),
                   lambda: reg.rollback(coll), "truncated")
        w, b = linear_centroid_scorer(env.layout.centroids, env.layout.metric)
        w[5, 7] = np.nan
        export_router(w, b, env.layout, coll, reg.version_path(coll, "nan-weights"), nprobe=NPROBE)
        inject("NaN weights", "not finite", lambda: publish_locked(reg, coll, "nan-weights"),
               lambda: reg.rollback(coll), "truncated")
        inject("pointer naming a missing file", "router file not found",
               lambda: write_atomic(pointer, json.dumps({**json.loads(saved),
                                                         "version": "missing"}).encode()),
               lambda: export_version(reg, env.layout, "missing"), "missing")   # pointer kept
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=60)
        client.close()
    assert not thread.is_alive()
    no_fallback = [f for f in faults if not f[1]]
    not_recovered = [f for f in faults if not f[2]]
    print(f"\nfaults/files: {counts['searches']} searches, {counts['failed']} failed; "
          f"{len(faults)} faults, {len(no_fallback)} without the {fallback} fallback, "
          f"{len(not_recovered)} not recovered")
    for name, _, _, error, n in faults:
        print(f"  {name}: {n} searches while broken; {error}")
    assert counts["failed"] == 0, errors[:5]
    assert len(faults) == 9 and not no_fallback and not not_recovered, faults
    assert counts["searches"] > 0
