"""Issue 13 (findings 4, 5, 8) through a real Milvus server: whatever is wrong in the model
directory, ``RoutedMilvusClient.search`` answers (by the layout's training-free router: its
cluster moments, else centroids; ``serving.fallback_kind``), says why in ``router_status``,
and recovers once the file is fixed, without a new publish."""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.export import export_router
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import drop_layout
from milvus_ltr_router.writer import create_vector_collection
from milvus_ltr_router.registry import ModelRegistry, retry_delay
from milvus_ltr_router.router import linear_centroid_scorer
from milvus_ltr_router.serving import fallback_kind

RELOAD = 0.2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_layout(milvus_server, fixture_data):
    """2,000 real MiniLM vectors in 8 partitions (small: the server is shared)."""
    client = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    source, target = f"hard_src_{uuid.uuid4().hex[:6]}", f"hard_ivf_{uuid.uuid4().hex[:6]}"
    docs = fixture_data.docs[:2000]
    create_vector_collection(client, source, docs, ids=np.arange(len(docs)))
    report = build_layout(client, source, target, n_clusters=8, seed=0)
    yield report.layout, fixture_data.queries[:5]
    drop_layout(client, target)
    client.drop_collection(source)
    client.close()


def routed(milvus_server, model_dir):
    return RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                              model_dir=str(model_dir), nprobe=2, log_rate=0,
                              reload_interval=RELOAD)


def searched(client, layout, queries):
    hits = client.search(layout.collection, data=queries.tolist(), limit=3)
    assert len(hits) == len(queries) and all(len(h) == 3 for h in hits)
    return client.router_status(layout.collection)


def wait_for_mode(client, layout, queries, mode, seconds):
    deadline = time.monotonic() + seconds
    while True:
        status = searched(client, layout, queries)
        if status["mode"] == mode or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_model_dir_that_is_a_file_never_fails_a_search(milvus_server, small_layout, tmp_path):
    layout, queries = small_layout
    (tmp_path / "models").write_text("oops, a file")
    client = routed(milvus_server, tmp_path / "models")
    try:
        status = searched(client, layout, queries)
        assert status["mode"] == fallback_kind(layout) and "Not a directory" in status["error"]
        (tmp_path / "models").unlink()           # fixed, and a router published
        reg = ModelRegistry(tmp_path / "models")
        version = reg.new_version()
        w, b = linear_centroid_scorer(layout.centroids, layout.metric)
        export_router(w, b, layout, layout.collection, reg.version_path(layout.collection, version))
        reg.publish(layout.collection, reg.version_path(layout.collection, version), version, {})
        status = wait_for_mode(client, layout, queries, "learned", 5 * RELOAD + 1)
        assert status["mode"] == "learned" and status["version"] == version
    finally:
        client.close()


def test_bad_pointer_and_bad_router_fall_back_then_recover(milvus_server, small_layout, tmp_path):
    layout, queries = small_layout
    reg = ModelRegistry(tmp_path / "models")
    w, b = linear_centroid_scorer(layout.centroids, layout.metric)
    version = reg.new_version()
    path = reg.version_path(layout.collection, version)
    bad = w.copy()
    bad[0, 0] = np.nan
    export_router(bad, b, layout, layout.collection, path)
    reg.publish(layout.collection, path, version, {})
    client = routed(milvus_server, tmp_path / "models")
    try:
        fallback = fallback_kind(layout)             # the layout's training-free router
        status = searched(client, layout, queries)     # NaN weights: refused at load
        assert status["mode"] == fallback and "not finite" in status["error"]
        export_router(w, b, layout, layout.collection, path)   # fixed in place, same pointer
        status = wait_for_mode(client, layout, queries, "learned", retry_delay(1, RELOAD) + 2)
        assert status["mode"] == "learned" and status["version"] == version

        pointer = reg.pointer_path(layout.collection)
        good = pointer.read_text()
        pointer.write_text(json.dumps({**json.loads(good), "version": "../../elsewhere"}))
        status = wait_for_mode(client, layout, queries, fallback, 5 * RELOAD + 1)
        assert status["mode"] == fallback and "invalid router version" in status["error"]

        pointer.write_text("{corrupt")
        time.sleep(RELOAD)
        status = searched(client, layout, queries)
        assert status["mode"] == fallback and "corrupt" in status["error"]
        newer = reg.new_version()                # the next good publish repairs the pointer
        export_router(w, b, layout, layout.collection, reg.version_path(layout.collection, newer))
        reg.publish(layout.collection, reg.version_path(layout.collection, newer), newer, {})
        status = wait_for_mode(client, layout, queries, "learned", 5 * RELOAD + 1)
        assert status["version"] == newer
        assert reg.rollback(layout.collection).version == version  # history rebuilt from disk
    finally:
        client.close()


