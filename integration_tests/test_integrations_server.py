"""LangChain and LlamaIndex vector stores through the routed clients on a real Milvus server.

The session's WordNet layout (20,000 MiniLM documents, 64 clusters, ``single`` storage with a
cluster-id filter on servers; ids ``7 i + 3``, titles ``gloss i``). A router sending each query
``SHIFT`` clusters away from its centroids is published into the test's model dir, so a hit
list can only be right if the framework's search went through that router: each must equal a
plain ``MilvusClient`` search restricted to the clusters it picks (numpy), sync and async,
with and without a caller's filter, and the routed client's counters must count it. The
frameworks' own stores on the same collection (every row searched) give the exact answer,
which the routed stores reach at nprobe = L. Skips only where a framework is not installed.
"""
import asyncio

import numpy as np
import pytest

from benchmarks.bench_integrations import langchain_embeddings, llama_embedding, query_text

NPROBE = 2
SHIFT = 5
QUERIES = 30
LC_FIELDS = dict(primary_field="id", text_field="title", vector_field="vector")


def needs(module: str, extra: str):
    return pytest.importorskip(module, reason=f"{module} is not installed: "
                                              f"pip install 'milvus-ltr-router[{extra}]'")


@pytest.fixture(scope="module")
def published(wordnet_layout, tmp_path_factory):
    """The shifted router published for the session's layout: ``(model_dir, version, W, b)``."""
    pytest.importorskip("onnx", reason="exporting a router needs the [train] extra")
    from milvus_ltr_router.clustering import linear_centroid_scorer
    from milvus_ltr_router.export import export_router
    from milvus_ltr_router.registry import ModelRegistry
    layout = wordnet_layout.layout
    model_dir = tmp_path_factory.mktemp("integration_models")
    reg = ModelRegistry(model_dir)
    version = reg.new_version()
    w, b = linear_centroid_scorer(layout.centroids, layout.metric)
    w, b = np.roll(w, SHIFT, axis=0), np.roll(b, SHIFT)
    path = export_router(w, b, layout, layout.collection,
                         reg.version_path(layout.collection, version), nprobe=NPROBE)
    reg.publish(layout.collection, path, version, {})
    return str(model_dir), version, w, b


def own_clusters(w, b, q, nprobe=NPROBE) -> list:
    return sorted(np.argsort(-(w @ q + b))[:nprobe].tolist())


def restricted_ids(client, layout, q, clusters, filter="", limit=10) -> list:
    parts, expr = layout.storage.search_target(clusters, filter)
    hits = client.search(layout.collection, data=[q.tolist()], limit=limit, partition_names=parts,
                         filter=expr)[0]
    return [h["id"] for h in hits]


def exact_ids(client, collection, q, filter="", limit=10) -> list:
    return [h["id"] for h in client.search(collection, data=[q.tolist()], limit=limit,
                                           filter=filter)[0]]


