"""Where exact labels are computed: by Milvus (``--labels milvus``) or here (``--labels local``).

Through a real server, on real vectors: each size is a prefix of the dataset's documents laid out
with ``--storage single`` (FLAT), then each label path runs in its own subprocess on the same
held-out queries, so its time and peak RSS are its own; bytes moved are the loopback interface's
received bytes during the run (client and server share the machine: both directions, and any
other local traffic of that moment). The two paths' top-1 labels are compared.

    python -m benchmarks.bench_labels [--dataset large] [--sizes 100000 289382] [--queries 20000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

from benchmarks.common import peak_rss_mib, print_table, save, setup_logging


def read_bytes() -> int:
    """Bytes received on the loopback interface so far (Linux ``/proc/net/dev``)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def one_path(uri: str, collection: str, queries_file: str, path: str, k: int, out_file: str) -> dict:
    from pymilvus import MilvusClient
    from milvus_ltr_router.layout import read_layout
    from milvus_ltr_router.retrain import label_queries
    client = MilvusClient(uri)
    layout = read_layout(client, collection)
    queries = np.load(queries_file)
    b0, t0 = read_bytes(), time.perf_counter()
    nb = label_queries(client, layout, queries, k, path=path)
    seconds, moved = time.perf_counter() - t0, read_bytes() - b0
    np.save(out_file, nb.labels)
    return {"path": path, "label_s": seconds, "moved_mib": moved / 2**20, "peak_rss_mib": peak_rss_mib()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="large")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 289_382])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--paths", nargs="*", default=["milvus", "local"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)   # child: uri coll queries path out
    args = parser.parse_args(argv)
    setup_logging()
    if args.one:
        uri, coll, qfile, path, out = args.one
        print(json.dumps(one_path(uri, coll, qfile, path, args.k, out)))
        return 0
    from pymilvus import MilvusClient
    from benchmarks.datasets import load_or_build
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    from milvus_ltr_router.writer import create_vector_collection
    from benchmarks.server import milvus_uri
    data = load_or_build(args.dataset)
    queries = data.queries[np.random.default_rng(0).permutation(len(data.queries))[:args.queries]]
    rows = []
    with milvus_uri() as (uri, label), tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(uri)
        qfile = f"{tmp}/queries.npy"
        np.save(qfile, queries.astype(np.float32))
        for n in args.sizes:
            tag = uuid.uuid4().hex[:6]
            src, lay = f"lab_src_{tag}", f"lab_{tag}"
            create_vector_collection(client, src, data.docs[:n])
            client.load_collection(src)
            build_layout(client, src, lay, storage="single")
            labels = {}
            for path in args.paths:
                out = f"{tmp}/{path}_{n}.npy"
                cmd = [sys.executable, "-m", "benchmarks.bench_labels", "--k", str(args.k),
                       "--one", uri, lay, qfile, path, out]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = {"N": n, "queries": len(queries), **json.loads(res.stdout.strip().splitlines()[-1])}
                labels[path] = np.load(out)
                rows.append(row)
                print_table([row], list(row), f"N={n} {path}")
            if len(labels) == 2:
                a, b = labels.values()
                for r in rows[-2:]:
                    r["top1_labels_equal"] = float((a == b).mean())
            drop_layout(client, lay)
            client.drop_collection(src)
        client.close()
    print(f"\n{label}")
    print_table(rows, ["N", "queries", "path", "label_s", "moved_mib", "peak_rss_mib", "top1_labels_equal"],
                "exact labels: computed by Milvus vs streamed and computed here")
    save(f"labels_{args.dataset}", {"server": label, "runs": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
