"""Which pymilvus releases this package supports, and a warning where a fast path falls back.

:class:`.writer.ColumnInserter` reaches into pymilvus internals (the connection's
``batch_insert`` with a prebuilt ``InsertRequest`` and the client's call context). It checks
for those hooks and sends row dicts through pymilvus's public API when one is missing, which
is correct but slower; so that a pymilvus upgrade cannot slow every insert silently,
:func:`has_hook` / :func:`warn_missing_hook` log one WARNING per process and hook naming the
pymilvus version, the fast path and what the fallback costs. Places where a fast path does
not apply by design (milvus-lite, dynamic fields, ...) fall back without a warning.
"""
from __future__ import annotations

import logging
import threading

import pymilvus

log = logging.getLogger(__name__)

#: The oldest pymilvus release this package supports: pyproject.toml's floor, and the
#: release the second run of ``.ci/run`` installs and tests.
OLDEST_PYMILVUS = "2.6.13"
#: The first major release not supported (pyproject.toml's upper bound).
PYMILVUS_BELOW = "4"

PYMILVUS_VERSION: str = str(getattr(pymilvus, "__version__", "unknown"))

_warned: set[str] = set()
_lock = threading.Lock()


def warn_missing_hook(hook: str, fallback: str, cost: str) -> bool:
    """Log, once per process for ``hook``, that the installed pymilvus lacks ``hook`` and
    what ``fallback`` that means (``cost``: what the fallback costs). True if it logged now."""
    with _lock:
        if hook in _warned:
            return False
        _warned.add(hook)
    log.warning("pymilvus %s lacks %s: %s (%s); this package is tested with pymilvus >=%s,<%s",
                PYMILVUS_VERSION, hook, fallback, cost, OLDEST_PYMILVUS, PYMILVUS_BELOW)
    return True


def has_hook(obj, name: str, fallback: str, cost: str, owner: str | None = None) -> bool:
    """Whether ``obj`` has attribute ``name``; if not, :func:`warn_missing_hook` (the hook is
    named ``owner.name``, ``owner`` defaulting to the type of ``obj``)."""
    if hasattr(obj, name):
        return True
    warn_missing_hook(f"{owner or type(obj).__name__}.{name}", fallback, cost)
    return False