def test_langchain_sync_and_async_search_the_published_routers_clusters(
        milvus_server, client, wordnet_layout, fixture_data, published):
    langchain_milvus = needs("langchain_milvus", "langchain")
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus
    layout = wordnet_layout.layout
    collection = layout.collection
    model_dir, version, w, b = published
    queries = fixture_data.queries[:QUERIES]
    connection = {"uri": milvus_server.uri, "token": milvus_server.token}
    emb = langchain_embeddings(queries)
    store = routed_langchain_milvus(emb, collection_name=collection, connection_args=connection,
                                    model_dir=model_dir, nprobe=NPROBE,
                                    client_options={"log_rate": 0}, **LC_FIELDS)
    plain_store = langchain_milvus.Milvus(emb, collection_name=collection,
                                          connection_args=connection, **LC_FIELDS)
    try:
        assert isinstance(store.client, RoutedMilvusClient)
        assert isinstance(store.aclient, AsyncRoutedMilvusClient)
        status = store.client.router_status(collection)
        assert status["mode"] == "learned" and status["version"] == version
        assert status["storage"]["mode"] == layout.storage.mode
        want = [restricted_ids(client, layout, q, own_clusters(w, b, q)) for q in queries]
        differs = 0
        for i, q in enumerate(queries):
            docs = store.similarity_search(query_text(i), k=10)
            got = [d.metadata["id"] for d in docs]
            assert sorted(store.client.route(collection, q)[0]) == own_clusters(w, b, q)
            assert got == want[i], i
            assert [d.page_content for d in docs] == [f"gloss {(j - 3) // 7}" for j in got]
            differs += got != exact_ids(client, collection, q)
        assert differs > 0
        assert store.client.router_status(collection)["batches"]["searches"] == QUERIES

        # a caller's filter is ANDed with the clusters' filter
        q = queries[4]
        filtered = store.similarity_search(query_text(4), k=10, expr="grp != 3")
        assert [d.metadata["id"] for d in filtered] == restricted_ids(
            client, layout, q, own_clusters(w, b, q), filter="grp != 3")
        assert all(d.metadata["grp"] != 3 for d in filtered)
        # every cluster: the plain store's (exact) answer
        for i in (0, 1):
            every = store.similarity_search(query_text(i), k=10, nprobe=layout.n_partitions)
            plain = plain_store.similarity_search(query_text(i), k=10)
            assert [d.metadata["id"] for d in every] == [d.metadata["id"] for d in plain] \
                == exact_ids(client, collection, queries[i])

        async def main():
            try:
                got = await asyncio.gather(*[store.asimilarity_search(query_text(i), k=10)
                                             for i in range(QUERIES)])
                return got, await store.aclient.router_status(collection)
            finally:
                await store.aclient.close()
        got, astatus = asyncio.run(main())
        assert [[d.metadata["id"] for d in docs] for docs in got] == want
        assert astatus["mode"] == "learned" and astatus["batches"]["searches"] == QUERIES
    finally:
        store.client.close()
        plain_store.client.close()


def test_llama_index_sync_and_async_query_the_published_routers_clusters(
        milvus_server, client, wordnet_layout, fixture_data, published):
    llama_milvus = needs("llama_index.vector_stores.milvus", "llamaindex")
    from llama_index.core import VectorStoreIndex
    from llama_index.core.vector_stores import VectorStoreQuery
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.integrations.llama_index import routed_milvus_vector_store
    layout = wordnet_layout.layout
    collection = layout.collection
    model_dir, version, w, b = published
    queries = fixture_data.queries[1000:1000 + QUERIES]
    fields = dict(uri=milvus_server.uri, token=milvus_server.token, collection_name=collection,
                  dim=layout.dim, embedding_field="vector", text_key="title")
    store = routed_milvus_vector_store(model_dir=model_dir, nprobe=NPROBE,
                                       client_options={"log_rate": 0}, **fields)
    plain_store = llama_milvus.MilvusVectorStore(**fields)
    try:
        assert isinstance(store.client, RoutedMilvusClient)
        assert isinstance(store.aclient, AsyncRoutedMilvusClient)
        status = store.client.router_status(collection)
        assert status["mode"] == "learned" and status["version"] == version
        want = [restricted_ids(client, layout, q, own_clusters(w, b, q)) for q in queries]
        differs = 0
        for i, q in enumerate(queries):
            res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10))
            assert res.ids == want[i], i
            assert [n.text for n in res.nodes] == [f"gloss {(j - 3) // 7}" for j in res.ids]
            differs += res.ids != exact_ids(client, collection, q)
        assert differs > 0
        assert store.client.router_status(collection)["batches"]["searches"] == QUERIES
        index = VectorStoreIndex.from_vector_store(store, embed_model=llama_embedding(queries))
        nodes = index.as_retriever(similarity_top_k=10).retrieve(query_text(2))
        assert [n.node.text for n in nodes] == [f"gloss {(j - 3) // 7}" for j in want[2]]

        store.client.nprobe = layout.n_partitions        # every cluster: the plain store's answer
        q = queries[0]
        query = VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10)
        assert store.query(query).ids == plain_store.query(query).ids \
            == exact_ids(client, collection, q)

        async def main():
            try:
                got = await asyncio.gather(*[
                    store.aquery(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10))
                    for q in queries])
                return got, await store.aclient.router_status(collection)
            finally:
                await store.aclient.close()
        got, astatus = asyncio.run(main())
        assert [r.ids for r in got] == want          # the async client's own nprobe (NPROBE)
        assert astatus["mode"] == "learned" and astatus["batches"]["searches"] == QUERIES
    finally:
        store.client.close()
        plain_store.client.close()
