"""LangChain and LlamaIndex vector stores searching through the routed clients, on milvus-lite.

The real framework packages (``langchain-milvus``, ``llama-index-vector-stores-milvus``) on a
laid-out collection, through their own API (``similarity_search``, retrievers, ``query``,
their async twins) with the fixture's query vectors as the embedding (no model). A router
that sends each query ``SHIFT`` clusters away from its centroids is published first, so the
hits can only be right if the framework's search went through the published router: each
must equal a plain search restricted to the clusters that router picks (computed here with
numpy), and the routed client's counters must count it. A framework that is not installed
skips its tests with the extra that installs it.
"""
import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pymilvus import MilvusClient

from benchmarks.bench_integrations import langchain_embeddings, llama_embedding, query_text
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.milvus_io import release_lite
from milvus_ltr_router.writer import create_vector_collection

NPROBE = 2
SHIFT = 3
QUERIES = 24
LC_FIELDS = dict(primary_field="id", text_field="title", vector_field="vector")


def needs(module: str, extra: str):
    return pytest.importorskip(module, reason=f"{module} is not installed: "
                                              f"pip install 'milvus-ltr-router[{extra}]'")


@pytest.fixture
def langchain_milvus():
    return needs("langchain_milvus", "langchain")


@pytest.fixture
def llama_milvus():
    needs("llama_index.core", "llamaindex")
    return needs("llama_index.vector_stores.milvus", "llamaindex")


@pytest.fixture(scope="module")
def lite_int(tmp_path_factory, fixture_data):
    """A milvus-lite file: 'src' (2,000 MiniLM documents, title 'doc <id>', no layout) laid out
    as 'docs' (16 clusters, partition storage) and 'docs_single' (12 clusters, single)."""
    uri = str(tmp_path_factory.mktemp("integrations") / "i.db")
    client = MilvusClient(uri)
    create_vector_collection(client, "src", fixture_data.docs[:2000],
                             scalars={"title": [f"doc {i}" for i in range(2000)]})
    layouts = {"docs": build_layout(client, "src", "docs", n_clusters=16, seed=0).layout,
               "docs_single": build_layout(client, "src", "docs_single", n_clusters=12, seed=0,
                                           storage="single").layout}
    client.close()
    release_lite(uri)
    yield uri, layouts
    release_lite(uri)


def publish_shifted_router(model_dir, layout) -> tuple[str, np.ndarray, np.ndarray]:
    """Publish a linear router scoring each cluster by the centroid ``SHIFT`` places away (a
    router genuinely different from the layout's own); returns its version and ``(W, b)``."""
    pytest.importorskip("onnx", reason="exporting a router needs the [train] extra")
    from milvus_ltr_router.clustering import linear_centroid_scorer
    from milvus_ltr_router.export import export_router
    from milvus_ltr_router.registry import ModelRegistry
    reg = ModelRegistry(model_dir)
    version = reg.new_version()
    w, b = linear_centroid_scorer(layout.centroids, layout.metric)
    w, b = np.roll(w, SHIFT, axis=0), np.roll(b, SHIFT)
    path = export_router(w, b, layout, layout.collection, reg.version_path(layout.collection, version),
                         nprobe=NPROBE)
    reg.publish(layout.collection, path, version, {})
    return version, w, b


def own_clusters(w, b, q, nprobe=NPROBE) -> set:
    """The clusters the published router picks for ``q`` (numpy, not the plugin's code)."""
    return set(np.argsort(-(w @ q + b))[:nprobe].tolist())


def restricted_ids(plain, layout, q, clusters, limit=10) -> list:
    parts, expr = layout.storage.search_target(sorted(clusters))
    hits = plain.search(layout.collection, data=[q.tolist()], limit=limit, partition_names=parts,
                        filter=expr, output_fields=["id"])[0]
    return [h["id"] for h in hits]


def exact_ids(plain, collection, q, limit=10) -> list:
    return [h["id"] for h in plain.search(collection, data=[q.tolist()], limit=limit)[0]]


