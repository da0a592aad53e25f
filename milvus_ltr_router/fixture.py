"""The small real dataset shipped inside the package: what the demo and the tests load.

20,000 WordNet glosses and 4,000 real questions (Natural Questions, MS MARCO,
TriviaQA, ...) embedded with all-MiniLM-L6-v2 (its Normalize module dropped,
so inner products keep the documents' unequal norms), stored as fp16 in
``milvus_ltr_router/data/`` and installed with the wheel, so
``milvus-ltr-router demo`` works from any install. Only vectors are stored,
never the texts.

Building it (and the larger sets) needs downloads and the ``[data]`` extra;
that code lives beside the package in ``benchmarks/datasets.py``
(``python -m benchmarks.datasets fixture`` rewrites :data:`FIXTURE_FILE`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import OperationalError

log = logging.getLogger(__name__)

#: File name of the fixture inside the package's ``data/`` folder.
FIXTURE_FILE = "wordnet20k_minilm.npz"


@dataclass
class EmbeddingDataset:
    """Document vectors and real query vectors of one embedding model."""

    name: str
    docs: np.ndarray            # [N, d] float32
    queries: np.ndarray         # [Q, d] float32
    meta: dict = field(default_factory=dict)
    neighbour_ids: np.ndarray | None = None    # [Q, k] exact MIPS top-k row indices, best first

    @property
    def dim(self) -> int:
        return int(self.docs.shape[1])

    def exact_neighbours(self, k: int = 100) -> np.ndarray:
        """Row indices of each query's exact top-``k`` inner-product neighbours (computed once)."""
        if self.neighbour_ids is None or self.neighbour_ids.shape[1] < k:
            from .labels import array_blocks, exact_knn
            log.info("exact top-%d neighbours of %d queries over %d documents",
                     k, len(self.queries), len(self.docs))
            self.neighbour_ids = exact_knn(
                self.queries, array_blocks(self.docs, np.zeros(len(self.docs), int)), k=k
            ).ids.astype(np.int32)
        return self.neighbour_ids[:, :k]

    def save(self, path: str | Path, dtype=np.float16) -> None:
        """Write the vectors (as ``dtype``), metadata and any neighbours to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        extra = {} if self.neighbour_ids is None else {"neighbour_ids": self.neighbour_ids}
        np.savez(tmp, docs=self.docs.astype(dtype), queries=self.queries.astype(dtype),
                 meta=np.frombuffer(json.dumps({"name": self.name, **self.meta}).encode(), np.uint8),
                 **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingDataset":
        """Read a file written by :meth:`save`; vectors come back as float32."""
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(name=meta.pop("name"), docs=z["docs"].astype(np.float32),
                       queries=z["queries"].astype(np.float32), meta=meta,
                       neighbour_ids=z["neighbour_ids"] if "neighbour_ids" in z.files else None)


def fixture_resource():
    """The installed fixture file, as an :mod:`importlib.resources` traversable."""
    return resources.files(__package__) / "data" / FIXTURE_FILE


def load_fixture() -> EmbeddingDataset:
    """The shipped fixture: 20k WordNet glosses and 4k real questions, MiniLM, fp16 on disk."""
    resource = fixture_resource()
    if not resource.is_file():
        raise OperationalError(
            f"the dataset fixture {FIXTURE_FILE} is missing from the installed package "
            f"({resource}); reinstall milvus-ltr-router, or in a source checkout rebuild it "
            "with 'python -m benchmarks.datasets fixture'")
    with resources.as_file(resource) as path:
        return EmbeddingDataset.load(path)
