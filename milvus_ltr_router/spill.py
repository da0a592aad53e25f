"""Local spills of a build: the source's rows on disk, so Milvus is read once and the rows
can be written back in cluster order with memory bounded by one bucket."""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Iterator

import numpy as np

from .columns import Columns, concat_columns, n_rows_of, take_rows


class RowSpill:
    """Every row of the source, column batches pickled to one temporary file as they are
    read: the source is read from Milvus once, and clustering, refinement and assignment
    read the local copy."""

    def __init__(self, directory: str | None):
        self._dir = tempfile.TemporaryDirectory(prefix="ltr-rows-", dir=directory)
        self.path = os.path.join(self._dir.name, "rows")
        self._fh = open(self.path, "wb")
        self.rows = 0

    def add(self, columns: Columns) -> None:
        """Append one column batch."""
        pickle.dump(columns, self._fh, protocol=pickle.HIGHEST_PROTOCOL)
        self.rows += n_rows_of(columns)

    def batches(self) -> Iterator[Columns]:
        """Every batch added so far, in order (a new pass over the file each call)."""
        self._fh.flush()
        with open(self.path, "rb") as fh:
            while True:
                try:
                    yield pickle.load(fh)
                except EOFError:
                    return

    def close(self) -> None:
        """Delete the file."""
        self._fh.close()
        self._dir.cleanup()


class ClusterSpill:
    """Rows bucketed by cluster range in temporary files, so the target can be written in
    cluster order with memory bounded by one bucket (not by the collection). Rows are kept
    as column batches (numpy arrays pickle as one buffer)."""

    def __init__(self, n_clusters: int, n_rows: int, directory: str | None,
                 rows_per_bucket: int = 50_000, max_buckets: int = 256):
        # at most max_buckets files open at once (ulimit -n); buckets grow past rows_per_bucket
        self.n_buckets = max(1, min(n_clusters, max_buckets, -(-n_rows // rows_per_bucket)))
        self.n_clusters = n_clusters
        self._dir = tempfile.TemporaryDirectory(prefix="ltr-layout-", dir=directory)
        self._files = [open(os.path.join(self._dir.name, f"b{i:04d}"), "wb")
                       for i in range(self.n_buckets)]

    def add(self, columns: Columns, clusters: np.ndarray) -> None:
        """Append the rows of ``columns``, each to the bucket of its cluster in ``clusters``."""
        bucket = clusters * self.n_buckets // self.n_clusters
        order = np.argsort(bucket, kind="stable")
        bounds = np.flatnonzero(np.diff(bucket[order])) + 1
        for run in np.split(order, bounds):
            if len(run):
                pickle.dump((take_rows(columns, run), clusters[run]), self._files[bucket[run[0]]],
                            protocol=pickle.HIGHEST_PROTOCOL)

    def sorted_runs(self) -> Iterator[tuple[int, Columns]]:
        """``(cluster, columns)`` in cluster order, one bucket in memory at a time."""
        for f in self._files:
            f.close()
        for f in self._files:
            parts, clusters = [], []
            with open(f.name, "rb") as fh:
                while True:
                    try:
                        c, k = pickle.load(fh)
                    except EOFError:
                        break
                    parts.append(c)
                    clusters.append(k)
            os.unlink(f.name)
            if not parts:
                continue
            columns, clusters = concat_columns(parts), np.concatenate(clusters)
            del parts
            order = np.argsort(clusters, kind="stable")
            bounds = np.flatnonzero(np.diff(clusters[order])) + 1
            for run in np.split(order, bounds):
                yield int(clusters[run[0]]), take_rows(columns, run)

    def close(self) -> None:
        """Delete the files."""
        for f in self._files:
            f.close()
        self._dir.cleanup()