# ---------------------------------------------------------------------------------- no framework


def test_importing_the_plugin_imports_no_framework():
    script = textwrap.dedent("""
        import sys
        import milvus_ltr_router, milvus_ltr_router.client, milvus_ltr_router.async_client
        import milvus_ltr_router.integrations as integrations
        assert callable(integrations.routed_clients)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("langchain_milvus",
                        "langchain_core", "llama_index"))
        print("LOADED", loaded)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout


@pytest.mark.parametrize("module, function, extra", [
    ("langchain", "routed_langchain_milvus", "langchain"),
    ("llama_index", "routed_milvus_vector_store", "llamaindex")])
def test_a_missing_framework_names_its_extra(module, function, extra):
    blocked = "langchain_milvus" if module == "langchain" else "llama_index.vector_stores.milvus"
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{blocked!r}] = None          # as if not installed
        from milvus_ltr_router.integrations import {function}
        try:
            {function}()
        except ImportError as exc:
            print("ERROR", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"pip install 'milvus-ltr-router[{extra}]'" in out.stdout


# ---------------------------------------------------------------------------------- LangChain


@pytest.mark.parametrize("collection", ["docs", "docs_single"])
def test_langchain_search_is_a_search_of_the_published_routers_clusters(
        langchain_milvus, lite_int, fixture_data, tmp_path, collection):
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus
    uri, layouts = lite_int
    layout = layouts[collection]
    version, w, b = publish_shifted_router(tmp_path / "models", layout)
    queries = fixture_data.queries[:QUERIES]
    store = routed_langchain_milvus(langchain_embeddings(queries), collection_name=collection,
                                    connection_args={"uri": uri}, model_dir=str(tmp_path / "models"),
                                    nprobe=NPROBE, client_options={"log_rate": 0}, **LC_FIELDS)
    plain = MilvusClient(uri)
    try:
        assert isinstance(store, langchain_milvus.Milvus)
        assert isinstance(store.client, RoutedMilvusClient)
        status = store.client.router_status(collection)
        assert status["mode"] == "learned" and status["version"] == version
        differs = 0
        for i, q in enumerate(queries):
            docs = store.similarity_search(query_text(i), k=10)
            got = [d.metadata["id"] for d in docs]
            clusters = store.client.route(collection, q)[0]
            assert set(clusters) == own_clusters(w, b, q)
            assert got == restricted_ids(plain, layout, q, clusters), i
            assert [d.page_content for d in docs] == [f"doc {j}" for j in got]
            assert store.client.last_plan["queries"] == 1
            differs += got != exact_ids(plain, collection, q)
        assert differs > 0                     # the restriction shows in the hits
        batches = store.client.router_status(collection)["batches"]
        assert batches["searches"] == QUERIES and batches["queries"] == QUERIES

        # LangChain's retriever and scored search, same answers; nprobe per call reaches the client
        retriever = store.as_retriever(search_kwargs={"k": 10})
        q = queries[5]
        want = restricted_ids(plain, layout, q, own_clusters(w, b, q))
        assert [d.metadata["id"] for d in retriever.invoke(query_text(5))] == want
        scored = store.similarity_search_with_score(query_text(5), k=10)
        assert [d.metadata["id"] for d, _ in scored] == want
        everything = store.similarity_search(query_text(5), k=10, nprobe=layout.n_partitions)
        assert [d.metadata["id"] for d in everything] == exact_ids(plain, collection, q)
        assert store.client.router_status(collection)["batches"]["searches"] == QUERIES + 3
    finally:
        store.client.close()
        plain.close()


def test_langchain_async_searches_are_routed(langchain_milvus, lite_int, fixture_data, tmp_path):
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus
    uri, layouts = lite_int
    layout = layouts["docs"]
    _, w, b = publish_shifted_router(tmp_path / "models", layout)
    queries = fixture_data.queries[100:100 + QUERIES]
    store = routed_langchain_milvus(langchain_embeddings(queries), collection_name="docs",
                                    connection_args={"uri": uri}, model_dir=str(tmp_path / "models"),
                                    nprobe=NPROBE, client_options={"log_rate": 0}, **LC_FIELDS)
    plain = MilvusClient(uri)
    want = [restricted_ids(plain, layout, q, own_clusters(w, b, q)) for q in queries]

    async def main():
        assert isinstance(store.aclient, AsyncRoutedMilvusClient)
        try:
            got = await asyncio.gather(*[store.asimilarity_search(query_text(i), k=10)
                                         for i in range(QUERIES)])
            retrieved = await store.as_retriever(search_kwargs={"k": 10}).ainvoke(query_text(0))
            status = await store.aclient.router_status("docs")
            return got, retrieved, status
        finally:
            await store.aclient.close()
    try:
        got, retrieved, status = asyncio.run(main())
        assert [[d.metadata["id"] for d in docs] for docs in got] == want
        assert [d.metadata["id"] for d in retrieved] == want[0]
        assert status["mode"] == "learned"
        assert status["batches"]["searches"] == QUERIES + 1
        assert store.client.router_status("docs")["batches"]["searches"] == 0   # none went sync
    finally:
        store.client.close()
        plain.close()


def test_route_langchain_store_routes_a_store_langchain_built(langchain_milvus, lite_int,
                                                              fixture_data, tmp_path):
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.integrations.langchain import route_langchain_store
    uri, layouts = lite_int
    layout = layouts["docs"]
    _, w, b = publish_shifted_router(tmp_path / "models", layout)
    queries = fixture_data.queries[200:210]
    store = langchain_milvus.Milvus(langchain_embeddings(queries), collection_name="docs",
                                    connection_args={"uri": uri}, **LC_FIELDS)
    plain = MilvusClient(uri)
    try:
        before = [d.metadata["id"] for d in store.similarity_search(query_text(0), k=10)]
        assert before == exact_ids(plain, "docs", queries[0])        # LangChain's own: every row
        assert route_langchain_store(store, model_dir=str(tmp_path / "models"), log_rate=0) is store
        routed = store.client
        assert isinstance(routed, RoutedMilvusClient) and routed.log_rate == 0
        assert route_langchain_store(store).client is routed                  # routed once
        for i, q in enumerate(queries):
            got = [d.metadata["id"] for d in store.similarity_search(query_text(i), k=10)]
            assert got == restricted_ids(plain, layout, q, own_clusters(w, b, q)), i
    finally:
        store.client.close()
        plain.close()


def test_route_langchain_store_inside_a_loop_after_async_searches(langchain_milvus, lite_int,
                                                                  fixture_data, tmp_path):
    """A store that already searched asynchronously (its AsyncMilvusClient connected) is routed
    on the running loop: the replaced client is closed there, the next searches are routed."""
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    from milvus_ltr_router.integrations.langchain import route_langchain_store
    uri, layouts = lite_int
    layout = layouts["docs"]
    _, w, b = publish_shifted_router(tmp_path / "models", layout)
    queries = fixture_data.queries[500:504]
    store = langchain_milvus.Milvus(langchain_embeddings(queries), collection_name="docs",
                                    connection_args={"uri": uri}, **LC_FIELDS)
    plain = MilvusClient(uri)

    async def main():
        before = await store.asimilarity_search(query_text(0), k=10)
        old = store.aclient
        assert old._handler is not None                        # connected by that search
        route_langchain_store(store, model_dir=str(tmp_path / "models"), log_rate=0)
        assert isinstance(store.aclient, AsyncRoutedMilvusClient)
        got = await asyncio.gather(*[store.asimilarity_search(query_text(i), k=10)
                                     for i in range(len(queries))])
        await asyncio.sleep(0)
        await store.aclient.close()
        return before, old, got
    try:
        before, old, got = asyncio.run(main())
        assert [d.metadata["id"] for d in before] == exact_ids(plain, "docs", queries[0])
        assert old._handler is None                            # closed on the loop
        assert [[d.metadata["id"] for d in docs] for docs in got] == [
            restricted_ids(plain, layout, q, own_clusters(w, b, q)) for q in queries]
    finally:
        store.client.close()
        plain.close()


def test_langchain_on_a_collection_without_layout_passes_through(langchain_milvus, lite_int,
                                                                 fixture_data, tmp_path):
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus
    uri, _ = lite_int
    queries = fixture_data.queries[:5]
    store = routed_langchain_milvus(langchain_embeddings(queries), collection_name="src",
                                    connection_args={"uri": uri}, model_dir=str(tmp_path / "models"),
                                    nprobe=NPROBE, client_options={"log_rate": 0}, **LC_FIELDS)
    plain = MilvusClient(uri)
    try:
        for i, q in enumerate(queries):
            got = [d.metadata["id"] for d in store.similarity_search(query_text(i), k=10)]
            assert got == exact_ids(plain, "src", q)
        assert store.client.router_status("src")["mode"] == "none"
    finally:
        store.client.close()
        plain.close()


@pytest.mark.parametrize("storage", ["partition", "single"])
def test_langchain_add_texts_are_routed_writes(langchain_milvus, fixture_data, tmp_path, storage):
    """LangChain writes with string keys: a laid-out collection with a VARCHAR primary key;
    ``add_texts`` reaches the routed client's ``insert``, which puts each row in its cluster."""
    from pymilvus import DataType
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus
    from milvus_ltr_router.layout import cluster_of
    uri = str(tmp_path / "w.db")
    plain = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=32)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=384)
    schema.add_field("title", DataType.VARCHAR, max_length=32)
    index = plain.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    plain.create_collection("src", schema=schema, index_params=index)
    docs, queries = fixture_data.docs[:600], fixture_data.queries[:6]
    plain.insert("src", [{"id": f"k{i}", "vector": v.tolist(), "title": f"doc {i}"}
                         for i, v in enumerate(docs)])
    plain.flush("src")
    layout = build_layout(plain, "src", "docs", n_clusters=4, seed=0, storage=storage).layout
    store = routed_langchain_milvus(langchain_embeddings(queries), collection_name="docs",
                                    connection_args={"uri": uri}, model_dir=str(tmp_path / "models"),
                                    nprobe=1, client_options={"log_rate": 0}, **LC_FIELDS)
    try:
        keys = [f"new{i}" for i in range(len(queries))]
        assert store.add_texts([query_text(i) for i in range(len(queries))], ids=keys) == keys
        clusters = cluster_of(layout, queries)
        for i, key in enumerate(keys):
            [row] = plain.query("docs", filter=f'id == "{key}"', output_fields=["*"])
            assert row["title"] == query_text(i)
            if storage == "partition":
                part = layout.storage.write_partition(int(clusters[i]))
                assert plain.query("docs", filter=f'id == "{key}"', output_fields=["id"],
                                   partition_names=[part])
            else:
                assert row[layout.storage.cluster_field] == int(clusters[i])
            # searchable: among its own query's hits over every cluster, and never outside
            # the routed clusters in a routed search
            every = store.similarity_search(query_text(i), k=10, nprobe=layout.n_partitions)
            assert key in [d.metadata["id"] for d in every]
            hits = store.similarity_search(query_text(i), k=10, nprobe=1)
            probed = set(store.client.route("docs", queries[i], nprobe=1)[0])
            assert (key in [d.metadata["id"] for d in hits]) == (int(clusters[i]) in probed)
        assert store.client.router_status("docs")["batches"]["searches"] == 2 * len(keys)
    finally:
        store.client.close()
        plain.close()
        release_lite(uri)