def test_rollback_cli_refuses_a_path_as_collection(small_layout, tmp_path):
    victim = ModelRegistry(tmp_path / "victim_root")
    for v in ("v1", "v2"):
        p = victim.version_path("victim", v)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        victim.publish("victim", p, v, {})
    before = victim.pointer_path("victim").read_text()
    (tmp_path / "models").mkdir()
    out = subprocess.run([sys.executable, "-m", "milvus_ltr_router.cli", "rollback", "--collection",
                          "../victim_root/victim", "--model-dir", str(tmp_path / "models")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid collection name" in out.stderr
    assert victim.pointer_path("victim").read_text() == before


# ----------------------------------------------------------------------------- 3 and 8: another user
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
OTHER_USER_CLIENT = r"""
import json, os, sys, time
import numpy as np
from milvus_ltr_router.client import RoutedMilvusClient
uri, token, coll, queries_file = sys.argv[1:5]
dirs = dict(zip(("readable", "private_dir", "private_file"), sys.argv[5:8]))
queries = np.load(queries_file)
out = {"uid": os.getuid(), "searches": 0, "failed": 0, "errors": []}

def search(client):
    out["searches"] += 1
    try:
        hits = client.search(coll, data=queries.tolist(), limit=3)
        if len(hits) != len(queries) or any(len(h) != 3 for h in hits):
            raise AssertionError(f"short result {[len(h) for h in hits]}")
    except Exception as exc:
        out["failed"] += 1
        out["errors"].append(repr(exc)[:300])
    s = client.router_status(coll)
    return {"mode": s["mode"], "version": s["version"], "error": s["error"]}

clients = {name: RoutedMilvusClient(uri=uri, token=token, model_dir=d, nprobe=2, log_rate=0,
                                    reload_interval=0.2) for name, d in dirs.items()}
for name, client in clients.items():
    out[name] = search(client)
print("WAITING", flush=True)
sys.stdin.readline()             # the operator has fixed the router file's mode meanwhile
t0 = time.monotonic()
while True:
    state = search(clients["private_file"])
    if state["mode"] == "learned" or time.monotonic() - t0 > 60:
        break
    time.sleep(0.1)
out["fixed"] = dict(state, seconds=round(time.monotonic() - t0, 2))
for client in clients.values():
    client.close()
print("DONE " + json.dumps(out), flush=True)
"""


def publish_centroid_router(reg, layout):
    version = reg.new_version()
    w, b = linear_centroid_scorer(layout.centroids, layout.metric)
    path = export_router(w, b, layout, layout.collection, reg.version_path(layout.collection, version))
    reg.publish(layout.collection, path, version, {})
    return version, path


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run the client as user nobody")
def test_a_client_running_as_another_user_reads_routers_and_never_fails_a_search(
        milvus_server, small_layout):
    """Finding 3 (files published 0600 by a root retrain; a 0700 collection dir made every
    search raise PermissionError) and 8 (a router file that was unreadable is re-read after a
    backoff, without a new publish), for a RoutedMilvusClient running as uid 65534 against the
    real server, while this process (root, umask 022) publishes."""
    layout, queries = small_layout
    coll = layout.collection
    base = Path(tempfile.mkdtemp(prefix="ltr-other-user-"))
    old_umask = os.umask(0o022)
    try:
        base.chmod(0o755)                   # the shared volume: world-traversable
        regs = {name: ModelRegistry(base / name) for name in ("readable", "private_dir",
                                                                "private_file")}
        published = {name: publish_centroid_router(reg, layout) for name, reg in regs.items()}
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)     # noqa: E731
        reg = regs["readable"]
        assert mode(published["readable"][1]) == 0o644 and mode(reg.pointer_path(coll)) == 0o644
        assert mode(reg.collection_dir(coll)) == 0o755 and mode(reg.model_dir) == 0o755
        regs["private_dir"].collection_dir(coll).chmod(0o700)
        router_file = published["private_file"][1]
        router_file.chmod(0o600)            # what the mkstemp-based publish used to leave
        np.save(base / "queries.npy", np.asarray(queries, dtype=np.float32))
        (base / "queries.npy").chmod(0o644)
        proc = subprocess.Popen(
            AS_NOBODY + [sys.executable, "-c", OTHER_USER_CLIENT, milvus_server.uri,
                         milvus_server.token or "", coll, str(base / "queries.npy")] +
            [str(regs[n].model_dir) for n in ("readable", "private_dir", "private_file")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            first = proc.stdout.readline()
            assert first.strip() == "WAITING", first + proc.stderr.read()[-3000:]
            router_file.chmod(0o644)        # fixed in place: the pointer does not change
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1].removeprefix("DONE "))
    finally:
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nfaults/another user: {result['searches']} searches as uid {result['uid']}, "
          f"{result['failed']} failed; readable dir: {result['readable']['mode']}; "
          f"0700 collection dir: {result['private_dir']['mode']}; 0600 router file: "
          f"{result['private_file']['mode']}, after chmod 0644 {result['fixed']['mode']} in "
          f"{result['fixed']['seconds']} s without a publish")
    assert result["uid"] == 65534
    assert result["failed"] == 0, result["errors"]
    assert result["readable"] == {"mode": "learned", "version": published["readable"][0],
                                  "error": ""}
    assert result["private_dir"]["mode"] == fallback_kind(layout)
    assert "Permission denied" in result["private_dir"]["error"]
    assert result["private_file"]["mode"] == fallback_kind(layout)
    assert "Permission denied" in result["private_file"]["error"], result["private_file"]
    assert result["fixed"]["mode"] == "learned"
    assert result["fixed"]["version"] == published["private_file"][0]


