"""Live recall estimates shared through the model directory, for ``milvus-ltr-router status``.

A client that samples its searches for the live recall (``recall_sample=``) keeps its
estimate in memory (``router_status()["live_recall"]``). To let ``status`` (and anything else
that reads the model directory) see it, the client publishes it as a small JSON record,

    <model_dir>/<collection>/live_recall/<client id>.json

one file per client process, replaced atomically (write-then-rename) each time it publishes.
:func:`publish_live_recall` writes one record (pure file I/O, no Milvus call);
:class:`RecallPublisher` throttles it and never raises, for a client's background thread.
:func:`read_live_recall` reads every record of a collection and combines the fresh ones that
describe the router and layout being served now (``status --json``'s ``live_recall``).

Why the model directory: it is already the state clients and the retrain job share (clients
read the published router there, and must see the same directory as ``status`` and the job),
so a record there needs no new collection, no writes through Milvus on the serving process's
connection, no extra privilege in Milvus, and works the same on milvus-lite; one file per
client means no two writers ever touch the same file. Records of clients that stopped (older
than :data:`STALE_AFTER_S`) are reported as stale and left out of the combined estimate;
publishing removes records older than :data:`PRUNE_AFTER_S`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .atomic import TEMP_PREFIX, write_atomic
from .registry import check_collection_name

log = logging.getLogger(__name__)

FORMAT = 1
SUBDIR = "live_recall"
STALE_AFTER_S = 900.0            # a record older than this is not combined (its client stopped?)
PRUNE_AFTER_S = 7 * 86400.0      # publishing removes records older than this
MIN_SAMPLES = 30                 # below_target needs this many samples (as the client's warning)
_CLIENT_ID = re.compile(r"[^A-Za-z0-9_.-]")


def default_client_id() -> str:
    """``<host>-<pid>``: one record per client process."""
    return client_id_of(f"{socket.gethostname()}-{os.getpid()}")


def client_id_of(name: str) -> str:
    """``name`` as a safe file stem (letters, digits, ``_.-``; no leading dot)."""
    clean = _CLIENT_ID.sub("_", str(name)).lstrip(".")[:128]
    return clean or "client"


def model_dir_of(target) -> Path:
    """The model directory of ``target``: a path, a :class:`.registry.ModelRegistry` (or
    anything with ``model_dir``), a :class:`.serving.RoutingTable` (``registry``), or a routed
    client (its routing table)."""
    if isinstance(target, (str, os.PathLike)):
        return Path(target)
    for path in (("model_dir",), ("registry", "model_dir"), ("_routing", "registry", "model_dir")):
        obj = target
        try:
            for attr in path:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return Path(obj)
    raise TypeError(f"no model directory in {type(target).__name__}: give a path, a "
                    "ModelRegistry or a routed client")


def records_dir(model_dir, collection: str) -> Path:
    return Path(model_dir) / check_collection_name(collection) / SUBDIR


def _finite(value, default=None):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def make_record(collection: str, live: dict, *, client_id: str, now: float,
                version: str | None = None, kind: str | None = None,
                layout_id: str | None = None) -> dict:
    """The JSON record of a client's live recall of ``collection``. ``live`` is
    ``router_status(collection)`` (its ``live_recall``, ``version``, ``mode`` and
    ``layout_id`` are used) or its ``live_recall`` part alone (then give the router's
    ``version``, ``kind`` and ``layout_id``). Pure."""
    if "live_recall" in live and "estimates" not in live:
        version = live.get("version", version)
        kind = live.get("mode", kind)
        layout_id = live.get("layout_id", layout_id)
        live = live["live_recall"] or {}
    estimates = []
    for e in live.get("estimates") or []:
        recall = _finite(e.get("recall"))
        if recall is None or int(e.get("n") or 0) < 1:
            continue
        target = e.get("recall_target")
        estimates.append({
            "recall_target": None if target is None else float(target), "k": int(e["k"]),
            "n": int(e["n"]), "total": int(e.get("total") or e["n"]), "recall": recall,
            "lower": _finite(e.get("lower"), 0.0), "upper": _finite(e.get("upper"), 1.0),
            "below_target": bool(e.get("below_target"))})
    counts = {o: int(live.get(o) or 0) for o in ("submitted", "done", "empty", "failed",
                                                  "dropped")}
    return {"format": FORMAT, "collection": collection, "client_id": client_id,
            "published_at": datetime.fromtimestamp(now, timezone.utc).isoformat(
                timespec="seconds"),
            "published_unix": now,
            "router": {"version": version, "kind": kind, "layout_id": layout_id},
            "sample_rate": _finite(live.get("sample_rate")),
            "confidence": _finite(live.get("confidence"), 0.95),
            "window": live.get("window"), "counts": counts,
            "last_error": str(live.get("last_error") or ""), "estimates": estimates}


def publish_live_recall(target, collection: str, live: dict | None, *,
                        client_id: str | None = None, version: str | None = None,
                        kind: str | None = None, layout_id: str | None = None,
                        now: float | None = None) -> Path | None:
    """Publish a client's live recall estimate of ``collection`` for ``status`` to read.

    ``target``: the model directory (see :func:`model_dir_of`); ``live``: the client's
    ``router_status(collection)``, or its ``live_recall`` part with ``version``/``kind``/
    ``layout_id`` given. Writes ``<model_dir>/<collection>/live_recall/<client_id>.json``
    atomically (default id ``<host>-<pid>``) and removes records older than
    :data:`PRUNE_AFTER_S`; returns the path, or None when there is nothing to publish
    (sampling off). Raises ``OSError`` when the directory cannot be written (see
    :class:`RecallPublisher` for a caller that must never fail).
    """
    if live is None:
        return None
    if "live_recall" in live and "estimates" not in live and live["live_recall"] is None:
        return None
    now = time.time() if now is None else float(now)
    cid = client_id_of(client_id) if client_id else default_client_id()
    collection = live.get("collection", collection) if "live_recall" in live else collection
    record = make_record(collection, live, client_id=cid, now=now, version=version, kind=kind,
                         layout_id=layout_id)
    directory = records_dir(model_dir_of(target), collection)
    path = write_atomic(directory / f"{cid}.json", json.dumps(record, indent=1).encode())
    _prune(directory, now, keep=path.name)
    return path


def _prune(directory: Path, now: float, keep: str) -> None:
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name == keep or not (entry.suffix == ".json" or
                                      entry.name.startswith(TEMP_PREFIX)):
            continue
        try:
            if now - entry.stat().st_mtime > PRUNE_AFTER_S:
                entry.unlink()
        except OSError:
            continue


class RecallPublisher:
    """Publishes a client's live recall at most every ``interval`` seconds per collection
    (:meth:`maybe_publish`), and never raises: a failure (a read-only model directory) is
    logged at most every ``warn_interval`` seconds. Thread-safe."""

    def __init__(self, target, *, client_id: str | None = None, interval: float = 30.0,
                 warn_interval: float = 300.0, clock=time.monotonic):
        self.target = target
        self.client_id = client_id_of(client_id) if client_id else default_client_id()
        self.interval, self.warn_interval, self._clock = float(interval), \
            float(warn_interval), clock
        self._last: dict[str, float] = {}
        self._last_warning = -math.inf
        self._lock = threading.Lock()
        self.failures = 0

    def maybe_publish(self, collection: str, live: dict | None, *, force: bool = False,
                      **kwargs) -> Path | None:
        """:func:`publish_live_recall` unless this collection was published less than
        ``interval`` seconds ago (``force``: now anyway); None when skipped or failed."""
        now = self._clock()
        with self._lock:
            if not force and now - self._last.get(collection, -math.inf) < self.interval:
                return None
            self._last[collection] = now
        try:
            return publish_live_recall(self.target, collection, live, client_id=self.client_id,
                                       **kwargs)
        except Exception as exc:    # noqa: BLE001 - publishing must never fail the client
            with self._lock:
                self.failures += 1
                quiet = now - self._last_warning < self.warn_interval
                if not quiet:
                    self._last_warning = now
            if not quiet:
                log.warning("live recall of %r not published to the model directory (%s: %s); "
                            "'status' will not show it", collection, type(exc).__name__, exc)
            return None


# ---------------------------------------------------------------------------- read side
def combine(estimates: list[dict]) -> dict:
    """One estimate from several clients' estimates of the same series (same target and k):
    the sample-weighted mean recall, and an interval whose each side combines the clients'
    (``sqrt(sum (n_i / N)^2 d_i^2)``, d_i a client's distance from its estimate to that end):
    one client's estimate comes back unchanged. Pure."""
    n = sum(e["n"] for e in estimates)
    w = [e["n"] / n for e in estimates]
    recall = sum(wi * e["recall"] for wi, e in zip(w, estimates))
    down = math.sqrt(sum((wi * max(e["recall"] - e["lower"], 0.0)) ** 2
                         for wi, e in zip(w, estimates)))
    up = math.sqrt(sum((wi * max(e["upper"] - e["recall"], 0.0)) ** 2
                       for wi, e in zip(w, estimates)))
    target = estimates[0]["recall_target"]
    lower, upper = max(0.0, recall - down), min(1.0, recall + up)
    return {"recall_target": target, "k": estimates[0]["k"], "n": n,
            "total": sum(e.get("total", e["n"]) for e in estimates), "recall": recall,
            "lower": lower, "upper": upper, "clients": len(estimates),
            "below_target": target is not None and n >= MIN_SAMPLES and upper < target}


def read_live_recall(model_dir, collection: str, *, version: str | None = None,
                     layout_id: str | None = None, check_router: bool = True,
                     now: float | None = None, stale_after: float = STALE_AFTER_S) -> dict | None:
    """Every client's published live recall of ``collection`` (None: no client published one).

    ``clients``: each record, newest first, with ``age_s``, ``stale`` (older than
    ``stale_after``) and ``current`` (it describes the router ``version`` and ``layout_id``
    served now; always true with ``check_router`` off); ``estimates``: one per series
    (``recall_target``, ``k``) combined over the records that are fresh and current
    (:func:`combine`), fixed nprobe first; ``unreadable``: record files that could not be read.
    """
    now = time.time() if now is None else float(now)
    directory = records_dir(model_dir, collection)
    try:
        paths = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return None
    clients, unreadable = [], []
    for path in paths:
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("estimates"), list):
                raise ValueError("not a live recall record")
            published = float(record["published_unix"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            unreadable.append({"file": path.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        router = record.get("router") or {}
        age = max(0.0, now - published)
        record["age_s"] = round(age, 1)
        record["stale"] = age > stale_after
        record["current"] = not check_router or (router.get("version") == version and
                                                 router.get("layout_id") == layout_id)
        clients.append(record)
    if not clients and not unreadable:
        return None
    clients.sort(key=lambda r: -r["published_unix"])
    series: dict[tuple, list] = {}
    for record in clients:
        if record["stale"] or not record["current"]:
            continue
        for e in record["estimates"]:
            try:
                key = (e["recall_target"], int(e["k"]))
                if int(e["n"]) >= 1:
                    series.setdefault(key, []).append(e)
            except (KeyError, TypeError, ValueError):
                continue
    order = sorted(series, key=lambda key: (key[0] is not None, key[0] or 0.0, key[1]))
    return {"directory": str(directory), "stale_after_s": stale_after,
            "estimates": [combine(series[key]) for key in order],
            "clients": clients, "unreadable": unreadable}


def describe_estimate(e: dict) -> str:
    """``recall@10 0.934 (0.921-0.946, 1850 sampled searches) at recall_target 0.9``."""
    target = "fixed nprobe" if e["recall_target"] is None else \
        f"recall_target {e['recall_target']:g}"
    below = ", BELOW TARGET" if e.get("below_target") else ""
    return (f"recall@{e['k']} {e['recall']:.3f} ({e['lower']:.3f}-{e['upper']:.3f}, "
            f"{e['n']} sampled searches) at {target}{below}")


__all__ = ["PRUNE_AFTER_S", "STALE_AFTER_S", "RecallPublisher", "combine", "default_client_id",
           "describe_estimate", "make_record", "model_dir_of", "publish_live_recall",
           "read_live_recall", "records_dir"]