# ---------------------------------------------------------------------------------- LlamaIndex


def llama_store(uri, collection, tmp_path, **kwargs):
    from milvus_ltr_router.integrations.llama_index import routed_milvus_vector_store
    return routed_milvus_vector_store(uri=uri, collection_name=collection, dim=384,
                                      embedding_field="vector", text_key="title",
                                      model_dir=str(tmp_path / "models"), nprobe=NPROBE,
                                      client_options={"log_rate": 0}, **kwargs)


@pytest.mark.parametrize("collection", ["docs", "docs_single"])
def test_llama_index_query_is_a_search_of_the_published_routers_clusters(
        llama_milvus, lite_int, fixture_data, tmp_path, collection):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.vector_stores import VectorStoreQuery
    from milvus_ltr_router.client import RoutedMilvusClient
    uri, layouts = lite_int
    layout = layouts[collection]
    version, w, b = publish_shifted_router(tmp_path / "models", layout)
    queries = fixture_data.queries[:QUERIES]
    store = llama_store(uri, collection, tmp_path)
    plain = MilvusClient(uri)
    try:
        assert isinstance(store, llama_milvus.MilvusVectorStore)
        assert isinstance(store.client, RoutedMilvusClient)
        status = store.client.router_status(collection)
        assert status["mode"] == "learned" and status["version"] == version
        differs = 0
        for i, q in enumerate(queries):
            res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10))
            clusters = store.client.route(collection, q)[0]
            assert set(clusters) == own_clusters(w, b, q)
            assert res.ids == restricted_ids(plain, layout, q, clusters), i
            assert [n.text for n in res.nodes] == [f"doc {j}" for j in res.ids]
            differs += res.ids != exact_ids(plain, collection, q)
        assert differs > 0
        assert store.client.router_status(collection)["batches"]["searches"] == QUERIES

        # through a VectorStoreIndex retriever (embedding the query text with the fixture)
        index = VectorStoreIndex.from_vector_store(store, embed_model=llama_embedding(queries))
        nodes = index.as_retriever(similarity_top_k=10).retrieve(query_text(7))
        q = queries[7]
        assert [n.node.text for n in nodes] == [
            f"doc {j}" for j in restricted_ids(plain, layout, q, own_clusters(w, b, q))]
        store.client.nprobe = layout.n_partitions        # the routed client's default: every cluster
        res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10))
        assert res.ids == exact_ids(plain, collection, q)
        assert store.client.router_status(collection)["batches"]["searches"] == QUERIES + 2
    finally:
        store.client.close()
        plain.close()


