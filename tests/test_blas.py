"""blas.serial_blas: the numpy routers' products take turns on one BLAS thread when numpy's BLAS
is threaded (many threads entering a multithreaded OpenBLAS at once queue on its one
pool while its workers spin: benchmarks/bench_async.py, docs/benchmarks.md)."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from milvus_ltr_router import blas
from milvus_ltr_router.layout import Layout, partition_names_for
from milvus_ltr_router.router import CentroidRouter

threadpoolctl = pytest.importorskip("threadpoolctl")


CONTROLLED: list = []


def blas_threads() -> list[int]:
    """The thread counts of the BLAS libraries serial_blas controls (numpy's, and any other
    BLAS loaded in the test process)."""
    return sorted({c.get_num_threads() for c in CONTROLLED})


@pytest.fixture
def two_threads(monkeypatch):
    """Every BLAS loaded at two threads, and serial_blas controlling them."""
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        controllers = blas._threaded_blas()
        assert controllers, threadpoolctl.threadpool_info()
        monkeypatch.setattr(blas, "_controllers", lambda: controllers)
        CONTROLLED[:] = controllers
        yield
        CONTROLLED.clear()


def test_nothing_is_done_where_numpys_blas_is_single_threaded():
    code = """
        from milvus_ltr_router import blas
        print(blas.threaded(), type(blas.serial_blas()).__name__)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, text=True,
                         capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1",
                                                   "OMP_NUM_THREADS": "1",
                                                   "MKL_NUM_THREADS": "1"}).stdout.strip()
    assert out == "False nullcontext"


def test_a_turn_runs_on_one_thread_and_restores_the_count(two_threads):
    assert blas_threads() == [2]
    with blas.serial_blas():
        assert blas_threads() == [1]
    assert blas_threads() == [2]
    with pytest.raises(KeyError):
        with blas.serial_blas():
            raise KeyError("x")
    assert blas_threads() == [2]


def test_overlapping_products_take_turns_on_one_thread(two_threads):
    """Another thread routing while this one does waits for its turn (nested turns of one
    thread do not wait), and gets the same scores."""
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((16, 8)).astype(np.float32)
    layout = Layout(collection="docs", centroids=centroids, partition_names=partition_names_for(16),
                    sizes=np.full(16, 10, np.int64), metric="IP", algorithm="spherical", dim=8,
                    layout_id="L1")
    router = CentroidRouter(layout)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    want = router.scores(queries)
    got = {}
    finished = threading.Event()

    def other():
        with blas.serial_blas():
            got["scores"] = router.scores(queries)      # nested: its own turn again
        finished.set()
    with blas.serial_blas():                    # a routing product is running here
        t = threading.Thread(target=other)
        t.start()
        assert not finished.wait(0.3)           # ... so the other waits its turn
        assert blas_threads() == [1]
    assert finished.wait(10)
    t.join()
    assert blas_threads() == [2]
    np.testing.assert_array_equal(got["scores"], want)
