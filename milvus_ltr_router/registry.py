"""Published routers on disk: ``<model_dir>/<collection>/<version>.onnx`` plus a pointer.

The pointer ``CURRENT.json`` names the live version and keeps the history of
published versions (for :meth:`ModelRegistry.rollback`). It is replaced by
write-then-rename, so a reader sees the old pointer or the new one, never half.

Nothing is read or written outside the model directory: collection names must
be Milvus names (letters, digits, underscore) and versions plain file-name
stems, both in arguments and in the pointer. A corrupt pointer is an error for
readers and is replaced (history rebuilt from the files on disk) by the next
publish. Publishing, pruning and rollback run under the collection's lock
(:meth:`ModelRegistry.lock`, re-entrant for one registry object within a thread, so
a retrain that holds it can publish), and remove temp files that a killed writer left behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .atomic import TEMP_PREFIX, write_atomic
from .errors import InputError, LockHeldError, OperationalError

log = logging.getLogger(__name__)

POINTER = "CURRENT.json"
LOCK_FILE = ".retrain.lock"
CANDIDATE_PREFIX = ".candidate-"                 # retrain's not-yet-published router file
LEFTOVER_PREFIXES = (TEMP_PREFIX, CANDIDATE_PREFIX)
LEFTOVER_MIN_AGE_S = 60.0                        # younger temp files may be a live writer's
MAX_NAME_LENGTH = 255                            # Milvus's limit on collection names
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")   # no separators, no leading dot
RETRY_MAX_S = 300.0

# Locks this process holds, by (lock file, thread, registry object): flock conflicts between
# two open files even inside one process, so a nested ``lock()`` must not lock again.
_HELD: dict[tuple[str, int, int], int] = {}
_HELD_GUARD = threading.Lock()


class RegistryError(OperationalError):
    pass


class LockedError(RegistryError, LockHeldError):
    """Another retrain (or rollback) holds the collection's lock."""


class InvalidNameError(RegistryError, InputError):
    """A collection name or version that is not a plain name inside the model directory."""


def check_collection_name(name) -> str:
    """``name`` if it is a Milvus collection name (so a safe directory name), else raise."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or \
            not COLLECTION_NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid collection name {name!r}: use letters, digits and underscores, starting "
            f"with a letter or underscore, at most {MAX_NAME_LENGTH} characters")
    return name


def check_version(version) -> str:
    """``version`` if it is a plain file-name stem (no path separators, no leading dot)."""
    if not isinstance(version, str) or len(version) > MAX_NAME_LENGTH or \
            not VERSION_NAME.fullmatch(version):
        raise InvalidNameError(
            f"invalid router version {version!r}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit")
    return version


def retry_delay(failures: int, interval: float, cap: float = RETRY_MAX_S) -> float:
    """Seconds a client waits before re-reading a model dir that failed ``failures`` times
    in a row: ``interval`` (at least 1 s), doubling per failure, at most ``cap``."""
    base = max(float(interval), 1.0)
    return min(base * 2.0 ** max(failures - 1, 0), max(cap, base))


@dataclass
class Published:
    collection: str
    version: str
    path: Path
    published_at: str
    metrics: dict


def write_json_atomic(path: Path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=2).encode())


def _check_pointer(data) -> dict:
    """The pointer's content, if its fields have the types and names the registry writes."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    history = data.get("history", [])
    if not isinstance(history, list):
        raise ValueError(f"history must be a list, got {type(history).__name__}")
    for version in history + ([data["version"]] if data.get("version") else []):
        check_version(version)
    if not isinstance(data.get("metrics", {}), dict):
        raise ValueError("metrics must be a JSON object")
    data["history"] = list(history)
    return data


