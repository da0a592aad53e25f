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
