"""Issue 13 (findings 4, 5, 8) through a real Milvus server: whatever is wrong in the model
directory, ``RoutedMilvusClient.search`` answers (centroid routing), says why in
``router_status``, and recovers once the file is fixed, without a new publish."""
import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.export import export_router
from milvus_ltr_router.layout import build_layout, drop_layout
from milvus_ltr_router.milvus_io import create_vector_collection
from milvus_ltr_router.registry import ModelRegistry, retry_delay
from milvus_ltr_router.router import linear_centroid_scorer

RELOAD = 0.2


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
        assert status["mode"] == "centroid" and "Not a directory" in status["error"]
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
        status = searched(client, layout, queries)     # NaN weights: refused at load
        assert status["mode"] == "centroid" and "not finite" in status["error"]
        export_router(w, b, layout, layout.collection, path)   # fixed in place, same pointer
        status = wait_for_mode(client, layout, queries, "learned", retry_delay(1, RELOAD) + 2)
        assert status["mode"] == "learned" and status["version"] == version

        pointer = reg.pointer_path(layout.collection)
        good = pointer.read_text()
        pointer.write_text(json.dumps({**json.loads(good), "version": "../../elsewhere"}))
        status = wait_for_mode(client, layout, queries, "centroid", 5 * RELOAD + 1)
        assert status["mode"] == "centroid" and "invalid router version" in status["error"]

        pointer.write_text("{corrupt")
        time.sleep(RELOAD)
        status = searched(client, layout, queries)
        assert status["mode"] == "centroid" and "corrupt" in status["error"]
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