class ModelRegistry:
    """Versions of each collection's router under one model directory."""

    def __init__(self, model_dir: str | os.PathLike = "onnx_models", keep: int = 5):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (published routers kept per "
                             f"collection, the live one included), got {keep!r}")
        # absolute once: the lock key and every path stay the same if the process changes
        # directory between a retrain's lock and its publish
        self.model_dir = Path(model_dir).absolute()
        self.keep = keep

    def collection_dir(self, collection: str) -> Path:
        return self.model_dir / check_collection_name(collection)

    def pointer_path(self, collection: str) -> Path:
        return self.collection_dir(collection) / POINTER

    def new_version(self) -> str:
        return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")

    def version_path(self, collection: str, version: str) -> Path:
        return self.collection_dir(collection) / f"{check_version(version)}.onnx"

    def _read_pointer(self, collection: str) -> dict | None:
        """The pointer's content; None when none exists; RegistryError when it cannot be read
        (the model dir is a file, a directory is unreadable) or is corrupt."""
        path = self.pointer_path(collection)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"router pointer {path} is unreadable: {exc}") from exc
        try:
            return _check_pointer(json.loads(text))
        except ValueError as exc:       # JSONDecodeError and InvalidNameError included
            raise RegistryError(f"router pointer {path} is unreadable (corrupt): {exc}") from exc

    def current(self, collection: str) -> Published | None:
        """The live router of ``collection``, or None when none was published."""
        data = self._read_pointer(collection)
        if not data or not data.get("version"):
            return None
        return Published(collection, data["version"], self.version_path(collection, data["version"]),
                         str(data.get("published_at", "")), data.get("metrics", {}))

    def pointer_stamp(self, collection: str) -> tuple | None:
        """Cheap change detector for hot reload: (mtime_ns, size, inode) of the pointer; None
        when there is none. Raises RegistryError when it cannot be checked (see _read_pointer)."""
        path = self.pointer_path(collection)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"router pointer {path} cannot be checked: {exc}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _history_on_disk(self, collection: str) -> list[str]:
        """Published versions found on disk, oldest first (their names sort by time)."""
        out = []
        for version in self.versions(collection):
            try:
                out.append(check_version(version))
            except InvalidNameError:
                continue
        return out

    def publish(self, collection: str, model_path: Path, version: str, metrics: dict) -> Published:
        """Make ``version`` (already written at ``model_path``) the live router.

        Runs under the collection's :meth:`lock` (taken here unless this thread already
        holds it through this registry object, as retrain does from before it writes the file): a publish never
        interleaves with another publish, a prune or a rollback. Raises
        :class:`LockedError` when another process holds the lock.

        A corrupt pointer does not block publishing: it is replaced, with the history
        rebuilt from the router files on disk (so rollback still has earlier versions).
        """
        check_version(version)
        if not Path(model_path).is_file():
            raise RegistryError(f"cannot publish missing model {model_path}")
        with self.lock(collection):
            return self._publish(collection, model_path, version, metrics)

    def _publish(self, collection: str, model_path: Path, version: str, metrics: dict) -> Published:
        if not Path(model_path).is_file():      # removed while waiting for the lock
            raise RegistryError(f"cannot publish missing model {model_path}")
        try:
            data = self._read_pointer(collection) or {"history": []}
        except RegistryError as exc:
            data = {"history": [v for v in self._history_on_disk(collection) if v != version]}
            log.warning("replacing the router pointer of %r (%s); history rebuilt from %d router "
                        "file(s) on disk", collection, exc, len(data["history"]))
        history = [v for v in data["history"] if v != version] + [version]
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write_pointer(collection, {
            "collection": collection, "version": version, "published_at": now,
            "metrics": metrics, "history": history})
        self.prune(collection)
        log.info("published router %s for %r", version, collection)
        return self.current(collection)

    def _write_pointer(self, collection: str, payload: dict) -> None:
        path = self.pointer_path(collection)
        try:
            write_json_atomic(path, payload)
        except OSError as exc:
            raise RegistryError(f"cannot write router pointer {path}: {exc}") from exc

    def rollback(self, collection: str) -> Published:
        """Point back at the previously published version, under the collection's lock
        (so it never interleaves with a retrain's publish)."""
        if not self.collection_dir(collection).is_dir():
            raise RegistryError(f"no router of {collection!r} was published in {self.model_dir}")
        with self.lock(collection):
            data = self._read_pointer(collection)
            if not data or len(data["history"]) < 2:
                raise RegistryError(f"no earlier router of {collection!r} to roll back to")
            history = data["history"][:-1]
            version = history[-1]
            if not self.version_path(collection, version).exists():
                raise RegistryError(f"previous router {version} of {collection!r} was pruned")
            self._write_pointer(collection, {
                "collection": collection, "version": version,
                "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": {}, "history": history, "rolled_back_from": data.get("version")})
        log.info("rolled %r back from %s to %s", collection, data.get("version"), version)
        return self.current(collection)

    def versions(self, collection: str) -> list[str]:
        return sorted(p.stem for p in self.collection_dir(collection).glob("*.onnx")
                      if not p.name.startswith("."))

    def prune(self, collection: str, min_age_s: float = LEFTOVER_MIN_AGE_S) -> list[str]:
        """Delete published versions beyond the newest ``keep`` (never the live one), under
        the collection's lock.

        The pointer is rewritten first and the files deleted after, so a crash in between
        leaves files the pointer no longer names (removed by the next prune), never a
        history naming deleted files. A router file the history never named (a writer
        killed between writing and publishing) is deleted only when older than
        ``min_age_s``: a younger one may be a version about to be published.
        """
        with self.lock(collection):
            data = self._read_pointer(collection) or {"history": []}
            live = data.get("version")
            keep = set(data["history"][-self.keep:]) | ({live} if live else set())
            named = set(data["history"]) | {data.get("rolled_back_from")}
            now = time.time()
            doomed = []
            for version in self.versions(collection):
                if version in keep:
                    continue
                path = self.collection_dir(collection) / f"{version}.onnx"
                if version not in named:
                    try:
                        if now - path.stat().st_mtime < min_age_s:
                            continue
                    except OSError:
                        continue
                doomed.append(version)
            if not doomed:
                return []
            trimmed = [v for v in data["history"] if v not in doomed]
            if live and trimmed != data["history"]:
                data["history"] = trimmed
                self._write_pointer(collection, data)
            for version in doomed:
                (self.collection_dir(collection) / f"{version}.onnx").unlink(missing_ok=True)
            log.info("pruned %d router version(s) of %r: %s", len(doomed), collection,
                     ", ".join(doomed))
            return doomed

    def clean_leftovers(self, collection: str, min_age_s: float = LEFTOVER_MIN_AGE_S) -> list[str]:
        """Remove temp files (``.tmp-*``, ``.candidate-*``) older than ``min_age_s`` that a
        killed writer left in the collection's directory; younger ones may be in use."""
        directory = self.collection_dir(collection)
        removed = []
        try:
            entries = list(directory.iterdir())
        except OSError:
            return removed              # no directory yet, or unreadable: nothing to clean
        now = time.time()
        for entry in entries:
            if not entry.name.startswith(LEFTOVER_PREFIXES):
                continue
            try:
                if not entry.is_file() or now - entry.stat().st_mtime < min_age_s:
                    continue
                entry.unlink()
            except OSError as exc:      # gone meanwhile, or not ours to remove
                log.debug("could not remove leftover %s: %s", entry, exc)
                continue
            removed.append(entry.name)
        if removed:
            log.info("removed %d leftover temp file(s) of %r: %s", len(removed), collection,
                     ", ".join(sorted(removed)))
        return removed

    @contextlib.contextmanager
    def lock(self, collection: str):
        """An exclusive, non-blocking lock: two retrains (or a retrain and a rollback) of one
        collection never overlap. Holding it, leftover temp files are cleaned.

        Re-entrant for this registry object within one thread (publish and prune take it
        themselves, and retrain calls them while holding it); another thread, process or
        registry object gets :class:`LockedError`.
        The lock file is opened without truncation and only written once locked, so a
        second process that fails to lock never erases the holder's pid.
        """
        path = self.collection_dir(collection) / LOCK_FILE
        key = (os.path.abspath(path), threading.get_ident(), id(self))
        with _HELD_GUARD:
            nested = key in _HELD
            if nested:
                _HELD[key] += 1
        if nested:
            try:
                yield
            finally:
                with _HELD_GUARD:
                    _HELD[key] -= 1
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise RegistryError(f"cannot open the lock of {collection!r} at {path}: {exc}") from exc
        with os.fdopen(fd, "r+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                holder = fh.read().strip()
                raise LockedError(f"another retrain or rollback of {collection!r} is running "
                                  f"(lock {path}{', pid ' + holder if holder else ''})") from exc
            with _HELD_GUARD:
                _HELD[key] = 1
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(str(os.getpid()))
                fh.flush()
                self.clean_leftovers(collection)
                yield
            finally:
                with _HELD_GUARD:
                    del _HELD[key]
                fcntl.flock(fh, fcntl.LOCK_UN)
