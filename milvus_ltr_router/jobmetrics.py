"""The retrain job's metrics in the Prometheus textfile-collector format (``--metrics-file``).

node_exporter's textfile collector (``--collector.textfile.directory``) exports every
``*.prom`` file of a directory at each scrape; a cron job writes its file there when it ends.
``retrain-router --metrics-file DIR/retrain_docs.prom`` writes, after every run whatever its
outcome (failures included), the gauges of :data:`METRICS`: when it ran, its outcome and exit
code, the held-out gain the publish gate measured, how long each phase took, how many queries
it used, and the kind and version of the router it published or weighed. Every series has a
``collection`` label (the ``--collection`` the job was given), so the files of several
collections' jobs can share a directory (one file per collection).

Everything here is pure formatting, plus :func:`write_textfile` (atomic: a temp file in the
same directory whose name does not end in ``.prom``, so the collector never reads it, fsynced,
then ``os.replace``) and :func:`read_previous` (the timestamps carried over from the file the
previous run wrote: the last success and the last publish survive a failed run). The
exposition is written by hand (a few gauges; no ``prometheus_client`` needed, so the job never
needs the ``[metrics]`` extra for it); tests parse it with prometheus_client's parser.
"""
from __future__ import annotations

import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "milvus_ltr_router_retrain_"
OUTCOMES = ("published", "kept", "dry-run", "failed")

#: name -> (help, labels besides ``collection``); every metric is a gauge. The help texts do
#: not depend on the collection: node_exporter merges same-named metrics of several files.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    PREFIX + "last_run_timestamp_seconds": (
        "When the last retrain run ended (unix time)", ()),
    PREFIX + "last_success_timestamp_seconds": (
        "When the last retrain run that exited 0 (published, kept or dry run) ended (unix time)",
        ()),
    PREFIX + "last_publish_timestamp_seconds": (
        "When the last retrain run that published a router ended (unix time)", ()),
    PREFIX + "outcome": (
        "Outcome of the last retrain run: 1 for the outcome it had, 0 for the others",
        ("outcome",)),
    PREFIX + "exit_code": (
        "Exit code of the last retrain run (0 ok, 1 operational failure, 2 bad input, "
        "3 another retrain holds the lock)", ()),
    PREFIX + "duration_seconds": (
        "Wall time of the last retrain run, start to end", ()),
    PREFIX + "phase_duration_seconds": (
        "Wall time of each phase the last retrain run timed (of a failed run: the phases that ended)", ("phase",)),
    PREFIX + "gain": (
        "Held-out gain of the last retrain run: the new router's score minus the better of the "
        "live router and centroid routing, on the deciding metric at the deciding nprobe",
        ("metric", "nprobe", "baseline")),
    PREFIX + "queries": (
        "Query vectors the last retrain run trained and evaluated on (after cleaning)", ()),
    PREFIX + "heldout_queries": (
        "Held-out test queries the last retrain run's gain was measured on", ()),
    PREFIX + "router_info": (
        "The router the last retrain run published (version set) or weighed and kept (version "
        "empty), and its kind; always 1", ("version", "kind")),
}
CARRIED = (PREFIX + "last_success_timestamp_seconds", PREFIX + "last_publish_timestamp_seconds")


@dataclass
class Sample:
    name: str
    labels: dict
    value: float


@dataclass
class RunRecord:
    """What one run of the job ended with. ``result``: its :class:`.retrain.RetrainResult`
    (None when it failed before one existed)."""

    collection: str
    exit_code: int
    started: float                        # unix seconds
    finished: float                       # unix seconds
    result: object | None = None
    metric: str = "top1"                  # --metric
    previous: dict = field(default_factory=dict)   # read_previous() of the file to replace
    phases: dict = field(default_factory=dict)     # phase -> seconds, of the phases that ended


def outcome_of(exit_code: int, result) -> str:
    """``published`` / ``kept`` / ``dry-run`` when the run exited 0 with a result, else
    ``failed`` (whatever it had done: a non-zero exit code means nothing was published)."""
    if exit_code != 0 or result is None:
        return "failed"
    decision = getattr(result, "decision", None)
    return decision if decision in OUTCOMES else "failed"


