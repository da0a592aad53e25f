"""pymilvus_compat: one WARNING per process where a fast path lacks its pymilvus hook, none with
the installed pymilvus; the internals the routed calls rely on are where they expect them."""
import logging
import re
from pathlib import Path

import pytest
from pymilvus import AnnSearchRequest, DataType, MilvusClient

from milvus_ltr_router import pymilvus_compat
from milvus_ltr_router.writer import ColumnInserter

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [{"name": "id", "type": DataType.INT64, "params": {}},
          {"name": "vector", "type": DataType.FLOAT_VECTOR, "params": {"dim": 4}}]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a fresh process would: nothing warned yet."""
    monkeypatch.setattr(pymilvus_compat, "_warned", set())


def compat_warnings(caplog):
    return [r for r in caplog.records
            if r.name == pymilvus_compat.__name__ and r.levelno == logging.WARNING]


class ServerClient(MilvusClient):
    """A real MilvusClient (the installed pymilvus's methods and hooks) that never connects:
    it reports a server version and describes one collection of int64 ids and 4-d vectors."""

    def __init__(self, fields=FIELDS, dynamic=False):     # no super().__init__: no connection
        self.desc = {"fields": fields, "enable_dynamic_field": dynamic}

    def get_server_version(self, **kwargs):
        return "v2.5.0"

    def describe_collection(self, collection_name, **kwargs):
        return self.desc


class Hookless:
    """A client of a pymilvus without ``_get_connection``."""

    def get_server_version(self, **kwargs):
        return "v2.5.0"

    def describe_collection(self, collection_name, **kwargs):
        return {"fields": FIELDS, "enable_dynamic_field": False}


def test_missing_hook_warns_once_per_process(caplog):
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert not pymilvus_compat.has_hook(object(), "_get_connection",
                                            "bulk inserts fall back to row dicts",
                                            "~15 us a row of client CPU", owner="MilvusClient")
    [record] = compat_warnings(caplog)
    message = record.getMessage()
    assert message.startswith(f"pymilvus {pymilvus_compat.PYMILVUS_VERSION} lacks "
                              "MilvusClient._get_connection: bulk inserts fall back to row dicts "
                              "(~15 us a row of client CPU)")
    assert f">={pymilvus_compat.OLDEST_PYMILVUS},<{pymilvus_compat.PYMILVUS_BELOW}" in message
    # another hook gets a warning of its own, once
    assert pymilvus_compat.warn_missing_hook("X.y", "reads decode row by row", "slow")
    assert not pymilvus_compat.warn_missing_hook("X.y", "reads decode row by row", "slow")
    assert len(compat_warnings(caplog)) == 2


def test_column_inserter_without_hook_warns_once_and_falls_back(caplog):
    caplog.set_level(logging.WARNING)
    inserters = [ColumnInserter(Hookless(), "docs") for _ in range(3)]
    assert not any(i.available for i in inserters)
    [record] = compat_warnings(caplog)
    assert "lacks MilvusClient._get_connection: bulk inserts fall back to row dicts" \
        in record.getMessage()


def test_missing_call_context_warns(caplog):
    """The call context carries the database name: without ``_generate_call_context`` the
    prebuilt request would land in the default database, so the path falls back (warned)."""
    class NoContext(Hookless):
        def _get_connection(self):
            raise AssertionError("not called while planning")

    caplog.set_level(logging.WARNING)
    assert not ColumnInserter(NoContext(), "docs").available
    [record] = compat_warnings(caplog)
    assert "lacks MilvusClient._generate_call_context: bulk inserts fall back" in record.getMessage()


def test_installed_pymilvus_has_every_hook(caplog):
    caplog.set_level(logging.WARNING)
    inserter = ColumnInserter(ServerClient(), "docs")
    assert inserter.available
    assert inserter.accepts({"id": [1], "vector": [[0.0] * 4]})
    assert compat_warnings(caplog) == []


def test_fast_path_not_applying_is_no_warning(caplog):
    """Collections the prebuilt request cannot carry fall back quietly, even without hooks."""
    caplog.set_level(logging.WARNING)
    assert not ColumnInserter(ServerClient(dynamic=True), "docs").available
    sparse = FIELDS[:1] + [{"name": "s", "type": DataType.SPARSE_FLOAT_VECTOR, "params": {}}]
    assert not ColumnInserter(ServerClient(fields=sparse), "docs").available
    lite = ServerClient()
    lite.get_server_version = lambda **kw: "milvus_lite 3.2.2"
    assert not ColumnInserter(lite, "docs").available
    assert compat_warnings(caplog) == []


def test_ann_search_request_keeps_data_and_filter_where_routed_calls_set_them():
    """routed_calls.call_requests rewrites a copied AnnSearchRequest's ``_data``/``_expr``;
    a pymilvus that stores them elsewhere would silently search the caller's original rows."""
    req = AnnSearchRequest([[0.0, 1.0]], "vector", {}, 10, expr="a > 1")
    req._data, req._expr = [[1.0, 0.0]], "b < 2"
    assert req.data == [[1.0, 0.0]] and req.expr == "b < 2"


def test_supported_range_matches_pyproject_and_ci():
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = f'"pymilvus>={pymilvus_compat.OLDEST_PYMILVUS},<{pymilvus_compat.PYMILVUS_BELOW}"'
    assert spec in pyproject
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^OLDEST_PYMILVUS={re.escape(pymilvus_compat.OLDEST_PYMILVUS)}$", ci, re.M)