def test_llama_index_async_queries_are_routed(llama_milvus, lite_int, fixture_data, tmp_path):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.vector_stores import VectorStoreQuery
    from milvus_ltr_router.async_client import AsyncRoutedMilvusClient
    uri, layouts = lite_int
    layout = layouts["docs"]
    _, w, b = publish_shifted_router(tmp_path / "models", layout)
    queries = fixture_data.queries[300:300 + QUERIES]
    store = llama_store(uri, "docs", tmp_path)
    plain = MilvusClient(uri)
    want = [restricted_ids(plain, layout, q, own_clusters(w, b, q)) for q in queries]
    index = VectorStoreIndex.from_vector_store(store, embed_model=llama_embedding(queries))

    async def main():
        assert isinstance(store.aclient, AsyncRoutedMilvusClient)
        try:
            got = await asyncio.gather(*[
                store.aquery(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10))
                for q in queries])
            nodes = await index.as_retriever(similarity_top_k=10).aretrieve(query_text(3))
            return got, nodes, await store.aclient.router_status("docs")
        finally:
            await store.aclient.close()
    try:
        got, nodes, status = asyncio.run(main())
        assert [r.ids for r in got] == want
        assert [n.node.text for n in nodes] == [f"doc {j}" for j in want[3]]
        assert status["mode"] == "learned" and status["batches"]["searches"] == QUERIES + 1
    finally:
        store.client.close()
        plain.close()


