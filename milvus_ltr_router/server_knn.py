"""Exact neighbours computed by Milvus itself: the labelling path that scales with the cluster.

The local path (:func:`.labels.exact_knn` over :func:`.layout.iter_layout_blocks`)
streams every vector of the collection to the cron host. A laid-out collection
with a cluster-id field and a FLAT vector index answers an unrestricted search
*exactly*, on whatever query nodes hold the data, and sends back only ids,
scores and the cluster id of each hit. This module asks it, in batched
requests with bounded concurrency and retries, and returns the same
:class:`.labels.Neighbours` as the local path.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pymilvus import MilvusClient

from .errors import InputError, OperationalError
from .labels import Neighbours, check_metric
from .layout import Layout
from .milvus_io import vector_indexes
from .progress import ProgressCounter

log = logging.getLogger(__name__)

LABEL_PATHS = ("auto", "milvus", "local")
EXACT_INDEXES = ("FLAT",)
MAX_TOPK = 16384            # Milvus's topk limit


class LabelPathError(InputError):
    """``labels='milvus'`` asked for a layout whose search would not be exact."""


def why_not_exact(client: MilvusClient, layout: Layout) -> str | None:
    """Why a plain search of ``layout`` would not return exact neighbours with their clusters
    (None: it would). Needs a cluster-id field (hits carry their cluster) and a FLAT index."""
    if layout.storage.cluster_field is None:
        return (f"layout of {layout.collection!r} stores one partition per cluster: search hits do "
                f"not say which partition they came from (rebuild with --storage single or grouped)")
    try:
        types = {d.get("index_type") for d in vector_indexes(client, layout.collection,
                                                             layout.vector_field)}
    except Exception as exc:   # pragma: no cover - server error
        return f"cannot read the vector index of {layout.collection!r}: {exc}"
    if not types:
        return f"{layout.collection!r} has no index on {layout.vector_field!r}"
    approximate = types - set(EXACT_INDEXES)
    if approximate:
        return (f"{layout.collection!r} indexes {layout.vector_field!r} with {sorted(approximate)}: "
                f"searches are approximate, labels must be exact")
    return None


AUTO_MILVUS_BYTES = 8 << 30     # auto asks Milvus once streaming the vectors would move more


def choose_label_path(requested: str, client: MilvusClient, layout: Layout, n_queries: int,
                      auto_bytes: int = AUTO_MILVUS_BYTES) -> str:
    """``milvus`` or ``local`` for ``requested`` (``auto``, ``milvus`` or ``local``).

    Both paths do the same N x Q dot products; the local one moves every vector to this host
    (N x dim x 4 bytes), the Milvus one ~k ids and scores per query. On one 2-core machine
    with the server beside it the local BLAS path was ~7x faster at 289k rows and 58k queries
    (~180 s against ~1,250 s; README, "Labels computed by Milvus"), so
    ``auto`` streams locally until the vectors to move exceed ``auto_bytes`` (8 GiB: ~5.6M
    384-d rows), where moving them dominates and a Milvus cluster's query nodes share the
    work - and only where the search is exact. An explicit ``milvus`` that cannot be exact is
    an error rather than a silent fallback.
    """
    if requested not in LABEL_PATHS:
        raise InputError(f"labels must be one of {LABEL_PATHS}, got {requested!r}")
    if requested == "local":
        return "local"
    reason = why_not_exact(client, layout)
    if reason is None and requested == "milvus":
        return "milvus"
    if reason is not None and requested == "milvus":
        raise LabelPathError(f"--labels milvus: {reason}")
    volume = int(layout.sizes.sum()) * layout.dim * 4
    if reason is None and volume > auto_bytes:
        log.info("labels computed by Milvus: streaming %.1f GiB of vectors would cost more",
                 volume / 2**30)
        return "milvus"
    log.info("labels computed locally (%s)", reason or f"{volume / 2**30:.2f} GiB of vectors to "
             f"stream, under the {auto_bytes / 2**30:.0f} GiB above which auto asks Milvus")
    return "local"


def milvus_knn(client: MilvusClient, layout: Layout, queries: np.ndarray, k: int, nq: int = 256,
               workers: int = 2, retries: int = 3, progress: ProgressCounter | None = None
               ) -> Neighbours:
    """Exact top-``k`` neighbours of ``queries`` over the whole laid-out collection, asked of
    Milvus in requests of ``nq`` queries, ``workers`` at a time; a failed request is retried
    ``retries`` times with backoff before the error is raised."""
    metric = check_metric(layout.metric)
    if not 1 <= k <= MAX_TOPK:
        raise InputError(f"k must be in [1, {MAX_TOPK}], got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_q = len(queries)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    parts = np.full((n_q, k), -1, dtype=np.int64)
    tied = np.zeros(n_q, dtype=bool)
    field = layout.storage.cluster_field
    params = {"metric_type": metric, "params": {}}

    def one(start: int) -> int:
        rows = queries[start:start + nq]
        for attempt in range(retries + 1):
            try:
                res = client.search(layout.collection, data=rows.tolist(), limit=k,
                                    output_fields=[field], search_params=params,
                                    anns_field=layout.vector_field, consistency_level="Strong")
                break
            except Exception as exc:
                if attempt == retries:
                    raise OperationalError(f"exact search of queries {start}-{start + len(rows) - 1} "
                                           f"failed {retries + 1} times: {exc}") from exc
                delay = 0.5 * 2 ** attempt
                log.warning("label request %d failed (%s); retrying in %.1f s", start, exc, delay)
                time.sleep(delay)
        for i, hits in enumerate(res):
            q = start + i
            n = len(hits)
            ids[q, :n] = [h["id"] for h in hits]
            d = np.asarray([h["distance"] for h in hits], dtype=np.float32)
            scores[q, :n] = -d if metric == "L2" else d        # larger is better, as exact_knn
            parts[q, :n] = [h["entity"][field] for h in hits]
            if n > 1:   # a row of another cluster with exactly the top-1 score
                tied[q] = bool(((scores[q, 1:n] == scores[q, 0]) & (parts[q, 1:n] != parts[q, 0])).any())
        if progress is not None:
            progress.update(len(rows))
        return len(rows)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ltr-label") as pool:
        list(pool.map(one, range(0, n_q, nq)))
    return Neighbours(ids, scores, parts, tied)
