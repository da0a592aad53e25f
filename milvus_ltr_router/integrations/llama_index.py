"""LlamaIndex: a ``MilvusVectorStore`` (llama-index-vector-stores-milvus) whose searches are routed.

``MilvusVectorStore`` builds its own pymilvus ``MilvusClient`` (and ``AsyncMilvusClient`` with
``use_async_client=True``, its default) from ``uri``, ``token`` and its extra keyword arguments,
and sends every dense search through them. :func:`routed_milvus_vector_store` builds the store
as usual and replaces both with :class:`~milvus_ltr_router.client.RoutedMilvusClient` and
:class:`~milvus_ltr_router.async_client.AsyncRoutedMilvusClient` on the same connection; the
application keeps LlamaIndex's API (``VectorStoreIndex.from_vector_store``, retrievers,
query engines, ``store.query`` / ``store.aquery``)::

    from llama_index.core import VectorStoreIndex
    from milvus_ltr_router.integrations.llama_index import routed_milvus_vector_store

    store = routed_milvus_vector_store(uri="http://milvus:19530", collection_name="docs_app",
                                       model_dir="onnx_models", nprobe=8, dim=384,
                                       embedding_field="vector", text_key="title")
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed_model)
    nodes = index.as_retriever(similarity_top_k=10).retrieve("how do tides work")   # routed
    nodes = await index.as_retriever(similarity_top_k=10).aretrieve("how do tides work")

LlamaIndex passes no extra search arguments to the client, so the clusters per query are the
routed client's ``nprobe`` (or the router's default); ``store.client.nprobe = 16`` changes it.
A query naming ``milvus_partition_names`` passes through unrouted, as with the routed client.
Sparse and hybrid queries reach the routed client as LlamaIndex sends them (a ``search`` of
another field than the layout's passes through). ``store.client.router_status(collection)``
and ``store.client.last_plan`` tell what was routed; ``store.client.close()`` writes out the
query log at shutdown.

Requires ``llama-index-vector-stores-milvus`` 1.2 or newer
(``pip install 'milvus-ltr-router[llamaindex]'``; every release of it declares
``pymilvus<3``, see the README for pymilvus 3).
"""
from __future__ import annotations

import inspect
from typing import Any

from . import retire_async, retire_sync, routed_clients, routing_options


def _store_class():
    try:
        from llama_index.vector_stores.milvus import MilvusVectorStore
    except ImportError as exc:     # pragma: no cover - depends on the installed extras
        raise ImportError("milvus_ltr_router.integrations.llama_index needs "
                          "llama-index-vector-stores-milvus: "
                          "pip install 'milvus-ltr-router[llamaindex]'") from exc
    return MilvusVectorStore


def _connection_kwargs(store_class, kwargs: dict) -> dict:
    """The keyword arguments ``MilvusVectorStore`` hands on to ``MilvusClient`` (those that
    are not its own parameters: ``server_pem_path``, ``db_name``, ``timeout``, ...)."""
    own = set(inspect.signature(store_class.__init__).parameters) - {"self", "kwargs"}
    return {k: v for k, v in kwargs.items() if k not in own}


def routed_milvus_vector_store(uri: str = "./milvus_llamaindex.db", token: str = "", *,
                               model_dir: str = "onnx_models", nprobe: int | None = None,
                               client_options: dict | None = None, **store_kwargs: Any):
    """``MilvusVectorStore(uri=uri, token=token, **store_kwargs)`` whose searches go through
    the routed clients (see the module docstring).

    ``model_dir`` and ``nprobe`` are the routed clients' (the published routers' directory;
    clusters per query, None: the router's default); ``client_options`` any other
    :class:`~milvus_ltr_router.client.RoutedMilvusClient` keyword argument (``log_rate``,
    ``reload_interval``, ``recall_sample``, ...). Everything else is LlamaIndex's
    (``collection_name``, ``dim``, ``embedding_field``, ``text_key``, ``output_fields``,
    ``use_async_client``, ...; keyword arguments it does not know go to ``MilvusClient``, as
    with ``MilvusVectorStore`` itself, and to the routed clients). The store is built (its
    collection created or indexed as LlamaIndex does) through LlamaIndex's own client first,
    then routed.
    """
    store_class = _store_class()
    store = store_class(uri=uri, token=token, **store_kwargs)
    connect = {"uri": uri, "token": token, **_connection_kwargs(store_class, store_kwargs)}
    return _route(store, connect, routing_options(model_dir, nprobe, client_options))


def route_llama_index_store(store, uri: str, token: str = "", *, model_dir: str = "onnx_models",
                            nprobe: int | None = None, connection: dict | None = None,
                            **options: Any):
    """Route an existing ``MilvusVectorStore`` built on ``uri`` / ``token`` (it does not keep
    them; ``connection``: the other ``MilvusClient`` keyword arguments it was built with):
    its clients are replaced by routed clients on that connection; returns ``store``.
    ``options``: other :class:`~milvus_ltr_router.client.RoutedMilvusClient` keyword
    arguments. A store already routed is left as it is."""
    store_class = _store_class()
    if not isinstance(store, store_class):
        raise TypeError(f"expected a MilvusVectorStore, got {type(store).__name__}")
    connect = {"uri": uri, "token": token, **(connection or {})}
    return _route(store, connect, routing_options(model_dir, nprobe, options))


def _route(store, connect: dict, options: dict):
    from ..client import RoutedMilvusClient
    if isinstance(store._milvusclient, RoutedMilvusClient):
        return store
    old_sync, old_async = store._milvusclient, store._async_milvusclient
    sync, async_ = routed_clients(connect, options, async_client=old_async is not None)
    store._milvusclient = sync
    store._async_milvusclient = async_
    retire_sync(old_sync)
    retire_async(old_async)
    return store
