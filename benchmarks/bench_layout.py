"""Layout build throughput: seconds and rows/s per phase of ``build_layout`` (issues 3 and 14).

Vectors: a real set when it is cached (``--data auto``: ``large`` up to its
289,382 rows, ``xlarge`` up to 1,000,000; rows are its first N documents),
else the real MiniLM fixture tiled with small noise (throughput depends on
size and dimension, not on where vectors came from). Runs against
``MILVUS_URI`` or the embedded Milvus 2.3.5 server; milvus-lite with ``--lite``.

``--baseline PATH`` also builds the same source with the package found at
``PATH`` (e.g. a ``git worktree`` of an older commit), in a subprocess, the two
builds interleaved ``--repeat`` times, and prints both and their ratio: the
before/after table of one session on one machine.

    python -m benchmarks.bench_layout [--rows 100000] [--clusters N] [--lite] [--quick]
    python -m benchmarks.bench_layout --rows 1000000 --baseline /tmp/base
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

from benchmarks.common import peak_rss_mib, print_table, save, setup_logging

PHASES = ("read", "cluster", "refine", "assign", "write", "index_load", "verify")


def tiled_vectors(n_rows: int, seed: int = 0) -> np.ndarray:
    from milvus_ltr_router.fixture import load_fixture
    base = load_fixture().docs
    rng = np.random.default_rng(seed)
    reps = int(np.ceil(n_rows / len(base)))
    out = np.concatenate([base] * reps)[:n_rows]
    out += rng.normal(0, 0.02, out.shape).astype(np.float32)
    return out


def bench_vectors(n_rows: int, data: str = "auto") -> tuple[np.ndarray, str]:
    """``n_rows`` document vectors and where they came from (see the module docstring)."""
    from benchmarks.datasets import CACHE_FILES, EmbeddingDataset, cache_dir
    if data == "auto":
        sizes = {"large": 289_382, "xlarge": 1_000_000}
        data = next((name for name, size in sizes.items()
                     if n_rows <= size and (cache_dir() / CACHE_FILES[name]).exists()), "tiled")
    if data == "tiled":
        return tiled_vectors(n_rows), "fixture tiled with noise"
    docs = EmbeddingDataset.load(cache_dir() / CACHE_FILES[data]).docs
    if n_rows > len(docs):
        raise SystemExit(f"--rows {n_rows} is more than the {len(docs)} rows of {data!r}")
    return np.ascontiguousarray(docs[:n_rows]), f"{data} (real, first {n_rows} rows)"


def create_source(client, name: str, vecs: np.ndarray) -> float:
    """The source collection (id, vector, an int tag), written column-wise; seconds taken."""
    from pymilvus import DataType, MilvusClient
    from milvus_ltr_router.schema import vector_index_params
    from milvus_ltr_router.writer import ParallelWriter
    t0 = time.perf_counter()
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vecs.shape[1])
    schema.add_field("tag", DataType.INT64)
    client.create_collection(name, schema=schema,
                             index_params=vector_index_params(client, "vector", "IP"))
    ids = np.arange(len(vecs), dtype=np.int64)
    with ParallelWriter(client, name, writers=2) as writer:
        for start in range(0, len(vecs), 65536):
            sl = slice(start, start + 65536)
            writer.submit({"id": ids[sl], "vector": vecs[sl], "tag": ids[sl] % 97})
    client.flush(name)
    client.load_collection(name)
    return time.perf_counter() - t0


_BASELINE_SNIPPET = """
import json, resource, sys, time
import milvus_ltr_router
from pymilvus import MilvusClient
from milvus_ltr_router.layout import drop_layout
try:
    from milvus_ltr_router.build import build_layout
except ImportError:     # a baseline from before the layout's stages had modules of their own
    from milvus_ltr_router.layout import build_layout
uri, src, dst, n_clusters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = MilvusClient(uri)
try:
    report = build_layout(client, src, dst, n_clusters=n_clusters)
finally:
    drop_layout(client, dst)
