"""LangChain and LlamaIndex vector stores through the routed clients (issue 25 item 3).

On one laid-out collection (the 20k WordNet fixture, spherical k-means), at each nprobe:
recall@10 against the exact top 10 (numpy, inner product) of the routed client's search, of
the routed ``langchain_milvus.Milvus`` (``similarity_search``) and of the routed LlamaIndex
``MilvusVectorStore`` (``query``), which should be equal; and the latency of one query,
interleaved query by query, of the plain vector stores (as the frameworks build them: every
row searched) against the routed ones and the routed client on the same collection.

    python -m benchmarks.bench_integrations [--uri URI | --server] [--docs 20000] [--clusters 64]
                                            [--queries 300] [--nprobe 2 4 8 16]

``--uri``: a Milvus server or milvus-lite file (default: a new milvus-lite file in a temporary
directory); ``--server``: ``MILVUS_URI`` if set, else the embedded Milvus 2.3.5 server. The
query embeddings are the fixture's (:func:`langchain_embeddings`, :func:`llama_embedding`:
the tiny deterministic embedding classes the tests use too; no model is loaded).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, save


def query_text(i: int) -> str:
    """The text the fixture embeddings map to query ``i``."""
    return f"q{i}"


def _index(text: str) -> int:
    if not text.startswith("q"):
        raise ValueError(f"the fixture embeddings embed only query texts q<i>, got {text!r}")
    return int(text[1:])


def langchain_embeddings(queries: np.ndarray):
    """A LangChain ``Embeddings`` returning the fixture's query vector ``i`` for ``q<i>``."""
    from langchain_core.embeddings import Embeddings

    class FixtureEmbeddings(Embeddings):
        def embed_documents(self, texts):
            return [queries[_index(t)].tolist() for t in texts]

        def embed_query(self, text):
            return queries[_index(text)].tolist()

    return FixtureEmbeddings()


def llama_embedding(queries: np.ndarray):
    """A LlamaIndex ``BaseEmbedding`` returning the fixture's query vector ``i`` for ``q<i>``."""
    from llama_index.core.embeddings import BaseEmbedding

    class FixtureEmbedding(BaseEmbedding):
        def _get_query_embedding(self, query):
            return queries[_index(query)].tolist()

        async def _aget_query_embedding(self, query):
            return queries[_index(query)].tolist()

        def _get_text_embedding(self, text):
            return queries[_index(text)].tolist()

    return FixtureEmbedding(model_name="fixture", embed_batch_size=64)


def recall(got: list[list[int]], exact: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(g[:k]) & set(e[:k].tolist())) / k for g, e in zip(got, exact)]))


def build(uri: str, docs: np.ndarray, n_clusters: int) -> tuple[str, str]:
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.milvus_io import release_lite
    from milvus_ltr_router.writer import create_vector_collection
    client = MilvusClient(uri=uri)
    tag = uuid.uuid4().hex[:6]
    src, target = f"bench_int_src_{tag}", f"bench_int_ivf_{tag}"
    create_vector_collection(client, src, docs,
                             scalars={"title": [f"doc {i}" for i in range(len(docs))]})
    client.load_collection(src)
    build_layout(client, src, target, n_clusters=n_clusters, seed=0)
    client.close()
    release_lite(uri)
    return src, target


def drop(uri: str, src: str, target: str) -> None:
    from pymilvus import MilvusClient
    from milvus_ltr_router.layout import drop_layout
    client = MilvusClient(uri=uri)
    drop_layout(client, target)
    client.drop_collection(src)
    client.close()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--uri", default=None)
    where.add_argument("--server", action="store_true")
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--nprobe", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--repeat", type=int, default=3, help="timing passes (per call: the fastest)")
    args = p.parse_args(argv)
    if args.server:
        from benchmarks.server import milvus_uri
        with milvus_uri() as (uri, description):
            print(f"server: {description}")
            return run(args, uri, description)
    return run(args, args.uri, args.uri or "milvus-lite")


