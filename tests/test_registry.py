import json

import pytest

from milvus_ltr_router.registry import ModelRegistry, RegistryError


def publish(reg, collection, n):
    versions = []
    for i in range(n):
        v = f"2026010{i}T000000000000Z"
        p = reg.version_path(collection, v)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"model %d" % i)
        reg.publish(collection, p, v, {"i": i})
        versions.append(v)
    return versions


def test_publish_rollback_prune(tmp_path):
    reg = ModelRegistry(tmp_path, keep=3)
    assert reg.current("c") is None
    versions = publish(reg, "c", 5)
    cur = reg.current("c")
    assert cur.version == versions[-1] and cur.metrics == {"i": 4}
    assert reg.versions("c") == versions[-3:]          # pruned beyond keep
    back = reg.rollback("c")
    assert back.version == versions[-2] and back.path.read_bytes() == b"model 3"
    assert json.loads(reg.pointer_path("c").read_text())["rolled_back_from"] == versions[-1]
    reg.rollback("c")
    with pytest.raises(RegistryError, match="no earlier router"):
        reg.rollback("c")


def test_publish_missing_file_and_corrupt_pointer(tmp_path):
    reg = ModelRegistry(tmp_path)
    with pytest.raises(RegistryError, match="missing model"):
        reg.publish("c", tmp_path / "nope.onnx", "v", {})
    reg.pointer_path("c").parent.mkdir(parents=True)
    reg.pointer_path("c").write_text("{not json")
    with pytest.raises(RegistryError, match="unreadable"):
        reg.current("c")


def test_lock_excludes_a_second_run(tmp_path, second_lock_attempt):
    reg = ModelRegistry(tmp_path)
    with reg.lock("c"):
        error = second_lock_attempt(tmp_path, "c")
        assert error is not None and "another retrain" in str(error)
    with reg.lock("c"):      # released afterwards
        pass


def test_publish_and_prune_take_the_lock_and_nest_inside_it(tmp_path):
    """publish() locks by itself (another process holding the lock gets LockedError), and a
    thread that already holds the lock (as retrain does) can publish and prune inside it."""
    import subprocess
    import sys
    import time as _time
    from milvus_ltr_router.registry import LockedError
    reg = ModelRegistry(tmp_path)
    v1 = publish(reg, "c", 1)[0]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from milvus_ltr_router.registry import ModelRegistry\n"
         f"with ModelRegistry({str(tmp_path)!r}).lock('c'):\n"
         "    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = reg.version_path("c", "20270101T000000000000Z")
        p.write_bytes(b"new")
        with pytest.raises(LockedError, match="another retrain"):
            reg.publish("c", p, "20270101T000000000000Z", {})
        with pytest.raises(LockedError):
            reg.prune("c")
        assert reg.current("c").version == v1            # nothing changed under the holder
    finally:
        holder.kill()
        holder.wait()
    _time.sleep(0.1)
    with reg.lock("c"):                                  # nested: no self-deadlock
        reg.publish("c", p, "20270101T000000000000Z", {})
        assert reg.prune("c") == []
    assert reg.current("c").version == "20270101T000000000000Z"


def test_prune_spares_young_unpublished_files_and_rewrites_the_pointer_first(tmp_path, monkeypatch):
    import os
    import time as _time
    from pathlib import Path
    reg = ModelRegistry(tmp_path, keep=2)
    versions = publish(reg, "c", 3)
    assert reg.versions("c") == versions[-2:]
    # A router file the history never named: young (a version about to be published) is
    # kept, old (a writer killed between writing and publishing) is removed.
    young = reg.version_path("c", "20260201T000000000000Z")
    young.write_bytes(b"in flight")
    assert reg.prune("c") == [] and young.exists()
    old = _time.time() - 3600
    os.utime(young, (old, old))
    assert reg.prune("c") == ["20260201T000000000000Z"] and not young.exists()

    # The pointer is trimmed before any file goes: a crash while deleting leaves files the
    # pointer no longer names (pruned later), never a history naming a deleted file.
    v4 = "20260301T000000000000Z"
    p = reg.version_path("c", v4)
    p.write_bytes(b"four")
    real_unlink = Path.unlink

    def failing_unlink(self, *a, **kw):
        if self.suffix == ".onnx":
            raise OSError("disk went away")
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(OSError, match="disk went away"):
        reg.publish("c", p, v4, {})
    monkeypatch.setattr(Path, "unlink", real_unlink)
    pointer = json.loads(reg.pointer_path("c").read_text())
    assert pointer["version"] == v4 and pointer["history"] == [versions[-1], v4]
    assert all(reg.version_path("c", v).exists() for v in pointer["history"])
    orphan = versions[-2]
    assert reg.version_path("c", orphan).exists()        # left by the "crash"
    assert reg.prune("c", min_age_s=0) == [orphan]
    assert reg.versions("c") == [versions[-1], v4]
