import logging

from milvus_ltr_router import progress as progress_mod
from milvus_ltr_router.progress import ProgressCounter, progress


def test_progress_logs_periodically_when_not_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="milvus_ltr_router.progress"):
        assert list(progress(range(3), total=3, desc="embed", unit="batch", enabled=False)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("embed: 3/3 batch")


def test_counter_counts_without_a_bar():
    with ProgressCounter(10, "rows", enabled=False) as c:
        c.update(4)
        c.update(6)
    assert c.count == 10
