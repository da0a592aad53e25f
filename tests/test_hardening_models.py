"""Issue 13, findings 3, 4, 5, 8 and 9: the model directory and router files in production.

Published files readable by other users, no outage from a broken model dir or
pointer (with retries), no path escapes, router files checked against the
layout at load, and no leftovers, unlocked rollbacks or truncated lock files.
The client tests run ``RoutedMilvusClient``'s routing-state code with the
Milvus layout calls replaced (no server); the search path through a real
server is in ``integration_tests/test_hardening_models_server.py``.
"""
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router import serving as serving_mod
from milvus_ltr_router.atomic import write_atomic
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.export import export_router, linear_router_model, router_metadata
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.registry import (InvalidNameError, LockedError, ModelRegistry,
                                        RegistryError, check_collection_name, retry_delay)
from milvus_ltr_router.router import Router, RouterError

REPO = Path(__file__).resolve().parents[1]
N_PARTS, DIM = 32, 16


def make_layout(collection="docs", n=N_PARTS, dim=DIM, layout_id="L1"):
    centroids = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    return Layout(collection=collection, centroids=centroids, partition_names=partition_names_for(n),
                  sizes=np.ones(n, np.int64), metric="IP", algorithm="spherical", dim=dim,
                  layout_id=layout_id)


