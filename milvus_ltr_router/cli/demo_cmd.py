"""``milvus-ltr-router demo``: the end-to-end demo on milvus-lite (:mod:`..demo`)."""
from __future__ import annotations

import argparse

from ..errors import EXIT_OK, InputError
from .common import Command


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="./demo_output/demo.db",
                   help="milvus-lite file to create (replaced if it exists)")
    p.add_argument("--out", default="./demo_output",
                   help="where routers, reports and plots go")
    p.add_argument("--clusters", type=int,
                   help="number of clusters (default round(sqrt(20000)) = 141)")
    p.add_argument("--nprobe", type=int, default=2,
                   help="partitions probed by the demo's fixed-nprobe searches")


def check_demo_args(args) -> None:
    if args.clusters is not None and args.clusters < 1:
        raise InputError(f"--clusters must be >= 1, got {args.clusters}")
    if args.nprobe < 1:
        raise InputError(f"--nprobe must be >= 1, got {args.nprobe}")


def run_demo(args) -> int:
    from ..demo import run_demo as demo
    demo(db=args.db, out=args.out, n_clusters=args.clusters, nprobe=args.nprobe)
    return EXIT_OK


DEMO = Command(
    "demo", "end-to-end demo on milvus-lite with real MiniLM vectors",
    "Loads 20,000 WordNet glosses into a new milvus-lite file, builds a layout, logs\n"
    "3,000 real questions, runs retrain-router and compares centroid and learned\n"
    "routing on 1,000 held-out questions. About a minute; needs the [train] extra.",
    demo_args, run_demo, check_demo_args)