def test_route_llama_index_store_and_a_store_without_async_client(llama_milvus, lite_int,
                                                                  fixture_data, tmp_path):
    from llama_index.core.vector_stores import VectorStoreQuery
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.integrations.llama_index import route_llama_index_store
    uri, layouts = lite_int
    layout = layouts["docs"]
    _, w, b = publish_shifted_router(tmp_path / "models", layout)
    q = fixture_data.queries[400]
    plain = MilvusClient(uri)
    store = llama_milvus.MilvusVectorStore(uri=uri, collection_name="docs", dim=384,
                                           embedding_field="vector", text_key="title",
                                           use_async_client=False)
    query = VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=10)
    try:
        assert store.query(query).ids == exact_ids(plain, "docs", q)          # LlamaIndex's own
        assert route_llama_index_store(store, uri, model_dir=str(tmp_path / "models"),
                                       nprobe=NPROBE, log_rate=0) is store
        assert isinstance(store.client, RoutedMilvusClient) and store.aclient is None
        routed = store.client
        assert route_llama_index_store(store, uri).client is routed           # routed once
        assert store.query(query).ids == restricted_ids(plain, layout, q, own_clusters(w, b, q))
        other = llama_store(uri, "docs", tmp_path, use_async_client=False)
        assert other.aclient is None and isinstance(other.client, RoutedMilvusClient)
        other.client.close()
    finally:
        store.client.close()
        plain.close()