def run(args, uri: str | None, where: str) -> dict:
    from langchain_milvus import Milvus
    from llama_index.vector_stores.milvus import MilvusVectorStore
    from llama_index.core.vector_stores import VectorStoreQuery
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.fixture import load_fixture
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus
    from milvus_ltr_router.integrations.llama_index import routed_milvus_vector_store

    fx = load_fixture()
    docs, queries = fx.docs[:args.docs], fx.queries[:args.queries]
    exact = np.argsort(-(queries @ docs.T), axis=1)[:, :10]        # ids are row numbers
    tmp = tempfile.TemporaryDirectory()
    uri = uri or str(Path(tmp.name) / "bench.db")
    t0 = time.perf_counter()
    src, collection = build(uri, docs, args.clusters)
    print(f"laid out {len(docs)} documents in {args.clusters} clusters on {uri} "
          f"({time.perf_counter() - t0:.0f} s)")
    model_dir = str(Path(tmp.name) / "models")
    fields = dict(primary_field="id", text_field="title", vector_field="vector")
    llama_fields = dict(collection_name=collection, dim=docs.shape[1], embedding_field="vector",
                        text_key="title", output_fields=["title"])
    opts = {"log_rate": 0}
    emb, lemb = langchain_embeddings(queries), llama_embedding(queries)
    client = RoutedMilvusClient(uri=uri, model_dir=model_dir, **opts)
    lc_plain = Milvus(emb, collection_name=collection, connection_args={"uri": uri}, **fields)
    lc = routed_langchain_milvus(emb, collection_name=collection, connection_args={"uri": uri},
                                 model_dir=model_dir, client_options=opts, **fields)
    li_plain = MilvusVectorStore(uri=uri, **llama_fields)
    li = routed_milvus_vector_store(uri=uri, model_dir=model_dir, client_options=opts, **llama_fields)
    texts = [query_text(i) for i in range(len(queries))]

    def lc_ids(store, i, **kw):
        return [d.metadata["id"] for d in store.similarity_search(texts[i], k=10, **kw)]

    def li_ids(store, i):
        query = VectorStoreQuery(query_embedding=queries[i].tolist(), similarity_top_k=10)
        return store.query(query).ids

    def client_ids(i, nprobe):
        return [h["id"] for h in client.search(collection, data=[queries[i].tolist()], limit=10,
                                               nprobe=nprobe)[0]]

    rows = []
    n = len(queries)
    plain_lc = [lc_ids(lc_plain, i) for i in range(n)]
    plain_li = [li_ids(li_plain, i) for i in range(n)]
    rows.append({"nprobe": "all (plain store)", "recall_client": None,
                 "recall_langchain": recall(plain_lc, exact),
                 "recall_llamaindex": recall(plain_li, exact)})
    for nprobe in args.nprobe:
        li.client.nprobe = nprobe
        got_client = [client_ids(i, nprobe) for i in range(n)]
        got_lc = [lc_ids(lc, i, nprobe=nprobe) for i in range(n)]
        got_li = [li_ids(li, i) for i in range(n)]
        routed_clusters = client.route(collection, queries, nprobe=nprobe)
        row = {"nprobe": nprobe, "recall_client": recall(got_client, exact),
               "recall_langchain": recall(got_lc, exact), "recall_llamaindex": recall(got_li, exact),
               "same_ids_langchain": sum(a == b for a, b in zip(got_lc, got_client)) / n,
               "same_ids_llamaindex": sum(a == b for a, b in zip(got_li, got_client)) / n,
               "clusters_probed": float(np.mean([len(c) for c in routed_clusters]))}
        # interleaved: each query through every path in turn, ``repeat`` passes, fastest per call
        paths = {"langchain_plain": lambda i: lc_ids(lc_plain, i),
                 "langchain_routed": lambda i: lc_ids(lc, i, nprobe=nprobe),
                 "llamaindex_plain": lambda i: li_ids(li_plain, i),
                 "llamaindex_routed": lambda i: li_ids(li, i),
                 "client_routed": lambda i: client_ids(i, nprobe)}
        best = {name: [float("inf")] * n for name in paths}
        for _ in range(args.repeat):
            for i in range(n):
                for name, fn in paths.items():
                    t = time.perf_counter()
                    fn(i)
                    best[name][i] = min(best[name][i], time.perf_counter() - t)
        for name in paths:
            row[f"{name}_ms"] = 1000 * statistics.median(best[name])
        rows.append(row)

    async def async_check(nprobe: int) -> float:
        """Share of queries whose async LangChain answer equals the sync routed client's."""
        got = await asyncio.gather(*[lc.asimilarity_search(texts[i], k=10, nprobe=nprobe)
                                     for i in range(n)])
        same = [[d.metadata["id"] for d in g] == client_ids(i, nprobe) for i, g in enumerate(got)]
        await lc.aclient.close()
        return sum(same) / n
    async_same = asyncio.run(async_check(args.nprobe[0]))

    print_table(rows, ["nprobe", "clusters_probed", "recall_client", "recall_langchain",
                       "recall_llamaindex", "same_ids_langchain", "same_ids_llamaindex"],
                title=f"recall@10 on {len(docs)} fixture documents, {n} real questions, "
                      f"L = {args.clusters} (same_ids: share of queries with the routed client's ids)")
    print_table(rows[1:], ["nprobe", "langchain_plain_ms", "langchain_routed_ms", "llamaindex_plain_ms",
                           "llamaindex_routed_ms", "client_routed_ms"],
                title="latency of one query, median over queries of the fastest of "
                      f"{args.repeat} interleaved passes (ms); plain: the framework's own store, "
                      "every row searched")
    print(f"async LangChain (asimilarity_search, {n} concurrent) equal to the sync routed client "
          f"at nprobe {args.nprobe[0]}: {async_same:.0%} of queries")
    for c in (client, lc.client, li.client):
        c.close()
    lc_plain.client.close()
    li_plain.client.close()
    drop(uri, src, collection)
    payload = {"milvus": where, "docs": len(docs),
               "clusters": args.clusters, "queries": n, "rows": rows, "async_same": async_same}
    save("bench_integrations" + ("_server" if args.server else ""), payload)
    return payload


if __name__ == "__main__":
    main()
