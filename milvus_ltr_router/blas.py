"""Routing's numpy products take turns, on one BLAS thread, when numpy's BLAS is threaded.

Routing one query is a few small products (``W q``, a moment router's sketch, a written
row's nearest centroid). A multithreaded OpenBLAS hands any product above ~10k elements to
its worker threads, which spin after each job; when many application threads do that at
once they queue on OpenBLAS's one shared pool. Measured here (2 cores): 64 threads each
computing fifty 1x384 @ 384x2048 products took 217 s of wall time, one product at a time
0.09 s; a sync routed client served by a 64-thread pool with the numpy moment router (no
router published yet) routed 17 queries a second, 638 with :func:`serial_blas` and 717
with ``OPENBLAS_NUM_THREADS=1`` (``benchmarks/bench_async.py``, docs/benchmarks.md).

:func:`serial_blas` gives each numpy routing product a turn under one lock, sets numpy's
BLAS to one thread for the turn (threadpoolctl's controller: a C call of about a
microsecond) and restores the count on the same thread after. The count is process-wide:
the application's own products that start during a turn (microseconds to a millisecond)
run on one thread too. Where numpy's BLAS is single-threaded already nothing is done -
``OPENBLAS_NUM_THREADS=1`` remains the best setting for a process that serves many
searching threads. Routers served by onnxruntime (published router files) do not use
numpy's BLAS and take no turns. (OpenBLAS's ``openblas_set_num_threads_local`` would be the
finer tool, but in its pthreads builds it sets the process-wide count too.)
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager, nullcontext
from typing import ContextManager

log = logging.getLogger(__name__)

_TURN = threading.RLock()            # a router inside a router: the same thread again
_CONTROLLERS: list | None = None        # threadpoolctl's controllers of threaded BLAS libraries
_CHECK_LOCK = threading.Lock()


def _threaded_blas() -> list:
    """threadpoolctl's controllers of the BLAS libraries numpy loaded that run >1 thread."""
    try:
        import numpy  # noqa: F401  (loads numpy's BLAS, so that threadpoolctl sees it)
        from threadpoolctl import ThreadpoolController
        return [c for c in ThreadpoolController().lib_controllers
                if c.user_api == "blas" and c.num_threads > 1]
    except Exception as exc:            # threadpoolctl missing or failing: products as they are
        log.debug("cannot control numpy's BLAS threads: %s", exc)
        return []


def _controllers() -> list:
    global _CONTROLLERS
    if _CONTROLLERS is None:
        with _CHECK_LOCK:
            if _CONTROLLERS is None:
                _CONTROLLERS = _threaded_blas()
    return _CONTROLLERS


def threaded() -> bool:
    """Whether numpy's BLAS runs threads of its own (read once per process)."""
    return bool(_controllers())


def serial_blas() -> ContextManager[None]:
    """A routing product's turn on one BLAS thread (nothing where BLAS is single-threaded)."""
    controllers = _controllers()
    return _turn(controllers) if controllers else nullcontext()


@contextmanager
def _turn(controllers: list):
    with _TURN:                         # set and restored on this thread, one turn at a time
        counts = [c.get_num_threads() for c in controllers]
        for c in controllers:
            c.set_num_threads(1)
        try:
            yield
        finally:
            for c, n in zip(controllers, counts):
                c.set_num_threads(n)
