"""One error hierarchy for the whole package, and the exit code each error means.

* :class:`InputError` - bad arguments or input (unknown collection, wrong query
  dimension, an unusable query file, an option out of range): exit code 2.
  Also a ``ValueError``, so older ``except ValueError`` code keeps working.
* :class:`OperationalError` - the environment failed (Milvus unreachable, a
  broken layout or router file, too few logged queries, training failed):
  exit code 1. Also a ``RuntimeError``.
* :class:`LockHeldError` - another retrain of the same collection holds the
  lock: exit code 3.

Every command fails before it publishes anything, so exit codes 1-3 all mean
"nothing was published". :func:`exit_code` maps any exception - these, and
the foreign ones the CLI meets (pymilvus, file system, plain ``ValueError``) -
to its code; :func:`describe` says what went wrong in one line.
"""
from __future__ import annotations

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


class LtrRouterError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = EXIT_FAIL


class InputError(LtrRouterError, ValueError):
    """Bad arguments or input: the caller can fix it. Exit code 2."""

    exit_code = EXIT_USAGE


class OperationalError(LtrRouterError, RuntimeError):
    """Milvus, the layout, a router file or the job itself failed. Exit code 1."""

    exit_code = EXIT_FAIL


class LockHeldError(OperationalError):
    """Another run holds a collection's retrain lock. Exit code 3."""

    exit_code = EXIT_LOCKED


def _is_milvus_exception(exc: BaseException) -> bool:
    try:
        from pymilvus.exceptions import MilvusException
    except ImportError:  # pragma: no cover - pymilvus is a core dependency
        return False
    return isinstance(exc, MilvusException)


def exit_code(exc: BaseException) -> int:
    """The CLI exit code for ``exc`` (see the module docstring).

    Checked most specific first, so a class that is both an input and an
    operational error (``InputError`` mixed into an older ``RuntimeError``
    subclass) exits 2, and a lock error exits 3 although it is operational.
    A plain ``ValueError`` (an argument check outside the hierarchy) exits 2;
    Milvus and file-system errors exit 1.
    """
    if isinstance(exc, LockHeldError):
        return EXIT_LOCKED
    if isinstance(exc, InputError):
        return EXIT_USAGE
    if isinstance(exc, LtrRouterError):
        return EXIT_FAIL
    if _is_milvus_exception(exc) or isinstance(exc, OSError):
        return EXIT_FAIL
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    return EXIT_FAIL


def describe(exc: BaseException, uri: str | None = None) -> str:
    """A one-line message for ``exc`` that names where it came from.

    Only connection failures mention Milvus; any other ``OSError`` (a
    permission denied on the model directory, a file where a directory was
    expected) is reported as the file-system error it is, with its path.
    """
    where = f" at {uri}" if uri else ""
    if _is_milvus_exception(exc):
        return f"Milvus{where}: {getattr(exc, 'message', None) or exc}"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot reach Milvus{where}: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, LtrRouterError):
        return f"file system error: {exc}"
    return str(exc) or type(exc).__name__


class UnsupportedServerError(OperationalError):
    """The Milvus server lacks what a call needs (e.g. ``hybrid_search`` before Milvus 2.4);
    the message names the server's version. Exit code 1."""
