"""benchmarks/embedded_server.py: a failed start leaves no process behind and says what failed.

A failed start is provoked with a stand-in executable, so these tests go through the real
start-up code
(``start_embedded_server`` -> ``milvus.MilvusServer.start``: config, log files,
``Popen``) with a stand-in executable: a shell script that starts a helper
process of its own and never serves, or exits at once. Nothing here binds
Milvus's ports or signals a process it did not start.
"""
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("milvus", reason="the embedded server needs the [server] extra: "
                                     "pip install 'milvus-ltr-router[server]'")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process trees are read from Linux /proc")

from benchmarks.embedded_server import process_tree, start_embedded_server  # noqa: E402
from milvus_ltr_router.errors import OperationalError  # noqa: E402


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def real_milvus_pids() -> set[int]:
    """Running ``milvus run standalone`` processes (someone's real server)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, NotADirectoryError, ProcessLookupError):
            continue
        if len(cmd) >= 3 and cmd[0].endswith(b"/milvus") and cmd[1:3] == [b"run", b"standalone"]:
            found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Shared by the tests: MilvusServer unpacks its ~250 MB of binaries here once."""
    return tmp_path_factory.mktemp("embedded-milvus")


def stand_in(tmp_path, body: str) -> Path:
    script = tmp_path / "milvus"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


def test_a_start_that_never_serves_is_stopped_with_its_children(base_dir, tmp_path, monkeypatch):
    script = stand_in(tmp_path, 'sleep 300 &\n'
                                'echo $! > "$STAND_IN_PIDS/child"\n'
                                'echo $$ > "$STAND_IN_PIDS/main"\n'
                                'echo "stand-in milvus: never serves" >&2\n'
                                'wait\n')
    monkeypatch.setenv("STAND_IN_PIDS", str(tmp_path))
    others = real_milvus_pids()
    cwd = os.getcwd()
    t0 = time.monotonic()
    with pytest.raises(OperationalError) as err:
        start_embedded_server(base_dir, timeout=3, executable=script)
    took = time.monotonic() - t0
    main, child = (int((tmp_path / name).read_text()) for name in ("main", "child"))
    assert not alive(main), "the server process outlived the failed start"
    assert not alive(child), "a process the server started outlived the failed start"
    message = str(err.value)
    assert "did not serve" in message and "within 3 s" in message
    assert str(script) in message and f"pid {main}" in message
    assert "stand-in milvus: never serves" in message           # the log tail
    assert took < 3 + 20
    assert os.getcwd() == cwd
    assert all(alive(pid) for pid in others), "a running Milvus was touched"


def test_a_server_that_exits_during_start_is_reported_at_once(base_dir, tmp_path):
    script = stand_in(tmp_path, 'echo "stand-in milvus: bad config" >&2\nexit 7\n')
    t0 = time.monotonic()
    with pytest.raises(OperationalError) as err:
        start_embedded_server(base_dir, timeout=60, executable=script)
    assert time.monotonic() - t0 < 30                              # did not wait for the timeout
    message = str(err.value)
    assert "exited with code 7" in message and "stand-in milvus: bad config" in message


def test_a_missing_executable_is_named_and_the_cwd_restored(base_dir, tmp_path):
    missing = tmp_path / "no-such-milvus"
    cwd = os.getcwd()
    with pytest.raises(OperationalError, match="no-such-milvus"):
        start_embedded_server(base_dir, timeout=5, executable=missing)
    assert os.getcwd() == cwd


def test_process_tree_finds_grandchildren_only_below_the_root(tmp_path):
    import subprocess
    proc = subprocess.Popen(["/bin/sh", "-c", f'sleep 30 & echo $! > {tmp_path}/child; wait'])
    try:
        for _ in range(100):
            if (tmp_path / "child").exists() and (tmp_path / "child").read_text().strip():
                break
            time.sleep(0.05)
        child = int((tmp_path / "child").read_text())
        tree = process_tree(proc.pid)
        assert set(tree) == {proc.pid, child}
        assert os.getpid() not in tree
    finally:
        from benchmarks.embedded_server import stop_process_tree
        stop_process_tree(proc, grace=2)
    assert not alive(child) and proc.returncode is not None


def test_a_start_that_lost_a_port_race_is_tried_again(base_dir, tmp_path):
    """A server that panics because a port it was given was taken meanwhile is started again
    (each attempt counted by the stand-in); any other early exit is reported at once."""
    from benchmarks.embedded_server import START_ATTEMPTS
    counter = tmp_path / "starts"
    script = stand_in(tmp_path, f'echo x >> {counter}\n'
                                'echo "panic: listen tcp :53100: bind: address already in use" >&2\n'
                                'exit 2\n')
    with pytest.raises(OperationalError) as err:
        start_embedded_server(base_dir, timeout=60, executable=script)
    assert len(counter.read_text().split()) == START_ATTEMPTS
    assert "bind: address already in use" in str(err.value)


def test_an_old_port_panic_in_the_logs_does_not_make_a_failure_a_port_race(base_dir, tmp_path):
    """Only what this start logged counts: a bind panic left in an appended log by an earlier
    start does not get an unrelated failure retried."""
    logs = Path(base_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "milvus.log").write_text("panic: listen tcp :53100: bind: address already in use\n")
    counter = tmp_path / "starts"
    script = stand_in(tmp_path, f'echo x >> {counter}\necho "stand-in milvus: bad config" >&2\n'
                                'exit 7\n')
    with pytest.raises(OperationalError) as err:
        start_embedded_server(base_dir, timeout=60, executable=script)
    assert len(counter.read_text().split()) == 1
    assert "address already in use" not in str(err.value).split(";")[0]