print("BASELINE_RESULT " + json.dumps({"seconds": report.seconds, "package": milvus_ltr_router.__file__,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_with(uri: str, src: str, n_clusters: int, package_root: str | None,
               keep: str | None = None) -> dict:
    """One build of ``src``: with this checkout's package, or in a subprocess with the package
    at ``package_root``. Returns ``{"seconds": {...}, "package": ..., "peak_rss_mib": ...}``.
    ``keep`` (current code only) names the target and leaves it for the caller to drop."""
    dst = keep or f"bench_ivf_{uuid.uuid4().hex[:6]}"
    if package_root is None:
        import milvus_ltr_router
        from pymilvus import MilvusClient
        from milvus_ltr_router.build import build_layout
        from milvus_ltr_router.layout import drop_layout
        client = MilvusClient(uri)
        try:
            report = build_layout(client, src, dst, n_clusters=n_clusters)
        finally:
            if keep is None:
                drop_layout(client, dst)
            client.close()
        return {"seconds": report.seconds, "package": milvus_ltr_router.__file__,
                "peak_rss_mib": peak_rss_mib()}
    env = dict(os.environ, PYTHONPATH=os.path.abspath(package_root))
    proc = subprocess.run([sys.executable, "-c", _BASELINE_SNIPPET, uri, src, dst, str(n_clusters)],
                          env=env, cwd=package_root, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BASELINE_RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"baseline build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(line.split(" ", 1)[1])
    if not out["package"].startswith(os.path.abspath(package_root)):
        raise RuntimeError(f"baseline imported {out['package']}, not the package under {package_root}")
    return out


_READOUT_SNIPPET = """
import json, sys, time
import milvus_ltr_router
from pymilvus import MilvusClient
from milvus_ltr_router.layout import read_layout
try:
    from milvus_ltr_router.readout import iter_layout_blocks
except ImportError:     # a baseline from before the layout's stages had modules of their own
    from milvus_ltr_router.layout import iter_layout_blocks
client = MilvusClient(sys.argv[1])
layout = read_layout(client, sys.argv[2])
t0, n = time.perf_counter(), 0
for ids, vecs, cid in iter_layout_blocks(client, layout):
    n += len(ids)
print("READOUT_RESULT " + json.dumps({"rows": n, "seconds": time.perf_counter() - t0,
      "package": milvus_ltr_router.__file__}))
"""


def readout_with(uri: str, collection: str, package_root: str) -> dict:
    """``iter_layout_blocks`` over a laid-out ``collection`` (what a local-label retrain streams),
    with the package at ``package_root``, in a subprocess: ``{"rows", "seconds", "package"}``."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(package_root))
    proc = subprocess.run([sys.executable, "-c", _READOUT_SNIPPET, uri, collection], env=env,
                          cwd=package_root, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("READOUT_RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"read-out failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line.split(" ", 1)[1])


def row_of(label: str, n_rows: int, dim: int, n_clusters: int, result: dict) -> dict:
    s = result["seconds"]
    total = sum(s.values())
    row = {"code": label, "rows": n_rows, "dim": dim, "L": n_clusters, "total_s": total,
           "rows_per_s": n_rows / total, "peak_rss_mib": result["peak_rss_mib"]}
    for phase in PHASES:
        row[f"{phase}_s"] = s.get(phase)
    # rows/s of a pass over every row; the code before issue 14 read Milvus twice: a sample
    # pass ("read", vectors only) and a second read-out inside "assign"
    for phase in ("read", "assign", "write", "index_load"):
        if s.get(phase):
            row[f"{phase}_rows_per_s"] = n_rows / s[phase]
    return row


def run(uri: str, label: str, n_rows: int, n_clusters: int, data: str = "auto",
        baseline: str | None = None, repeat: int = 1, readout: bool = False
        ) -> tuple[list[dict], dict]:
    from pymilvus import MilvusClient
    vecs, origin = bench_vectors(n_rows, data)
    client = MilvusClient(uri)
    src = f"bench_src_{uuid.uuid4().hex[:6]}"
    rows, readouts = [], []
    kept = f"bench_kept_{uuid.uuid4().hex[:6]}" if readout else None
    try:
        insert_s = create_source(client, src, vecs)
        dim = vecs.shape[1]
        del vecs
        for i in range(repeat):
            if baseline:
                rows.append(row_of("baseline", n_rows, dim, n_clusters,
                                   build_with(uri, src, n_clusters, baseline)))
            rows.append(row_of("current", n_rows, dim, n_clusters,
                               build_with(uri, src, n_clusters, None,
                                          keep=kept if i == repeat - 1 else None)))
        if readout:     # the retrain's read-out of the laid-out collection, both codes interleaved
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            for code, root in ([("baseline", baseline)] if baseline else []) + [("current", here)]:
                r = readout_with(uri, kept, root)
                readouts.append({"code": code, "rows": r["rows"], "seconds": r["seconds"],
                                 "rows_per_s": r["rows"] / r["seconds"]})
    finally:
        if kept:
            from milvus_ltr_router.layout import drop_layout
            drop_layout(client, kept)
        client.drop_collection(src)
        client.close()
    return rows, {"backend": label, "vectors": origin, "insert_source_s": insert_s,
                  "load_avg": os.getloadavg(), "readout": readouts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=None,
                        help="default round(sqrt(rows)), as build-layout")
    parser.add_argument("--data", choices=["auto", "large", "xlarge", "tiled"], default="auto")
    parser.add_argument("--baseline", default=None, metavar="PATH",
                        help="also build with the package under PATH (a worktree of older code)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved builds per code")
    parser.add_argument("--readout", action="store_true",
                        help="also time iter_layout_blocks (the local-label retrain's read-out) "
                             "over the built layout, with each code")
    parser.add_argument("--lite", action="store_true", help="milvus-lite instead of a server")
    parser.add_argument("--quick", action="store_true", help="3,000 rows, 8 clusters, milvus-lite")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.quick:
        args.rows, args.clusters, args.lite, args.data = 3000, 8, True, "tiled"
    if args.clusters is None:
        args.clusters = max(1, round(args.rows ** 0.5))
    if args.lite:
        from milvus_ltr_router.milvus_io import release_lite
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"{tmp}/bench.db"
            rows, info = run(uri, "milvus-lite", args.rows, args.clusters, args.data,
                             args.baseline, args.repeat, args.readout)
            release_lite(uri)
    else:
        from benchmarks.server import milvus_uri
        with milvus_uri() as (uri, label):
            rows, info = run(uri, label, args.rows, args.clusters, args.data, args.baseline,
                             args.repeat, args.readout)
    print(f"\n{info['backend']}; vectors: {info['vectors']}; source insert {info['insert_source_s']:.1f} s; "
          f"load average after {info['load_avg'][0]:.2f}")
    print_table(rows, ["code", "rows", "dim", "L"] + [f"{p}_s" for p in PHASES]
                + ["total_s", "rows_per_s", "peak_rss_mib"], "layout build, seconds per phase")
    print_table(rows, ["code", "read_rows_per_s", "assign_rows_per_s", "write_rows_per_s",
                       "index_load_rows_per_s", "rows_per_s"],
                "rows/s per pass (baseline: 'read' is its vectors-only sample pass; its second "
                "read-out is inside 'assign')")
    if info["readout"]:
        print_table(info["readout"], ["code", "rows", "seconds", "rows_per_s"],
                    "read-out of the laid-out collection (iter_layout_blocks)")
    if args.baseline:
        base = [r["total_s"] for r in rows if r["code"] == "baseline"]
        cur = [r["total_s"] for r in rows if r["code"] == "current"]
        print(f"\nspeed-up of the whole build (median baseline / median current): "
              f"{np.median(base) / np.median(cur):.2f}x")
    save("layout" + ("_quick" if args.quick else f"_{args.rows}"), {"runs": rows, **info}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