def retrain_samples(run: RunRecord) -> list[Sample]:
    """The samples of :data:`METRICS` for one run. Pure."""
    col = {"collection": run.collection}
    outcome = outcome_of(run.exit_code, run.result)
    out = [Sample(PREFIX + "last_run_timestamp_seconds", col, run.finished)]
    success = run.finished if run.exit_code == 0 else run.previous.get(CARRIED[0])
    publish = run.finished if outcome == "published" else run.previous.get(CARRIED[1])
    for name, value in zip(CARRIED, (success, publish)):
        if value is not None:
            out.append(Sample(name, col, value))
    out += [Sample(PREFIX + "outcome", {**col, "outcome": o}, float(o == outcome))
            for o in OUTCOMES]
    out.append(Sample(PREFIX + "exit_code", col, run.exit_code))
    out.append(Sample(PREFIX + "duration_seconds", col, max(0.0, run.finished - run.started)))
    res = run.result
    phases = (getattr(res, "seconds", None) if res is not None else None) or run.phases
    for phase, seconds in (phases or {}).items():
        out.append(Sample(PREFIX + "phase_duration_seconds", {**col, "phase": str(phase)},
                          seconds))
    if res is None:
        return out
    training = getattr(res, "training", None) or {}
    if res.table:                         # the gate ran: the gain is a measured one
        out.append(Sample(PREFIX + "gain", {**col, "metric": run.metric,
                                            "nprobe": str(res.nprobe),
                                            "baseline": str(res.baseline)}, res.gain))
    out.append(Sample(PREFIX + "queries", col, res.n_queries))
    if training.get("n_test") is not None:
        out.append(Sample(PREFIX + "heldout_queries", col, training["n_test"]))
    kind = training.get("router_kind")
    if kind or res.version:
        version = res.version if outcome == "published" else ""
        out.append(Sample(PREFIX + "router_info", {**col, "version": version or "",
                                                   "kind": kind or ""}, 1))
    return out


# ---------------------------------------------------------------------------- exposition
def _escape_label(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value: float) -> str:
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def format_textfile(samples: list[Sample]) -> str:
    """The text exposition format (0.0.4) of ``samples``: ``# HELP``/``# TYPE`` per metric in
    :data:`METRICS` order, then its samples; labels in the order given. Pure."""
    unknown = {s.name for s in samples} - set(METRICS)
    if unknown:
        raise ValueError(f"samples of undeclared metrics: {sorted(unknown)}")
    lines = []
    for name, (help_text, _) in METRICS.items():
        rows = [s for s in samples if s.name == name]
        if not rows:
            continue
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} gauge")
        for s in rows:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels.items())
            lines.append(f"{name}{{{labels}}} {format_value(s.value)}")
    return "\n".join(lines) + "\n"


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}\s+(\S+)\s*$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def read_previous(path: str | os.PathLike, collection: str) -> dict:
    """The carried-over timestamps (:data:`CARRIED`) of ``collection`` in the file a previous
    run wrote at ``path``; ``{}`` when there is none or it cannot be read. Never raises."""
    found: dict = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return found
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in CARRIED:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        if labels.get("collection") != _escape_label(collection):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if math.isfinite(value):
            found[m.group(1)] = value
    return found


# ---------------------------------------------------------------------------- the file
def check_metrics_path(path: str | os.PathLike) -> Path:
    """``path`` as a file this run can write, checked before any work: a directory, or a
    parent that is a file, is a bad argument (``InputError``, exit 2); a directory without
    write permission an operational failure (exit 1). Missing parents are created later."""
    from .errors import InputError, OperationalError
    p = Path(path)
    if p.is_dir():
        raise InputError(f"--metrics-file {path} is a directory; give a file path inside "
                         "node_exporter's textfile directory, e.g. DIR/retrain_docs.prom")
    existing = p.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--metrics-file {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OperationalError(f"--metrics-file {path}: no permission to write in {existing}")
    return p


def write_textfile(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temp file ``.<name>.<random>.tmp`` in the same
    directory (never ``*.prom``, so the textfile collector skips it), fsynced, then renamed over
    ``path`` (and the directory fsynced). A reader sees the old file or the new one; a failure
    leaves the old one and removes the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:                      # some file systems refuse a directory fsync
        pass
    return path


def write_retrain_metrics(path: str | os.PathLike, run: RunRecord) -> Path:
    """The metrics of ``run`` written to ``path`` (timestamps carried over from the file there)."""
    if not run.previous:
        run.previous = read_previous(path, run.collection)
    return write_textfile(path, format_textfile(retrain_samples(run)))


__all__ = ["METRICS", "OUTCOMES", "PREFIX", "RunRecord", "Sample", "check_metrics_path",
           "format_textfile", "outcome_of", "read_previous", "retrain_samples",
           "write_retrain_metrics", "write_textfile"]
