"""Published routers on disk: ``<model_dir>/<collection>/<version>.onnx`` plus a pointer.

The pointer ``CURRENT.json`` names the live version and keeps the history of
published versions (for :meth:`ModelRegistry.rollback`). It is replaced by
write-then-rename, so a reader sees the old pointer or the new one, never half.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .atomic import write_atomic

log = logging.getLogger(__name__)

POINTER = "CURRENT.json"


class RegistryError(RuntimeError):
    pass


class LockedError(RegistryError):
    """Another retrain holds the collection's lock."""


@dataclass
class Published:
    collection: str
    version: str
    path: Path
    published_at: str
    metrics: dict


def write_json_atomic(path: Path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=2).encode())


class ModelRegistry:
    """Versions of each collection's router under one model directory."""

    def __init__(self, model_dir: str | os.PathLike = "onnx_models", keep: int = 5):
        self.model_dir = Path(model_dir)
        self.keep = keep

    def collection_dir(self, collection: str) -> Path:
        return self.model_dir / collection

    def pointer_path(self, collection: str) -> Path:
        return self.collection_dir(collection) / POINTER

    def new_version(self) -> str:
        return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")

    def version_path(self, collection: str, version: str) -> Path:
        return self.collection_dir(collection) / f"{version}.onnx"

    def _read_pointer(self, collection: str) -> dict | None:
        path = self.pointer_path(collection)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            data["history"] = list(data.get("history", []))
            return data
        except (OSError, ValueError) as exc:
            raise RegistryError(f"router pointer {path} is unreadable: {exc}") from exc

    def current(self, collection: str) -> Published | None:
        """The live router of ``collection``, or None when none was published."""
        data = self._read_pointer(collection)
        if not data or not data.get("version"):
            return None
        return Published(collection, data["version"], self.version_path(collection, data["version"]),
                         data.get("published_at", ""), data.get("metrics", {}))

    def pointer_stamp(self, collection: str) -> tuple | None:
        """Cheap change detector for hot reload: (mtime_ns, size) of the pointer."""
        try:
            st = self.pointer_path(collection).stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def publish(self, collection: str, model_path: Path, version: str, metrics: dict) -> Published:
        """Make ``version`` (already written at ``model_path``) the live router."""
        if not Path(model_path).is_file():
            raise RegistryError(f"cannot publish missing model {model_path}")
        data = self._read_pointer(collection) or {"history": []}
        history = [v for v in data["history"] if v != version] + [version]
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(self.pointer_path(collection), {
            "collection": collection, "version": version, "published_at": now,
            "metrics": metrics, "history": history})
        self.prune(collection)
        log.info("published router %s for %r", version, collection)
        return self.current(collection)

    def rollback(self, collection: str) -> Published:
        """Point back at the previously published version."""
        data = self._read_pointer(collection)
        if not data or len(data["history"]) < 2:
            raise RegistryError(f"no earlier router of {collection!r} to roll back to")
        history = data["history"][:-1]
        version = history[-1]
        if not self.version_path(collection, version).exists():
            raise RegistryError(f"previous router {version} of {collection!r} was pruned")
        write_json_atomic(self.pointer_path(collection), {
            "collection": collection, "version": version,
            "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": {}, "history": history, "rolled_back_from": data["version"]})
        log.info("rolled %r back from %s to %s", collection, data["version"], version)
        return self.current(collection)

    def versions(self, collection: str) -> list[str]:
        return sorted(p.stem for p in self.collection_dir(collection).glob("*.onnx")
                      if not p.name.startswith("."))

    def prune(self, collection: str) -> list[str]:
        """Delete versions beyond the newest ``keep`` (never the live one)."""
        data = self._read_pointer(collection) or {"history": []}
        live = data.get("version")
        keep = set(data["history"][-self.keep:]) | ({live} if live else set())
        removed = []
        for version in self.versions(collection):
            if version not in keep:
                self.version_path(collection, version).unlink(missing_ok=True)
                removed.append(version)
        if removed:
            data["history"] = [v for v in data["history"] if v not in removed]
            if live:
                write_json_atomic(self.pointer_path(collection), data)
        return removed

    @contextlib.contextmanager
    def lock(self, collection: str):
        """An exclusive, non-blocking lock: two retrains of one collection never overlap."""
        path = self.collection_dir(collection) / ".retrain.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise LockedError(f"another retrain of {collection!r} is running (lock {path})") from exc
            try:
                fh.write(str(os.getpid()))
                fh.flush()
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
