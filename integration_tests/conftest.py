"""A real Milvus server for the whole test session.

Chosen in this order: ``MILVUS_URI`` (+ ``MILVUS_TOKEN``) if set; else a
testcontainers Milvus container when a Docker engine answers; else the
embedded Milvus 2.3.5 standalone server of the ``milvus`` package. Never a
mock. An unreachable ``MILVUS_URI`` fails the tests; it does not skip them.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

MILVUS_IMAGE = os.environ.get("MILVUS_IMAGE", "milvusdb/milvus:v2.5.14")


@dataclass
class MilvusTarget:
    uri: str
    token: str
    kind: str           # env | docker | embedded
    description: str
    tail_log = None     # callable returning the server's log tail, when we run it


_TARGET: MilvusTarget | None = None
_ERROR: str | None = None


def _docker_engine_available() -> bool:
    try:
        import docker
        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _planned() -> str:
    if os.environ.get("MILVUS_URI"):
        return f"MILVUS_URI={os.environ['MILVUS_URI']}"
    if _docker_engine_available():
        return f"testcontainers {MILVUS_IMAGE}"
    return "embedded Milvus 2.3.5 standalone (PyPI package 'milvus'; no Docker engine found)"


def pytest_report_header(config):
    return f"milvus server for integration tests: {_planned()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _TARGET is not None:
        terminalreporter.write_line(f"integration tests ran against: {_TARGET.description}")
        if exitstatus != 0 and _TARGET.tail_log is not None:
            terminalreporter.write_line("---- Milvus server log tail ----")
            terminalreporter.write_line(_TARGET.tail_log())
    elif _ERROR:
        terminalreporter.write_line(f"integration tests had no Milvus server: {_ERROR}")


def _check_reachable(uri: str, token: str) -> str:
    from pymilvus import MilvusClient
    try:
        client = MilvusClient(uri=uri, token=token, timeout=10)
        version = client.get_server_version()
        client.close()
        return version
    except Exception as exc:
        raise RuntimeError(f"MILVUS_URI={uri} is not reachable: {exc}") from exc


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """The session's real Milvus server (see module docstring)."""
    global _TARGET, _ERROR
    uri = os.environ.get("MILVUS_URI")
    token = os.environ.get("MILVUS_TOKEN", "")
    try:
        if uri:
            version = _check_reachable(uri, token)
            _TARGET = MilvusTarget(uri, token, "env", f"MILVUS_URI={uri} (Milvus {version})")
            yield _TARGET
            return
        if _docker_engine_available():
            from testcontainers.community.milvus import MilvusContainer
            with MilvusContainer(image=MILVUS_IMAGE) as container:
                url = container.get_connection_url()
                _TARGET = MilvusTarget(url, "", "docker", f"testcontainers {MILVUS_IMAGE} at {url}")
                yield _TARGET
            return
        from benchmarks.embedded_server import start_embedded_server
        server = start_embedded_server(tmp_path_factory.mktemp("milvus-server"))
    except Exception as exc:
        _ERROR = str(exc)
        pytest.fail(f"no Milvus server for integration tests: {exc}", pytrace=False)
    _TARGET = MilvusTarget(server.uri, "", "embedded",
                           f"embedded Milvus 2.3.5 standalone at {server.uri} (logs in {server.log_dir})")
    _TARGET.tail_log = server.log_tail
    try:
        yield _TARGET
    finally:
        server.stop()


@pytest.fixture(scope="session")
def milvus_uri(milvus_server) -> str:
    return milvus_server.uri


@pytest.fixture
def client(milvus_server):
    from pymilvus import MilvusClient
    c = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    yield c
    c.close()


@pytest.fixture
def unique_name():
    """Collection names that never collide between tests or runs on a shared server."""
    def make(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:8]}"
    return make


@pytest.fixture(scope="session")
def fixture_data():
    from milvus_ltr_router.fixture import load_fixture
    return load_fixture()


@pytest.fixture(scope="session")
def wordnet_source(milvus_server, fixture_data):
    """20,000 real MiniLM vectors with scalar fields, in an unpartitioned collection."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.writer import create_vector_collection
    client = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    name = f"wordnet_src_{uuid.uuid4().hex[:6]}"
    n = len(fixture_data.docs)
    create_vector_collection(client, name, fixture_data.docs, ids=np.arange(n) * 7 + 3,
                             scalars={"title": [f"gloss {i}" for i in range(n)],
                                      "grp": [int(i % 11) for i in range(n)],
                                      "weight": [float(i) / 3 for i in range(n)]})
    client.load_collection(name)
    yield name
    client.drop_collection(name)
    client.close()


@pytest.fixture(scope="session")
def wordnet_layout(milvus_server, wordnet_source):
    """The source clustered into 64 partitions (spherical k-means), built once per session."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    client = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    target = f"wordnet_ivf_{uuid.uuid4().hex[:6]}"
    report = build_layout(client, wordnet_source, target, n_clusters=64, seed=0)
    yield report
    drop_layout(client, target)
    client.close()