# ----------------------------------------------------------------------------- 4: corrupt pointer
def retrain_cli(milvus_server, collection, model_dir, queries_file, *extra):
    script = Path(sys.executable).with_name("retrain-router")
    head = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from milvus_ltr_router.cli import retrain_main; "
        "sys.exit(retrain_main())"]
    cmd = head + ["--uri", milvus_server.uri, "--collection", collection, "--model-dir",
                  str(model_dir), "--queries", str(queries_file), "--nprobe", "2",
                  "--min-queries", "100", "--epochs", "2", "--seed", "0", "--json", *extra]
    if milvus_server.token:
        cmd += ["--token", milvus_server.token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_a_real_retrain_replaces_a_corrupt_pointer_and_leaves_no_orphans(
        milvus_server, small_layout, fixture_data, tmp_path):
    """Finding 4: a corrupt CURRENT.json blocked every later publish (retrain exited 1 each
    night, leaving an orphan .onnx per run). The next good retrain-router run replaces it,
    history rebuilt from the routers on disk; a run that keeps the live router leaves
    nothing behind either."""
    layout, _ = small_layout
    coll = layout.collection
    reg = ModelRegistry(tmp_path / "models")
    w, b = linear_centroid_scorer(layout.centroids, layout.metric)
    old = ["20260101T000000000000Z", "20260102T000000000000Z"]
    for version in old:
        export_router(w, b, layout, coll, reg.version_path(coll, version))
        reg.publish(coll, reg.version_path(coll, version), version, {})
    pointer = reg.pointer_path(coll)
    pointer.write_text('{"version": "20260102T000000000000Z", "history": [')     # cut short
    qfile = tmp_path / "q.npy"
    np.save(qfile, fixture_data.queries[:400])

    run = retrain_cli(milvus_server, coll, reg.model_dir, qfile, "--min-gain", "-1")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["decision"] == "published", result["reason"]
    assert "replacing the router pointer" in run.stderr
    data = json.loads(pointer.read_text())                    # valid again
    assert data["version"] == result["version"] == reg.current(coll).version
    assert data["history"] == old + [result["version"]]
    assert reg.versions(coll) == data["history"]              # no orphan, nothing lost
    leftovers = [p.name for p in reg.collection_dir(coll).iterdir()
                 if p.name.startswith((".tmp-", ".candidate-"))]
    assert leftovers == []
    assert stat.S_IMODE(pointer.stat().st_mode) & 0o044 == 0o044     # readable by others
    # the calibration shipped only where adaptive nprobe met every target within 0.02
    from milvus_ltr_router.router import Router
    published = Router.load(reg.current(coll).path, layout=layout)
    misses = [r for r in result["adaptive"] if r["recall"] < r["recall_target"] - 0.02]
    assert [[r["recall_target"], r["recall"]] for r in misses] == result["calibration_misses"]
    assert result["training"]["calibration_published"] == (not misses)
    assert bool(published.recall_thresholds) == (not misses)

    # a run that keeps the live router: exit 0, pointer and files untouched
    before = pointer.read_bytes()
    run = retrain_cli(milvus_server, coll, reg.model_dir, qfile, "--min-gain", "0.5", "--seed", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["decision"] == "kept"
    assert pointer.read_bytes() == before and reg.versions(coll) == data["history"]
    assert not [p for p in reg.collection_dir(coll).iterdir()
                if p.name.startswith((".tmp-", ".candidate-"))]
    print(f"\nfaults/corrupt pointer: retrain-router exit 0, published {result['version']}, "
          f"history {len(data['history'])} (2 rebuilt from disk), 0 orphans, 0 leftovers; "
          f"kept run: exit 0, 0 new files")