@pytest.mark.parametrize("storage", ["partition", "single"])
def test_a_collection_llama_index_created_laid_out_read_and_written_through_the_store(
        llama_milvus, fixture_data, tmp_path, storage):
    """LlamaIndex's own schema (VARCHAR ids, node JSON in dynamic fields) survives the layout:
    the routed store's queries return its nodes (text, metadata) from the routed clusters, and
    its ``add`` is a routed insert (each node in its cluster)."""
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores import VectorStoreQuery
    from milvus_ltr_router.integrations.llama_index import routed_milvus_vector_store
    from milvus_ltr_router.layout import cluster_of
    uri = str(tmp_path / "n.db")
    docs, queries = fixture_data.docs[:800], fixture_data.queries[:5]
    native = llama_milvus.MilvusVectorStore(uri=uri, collection_name="notes", dim=384,
                                            use_async_client=False)
    native.add([TextNode(id_=f"n{i}", text=f"note {i}", embedding=v.tolist(), metadata={"grp": i % 3})
                for i, v in enumerate(docs)])
    native.client.close()
    plain = MilvusClient(uri)
    layout = build_layout(plain, "notes", "notes_ivf", n_clusters=4, seed=0, storage=storage).layout
    store = routed_milvus_vector_store(uri=uri, collection_name="notes_ivf", dim=384,
                                       model_dir=str(tmp_path / "models"), nprobe=1,
                                       client_options={"log_rate": 0}, use_async_client=False)
    try:
        for q in queries:
            res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=5))
            clusters = store.client.route("notes_ivf", q)[0]
            assert res.ids == restricted_ids(plain, layout, q, clusters, limit=5)
            assert [n.text for n in res.nodes] == [f"note {k[1:]}" for k in res.ids]
            assert [n.metadata["grp"] for n in res.nodes] == [int(k[1:]) % 3 for k in res.ids]
        new = [TextNode(id_=f"x{i}", text=f"new {i}", embedding=q.tolist())
               for i, q in enumerate(queries)]
        assert store.add(new) == [n.id_ for n in new]
        clusters = cluster_of(layout, queries)
        for i, node in enumerate(new):
            if storage == "partition":
                part = layout.storage.write_partition(int(clusters[i]))
                assert plain.query("notes_ivf", filter=f'id == "{node.id_}"', output_fields=["id"],
                                   partition_names=[part])
            else:
                [row] = plain.query("notes_ivf", filter=f'id == "{node.id_}"',
                                    output_fields=[layout.storage.cluster_field])
                assert row[layout.storage.cluster_field] == int(clusters[i])
        assert store.client.router_status("notes_ivf")["batches"]["searches"] == len(queries)
    finally:
        store.client.close()
        plain.close()
        release_lite(uri)