def weights(n=N_PARTS, dim=DIM, seed=2):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def publish_router(reg, layout, w=None, version=None):
    version = version or reg.new_version()
    path = export_router(weights() if w is None else w, None, layout, layout.collection,
                         reg.version_path(layout.collection, version))
    reg.publish(layout.collection, path, version, {})
    return version


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------ 3: file modes
def test_published_files_are_readable_as_the_umask_allows(tmp_path, umask_022):
    layout = make_layout()
    reg = ModelRegistry(tmp_path / "models")
    version = publish_router(reg, layout)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)     # noqa: E731
    assert mode(reg.version_path("docs", version)) == 0o644
    assert mode(reg.pointer_path("docs")) == 0o644
    assert mode(reg.collection_dir("docs")) == 0o755 and mode(reg.model_dir) == 0o755
    os.umask(0o027)
    write_atomic(tmp_path / "models" / "other" / "f.json", b"{}")
    assert mode(tmp_path / "models" / "other" / "f.json") == 0o640
    assert mode(tmp_path / "models" / "other") == 0o750


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a child as user nobody")
def test_another_user_loads_the_published_router(umask_022):
    """What a client running as another user sees: it reads pointer and router (no centroid
    fallback), and a collection dir it cannot enter is a RegistryError, not PermissionError."""
    base = Path(tempfile.mkdtemp(prefix="ltr-other-user-"))
    try:
        base.chmod(0o755)                       # the operator's model dir root: world-readable
        layout = make_layout()
        reg = ModelRegistry(base / "models")
        version = publish_router(reg, layout)
        publish_router(reg, make_layout("private"))
        reg.collection_dir("private").chmod(0o700)
        secret = export_router(weights(), None, layout, "docs", base / "secret.onnx")
        secret.chmod(0o600)                     # as the mkstemp-based publish left routers
        code = f"""
import json
from milvus_ltr_router.registry import ModelRegistry, RegistryError
from milvus_ltr_router.router import Router, RouterError
reg = ModelRegistry({str(base / 'models')!r})
out = {{"version": reg.current("docs").version,
        "kind": Router.load(reg.current("docs").path).kind}}
try:
    reg.pointer_stamp("private")
except RegistryError as exc:
    out["private_stamp"] = str(exc)
try:
    reg.current("private")
except RegistryError as exc:
    out["private_current"] = str(exc)
try:
    Router.load({str(base / 'secret.onnx')!r})
except RouterError as exc:
    out["secret"] = str(exc)
print(json.dumps(out))
"""
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        run = subprocess.run(as_nobody + [sys.executable, "-c", code], capture_output=True,
                             text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)},
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["version"] == version and out["kind"] == "learned"
        assert "Permission denied" in out["private_stamp"]
        assert "Permission denied" in out["private_current"]
        # onnxruntime alone said "not a loadable ONNX model ... system error number 13"
        assert "cannot be read" in out["secret"] and "Permission denied" in out["secret"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ 4: no outage from the model dir
@pytest.fixture
def routed(monkeypatch, tmp_path):
    """A RoutedMilvusClient with Milvus's layout calls replaced: collection 'docs' has a layout."""
    layout = make_layout()
    monkeypatch.setattr(MilvusClient, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(MilvusClient, "close", lambda self: None)
    monkeypatch.setattr(serving_mod, "laid_out_name", lambda client, name: layout.collection)
    monkeypatch.setattr(serving_mod, "current_layout_id", lambda client, name: layout.layout_id)
    monkeypatch.setattr(serving_mod, "read_layout", lambda client, name: layout)
    made = []

    def make(model_dir=tmp_path / "models", reload_interval=0.0):
        c = RoutedMilvusClient(model_dir=str(model_dir), log_rate=0, reload_interval=reload_interval)
        made.append(c)
        return c

    yield make, layout
    for c in made:
        c.close()


def test_model_dir_that_is_a_file_serves_centroids_with_a_warning(routed, tmp_path, caplog):
    make, layout = routed
    (tmp_path / "models").write_text("not a directory")
    client = make()
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.serving"):
        state = client.router_status("docs")    # search's first step; raised NotADirectoryError
    assert state["mode"] == "centroid" and state["failures"] == 1
    assert "Not a directory" in state["error"] and "router pointer" in state["error"]
    assert any("routing 'docs' by centroids" in r.getMessage() for r in caplog.records)
    with pytest.raises(RegistryError, match="unreadable"):
        ModelRegistry(tmp_path / "models").current("docs")
    with pytest.raises(RegistryError, match="cannot be checked"):
        ModelRegistry(tmp_path / "models").pointer_stamp("docs")


def test_corrupt_pointer_is_logged_and_recovers_when_fixed(routed, tmp_path, caplog, monkeypatch):
    make, layout = routed
    reg = ModelRegistry(tmp_path / "models")
    good = publish_router(reg, layout)
    text = reg.pointer_path("docs").read_text()
    reg.pointer_path("docs").write_text("{not json")
    client = make()
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.serving"):
        state = client.router_status("docs")
    assert state["mode"] == "centroid" and "corrupt" in state["error"]
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt" in r.getMessage()]
    reg.pointer_path("docs").write_text(text)   # repaired by hand: the stamp changes
    state = client.router_status("docs")
    assert state["mode"] == "learned" and state["version"] == good and state["error"] == ""


def test_failed_router_load_is_retried_with_backoff_without_a_new_publish(routed, tmp_path,
                                                                           monkeypatch):
    make, layout = routed
    reg = ModelRegistry(tmp_path / "models")
    version = reg.new_version()
    path = reg.version_path("docs", version)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a file")             # as after a transient read/copy error
    reg.publish("docs", path, version, {})
    client = make(reload_interval=0.0)
    first = client.router_status("docs")
    assert first["mode"] == "centroid" and "not a loadable ONNX model" in first["error"]
    assert first["failures"] == 1 and 0 < first["next_check_s"] <= retry_delay(1, 0.0)
    fallback = client.router("docs")
    export_router(weights(), None, layout, "docs", path)      # the file is fixed; pointer untouched
    stamp = reg.pointer_stamp("docs")
    assert client.router("docs") is fallback                  # within the backoff: not re-read yet
    real = time.monotonic
    monkeypatch.setattr(serving_mod.time, "monotonic", lambda: real() + retry_delay(1, 0.0) + 0.5)
    state = client.router_status("docs")
    assert reg.pointer_stamp("docs") == stamp
    assert state["mode"] == "learned" and state["version"] == version and state["failures"] == 0
    assert state["next_check_s"] is None


def test_consecutive_failures_back_off_longer(routed, tmp_path, monkeypatch):
    make, layout = routed
    (tmp_path / "models").write_text("not a directory")
    client = make(reload_interval=5.0)
    one = client.router_status("docs")
    real, shift = time.monotonic, [0.0]
    monkeypatch.setattr(serving_mod.time, "monotonic", lambda: real() + shift[0])
    shift[0] = 5.5                                                # past the first backoff
    two = client.router_status("docs")
    assert (one["failures"], two["failures"]) == (1, 2)
    assert one["next_check_s"] == pytest.approx(5.0, abs=1.0)     # 5 s, then 10 s
    assert two["next_check_s"] == pytest.approx(10.0, abs=1.0)
    assert retry_delay(1, 5.0) == 5.0 and retry_delay(3, 5.0) == 20.0 and retry_delay(30, 5.0) == 300.0
    assert retry_delay(1, 0.0) == 1.0                              # never a reload per search


def test_next_publish_replaces_a_corrupt_pointer(tmp_path, caplog):
    layout = make_layout()
    reg = ModelRegistry(tmp_path / "models", keep=5)
    old = [publish_router(reg, layout, version=f"2026010{i}T000000000000Z") for i in range(2)]
    reg.pointer_path("docs").write_text('{"version": 3')
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.registry"):
        new = publish_router(reg, layout, version="20260105T000000000000Z")
    assert reg.current("docs").version == new
    assert json.loads(reg.pointer_path("docs").read_text())["history"] == old + [new]
    assert any("replacing the router pointer" in r.getMessage() for r in caplog.records)
    assert reg.versions("docs") == old + [new]                # nothing orphaned or lost
    assert reg.rollback("docs").version == old[-1]


# ------------------------------------------------------------------ 5: path escapes
def test_collection_names_are_milvus_names():
    for ok in ("docs", "docs_ivf", "_x1", "A" * 255):
        assert check_collection_name(ok) == ok
    for bad in ("", "1abc", "a-b", "a/b", "..", "../../victim", "a b", "/etc", "A" * 256, None):
        with pytest.raises(InvalidNameError, match="invalid collection name"):
            check_collection_name(bad)
    assert issubclass(InvalidNameError, ValueError)           # CLI: bad argument, exit 2


def test_rollback_cannot_escape_the_model_dir(tmp_path):
    victim = ModelRegistry(tmp_path / "elsewhere")
    for i in range(2):
        p = victim.version_path("victim", f"v{i}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        victim.publish("victim", p, f"v{i}", {})
    before = victim.pointer_path("victim").read_text()
    reg = ModelRegistry(tmp_path / "models" / "inner")
    reg.model_dir.mkdir(parents=True)           # so that ../.. resolves on the way out
    with pytest.raises(InvalidNameError):
        reg.rollback("../../elsewhere/victim")
    assert victim.pointer_path("victim").read_text() == before
    with pytest.raises(InvalidNameError):
        reg.publish("../x", victim.version_path("victim", "v1"), "v1", {})
    with pytest.raises(InvalidNameError, match="invalid router version"):
        reg.version_path("docs", "../../x")
    with pytest.raises(InvalidNameError, match="invalid router version"):
        reg.publish("docs", victim.version_path("victim", "v1"), "/abs/v1", {})


@pytest.mark.parametrize("escape", ["../../outside", "ABSOLUTE", "../docs2/v"])
def test_pointer_naming_a_file_outside_is_not_served(routed, tmp_path, escape):
    make, layout = routed
    reg = ModelRegistry(tmp_path / "models")
    publish_router(reg, layout)
    outside = export_router(weights(seed=9), None, layout, "docs", tmp_path / "outside.onnx")
    version = str(outside.with_suffix("")) if escape == "ABSOLUTE" else escape
    pointer = json.loads(reg.pointer_path("docs").read_text())
    reg.pointer_path("docs").write_text(json.dumps({**pointer, "version": version}))
    with pytest.raises(RegistryError, match="invalid router version"):
        reg.current("docs")
    state = make().router_status("docs")
    assert state["mode"] == "centroid" and "invalid router version" in state["error"]


def test_pointer_history_entries_are_checked(tmp_path):
    layout = make_layout()
    reg = ModelRegistry(tmp_path / "models")
    publish_router(reg, layout)
    pointer = json.loads(reg.pointer_path("docs").read_text())
    reg.pointer_path("docs").write_text(json.dumps({**pointer, "history": ["../../x"] +
                                                    pointer["history"]}))
    with pytest.raises(RegistryError, match="invalid router version '../../x'"):
        reg.rollback("docs")


# ------------------------------------------------------------------ 8: router files checked at load
def save_raw(tmp_path, name, w, meta, adaptive=None):
    """A router file whose metadata may disagree with its graph (export refuses to write one)."""
    graph_meta = dict(meta, partition_names=json.dumps(partition_names_for(len(w))))
    model = linear_router_model(w, None, graph_meta, adaptive)
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("n_outputs", [40, 16])
def test_router_with_more_or_fewer_outputs_than_partitions_is_refused(tmp_path, n_outputs):
    layout = make_layout()
    path = save_raw(tmp_path, "r.onnx", weights(n_outputs), router_metadata(layout, "docs"))
    with pytest.raises(RouterError, match=rf"scores give {n_outputs} values per query .* "
                                          rf"names {N_PARTS} partitions"):
        Router.load(path, layout=layout)


def test_router_with_nan_weights_is_refused(tmp_path):
    layout = make_layout()
    w = weights()
    w[3, 5] = np.nan
    path = export_router(w, None, layout, "docs", tmp_path / "nan.onnx")
    with pytest.raises(RouterError, match="not finite"):
        Router.load(path, layout=layout)
    bad_head = export_router(weights(), None, layout, "docs", tmp_path / "head.onnx",
                             adaptive_head=(np.full((N_PARTS, DIM), np.inf, np.float32), None))
    with pytest.raises(RouterError, match="adaptive head scores .* not finite"):
        Router.load(bad_head, layout=layout)
    assert Router.load(export_router(weights(), None, layout, "docs", tmp_path / "ok.onnx"),
                       layout=layout).kind == "learned"


@pytest.mark.parametrize("key, value, message", [
    ("temperature", "0", "temperature must be finite and > 0"),
    ("temperature", "NaN", "temperature must be finite and > 0"),
    ("temperature", "-2", "temperature must be finite and > 0"),
    ("nprobe", "0", r"nprobe 0 is outside \[1, 32\]"),
    ("nprobe", "33", r"nprobe 33 is outside \[1, 32\]"),
    ("recall_thresholds", '[[0.5, 1.5, 3.0]]', "recall_thresholds row"),
    ("recall_thresholds", '[[0.5, 0.9, 40.0]]', "recall_thresholds row"),
    ("recall_thresholds", '[[-0.1, 0.9, 2.0]]', "recall_thresholds row"),
    ("recall_thresholds", '[[0.5, 0.9]]', "recall_thresholds row"),
    ("recall_thresholds", '{"a": 1}', "must be a list"),
    ("stopping_model", json.dumps({"coef": [float("nan")] + [0.0] * 7, "intercept": 0.0}),
     "non-finite coefficients"),
    ("partition_names", json.dumps(["c0000"] * N_PARTS), "distinct"),
])
def test_router_metadata_out_of_range_is_refused(tmp_path, key, value, message):
    layout = make_layout()
    meta = dict(router_metadata(layout, "docs"), **{key: value})
    path = save_raw(tmp_path, "m.onnx", weights(), meta)
    with pytest.raises(RouterError, match=message):
        Router.load(path)


def test_sane_metadata_still_loads(tmp_path):
    layout = make_layout()
    path = export_router(weights(), None, layout, "docs", tmp_path / "ok.onnx", nprobe=32,
                         temperature=0.5, recall_thresholds=[[0.9, 0.4, 1.0], [1e-5, 1.0, 32.0]])
    router = Router.load(path, layout=layout)
    assert router.default_nprobe == 32 and router.temperature == 0.5
    assert router.rank(np.ones((1, DIM), np.float32), 32).shape == (1, 32)


# ------------------------------------------------------------------ 9: leftovers, locks, keep
def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_publish_and_lock_remove_old_leftovers_only(tmp_path):
    layout = make_layout()
    reg = ModelRegistry(tmp_path / "models")
    publish_router(reg, layout)
    d = reg.collection_dir("docs")
    old = [d / ".tmp-1a2b3c.onnx", d / ".tmp-9f8e.json", d / ".candidate-20260101T0Z.onnx"]
    fresh = [d / ".tmp-live.json", d / ".candidate-20260102T0Z.onnx"]
    for p in old + fresh:
        p.write_bytes(b"x")
    for p in old:
        age(p, 600)
    publish_router(reg, layout)
    assert not any(p.exists() for p in old) and all(p.exists() for p in fresh)
    for p in fresh:
        age(p, 600)
    with reg.lock("docs"):                      # what retrain takes first
        pass
    assert not any(p.exists() for p in fresh)
    assert (d / "CURRENT.json").exists() and (d / ".retrain.lock").exists()


def test_rollback_takes_the_retrain_lock(tmp_path):
    layout = make_layout()
    reg = ModelRegistry(tmp_path / "models")
    publish_router(reg, layout, version="20260101T000000000000Z")
    publish_router(reg, layout, version="20260102T000000000000Z")
    before = reg.pointer_path("docs").read_text()
    with reg.lock("docs"):
        with pytest.raises(LockedError, match="another retrain or rollback of 'docs'"):
            ModelRegistry(tmp_path / "models").rollback("docs")
    assert reg.pointer_path("docs").read_text() == before
    assert reg.rollback("docs").version == "20260101T000000000000Z"


def test_lock_file_keeps_the_holders_pid(tmp_path, second_lock_attempt):
    reg = ModelRegistry(tmp_path)
    lock_file = reg.collection_dir("c") / ".retrain.lock"
    with reg.lock("c"):
        assert lock_file.read_text() == str(os.getpid())
        error = second_lock_attempt(tmp_path, "c")
        assert error is not None and f"pid {os.getpid()}" in str(error)
        assert lock_file.read_text() == str(os.getpid())      # the failed attempt erased nothing


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_keep_must_be_at_least_one(tmp_path, keep):
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        ModelRegistry(tmp_path, keep=keep)


def test_keep_one_keeps_only_the_live_router(tmp_path):
    layout = make_layout()
    reg = ModelRegistry(tmp_path / "models", keep=1)
    versions = [publish_router(reg, layout, version=f"2026010{i}T000000000000Z") for i in range(3)]
    assert reg.versions("docs") == versions[-1:]
    assert reg.current("docs").version == versions[-1]


def test_retrain_refuses_keep_zero_before_touching_milvus():
    pytest.importorskip("torch")
    from milvus_ltr_router.retrain import RetrainConfig, retrain
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        retrain(client=None, cfg=RetrainConfig(collection="c", keep=0))


# ------------------------------------------------------------------ cold start by moments (issue 20)
def with_moments(layout, seed=3):
    """``layout`` with the cluster moments of random rows assigned to its centroids."""
    from milvus_ltr_router.clustering import assign_clusters
    from milvus_ltr_router.moments import cluster_moments
    rows = np.random.default_rng(seed).standard_normal((40 * layout.n_clusters, layout.dim))
    rows = rows.astype(np.float32)
    clusters = assign_clusters(rows, layout.centroids, layout.algorithm)
    layout.moments = cluster_moments(rows, clusters, layout.n_clusters, rank=4)
    return layout


@pytest.fixture
def moments_layout(routed):
    make, layout = routed
    with_moments(layout)           # the fixture's read_layout returns this very object
    return make, layout


def test_cold_start_routes_by_the_layouts_moments(moments_layout):
    from milvus_ltr_router.router import CentroidRouter, MomentRouter
    make, layout = moments_layout
    assert serving_mod.fallback_kind(layout) == "moments"
    assert serving_mod.fallback_kind(make_layout()) == "centroid"
    client = make()
    state = client.router_status("docs")
    assert state["mode"] == "moments" and state["error"] == "no router published"
    assert state["version"] is None and state["failures"] == 0
    router = client.router("docs")
    assert isinstance(router, MomentRouter)
    queries = np.random.default_rng(5).standard_normal((20, DIM)).astype(np.float32)
    np.testing.assert_array_equal(client.route("docs", queries, nprobe=4),
                                  MomentRouter(layout).rank(queries, 4))
    assert not np.array_equal(client.route("docs", queries, nprobe=4),
                              CentroidRouter(layout).rank(queries, 4))   # not centroids after all
    assert client.router("docs") is router          # re-checks keep the same fallback


def test_unusable_router_falls_back_to_moments_and_recovers(moments_layout, tmp_path, caplog):
    make, layout = moments_layout
    reg = ModelRegistry(tmp_path / "models")
    good = publish_router(reg, layout)
    text = reg.pointer_path("docs").read_text()
    reg.pointer_path("docs").write_text("{not json")
    client = make()
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.serving"):
        state = client.router_status("docs")
    assert state["mode"] == "moments" and "corrupt" in state["error"] and state["failures"] == 1
    assert any("routing 'docs' by its cluster moments" in r.getMessage() for r in caplog.records)
    reg.pointer_path("docs").write_text(text)
    state = client.router_status("docs")
    assert state["mode"] == "learned" and state["version"] == good and state["error"] == ""


def test_router_for_another_layout_falls_back_to_moments(moments_layout, tmp_path):
    make, layout = moments_layout
    reg = ModelRegistry(tmp_path / "models")
    publish_router(reg, make_layout(layout_id="L0"))      # trained for an older build
    state = make().router_status("docs")
    assert state["mode"] == "moments" and "retrain the router" in state["error"]


def test_moments_of_other_clusters_fall_back_to_centroids(routed, caplog):
    make, layout = routed
    layout.moments = with_moments(make_layout(n=N_PARTS - 1)).moments
    assert serving_mod.fallback_kind(layout) == "centroid"
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.serving"):
        state = make().router_status("docs")
    assert state["mode"] == "centroid" and state["error"] == "no router published"
    assert any("cluster moments of 'docs' cannot route it" in r.getMessage()
               for r in caplog.records)
