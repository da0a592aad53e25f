"""LangChain: a ``langchain_milvus.Milvus`` vector store whose searches are routed.

``langchain_milvus.Milvus`` builds its own pymilvus ``MilvusClient`` and ``AsyncMilvusClient``
from ``connection_args`` and sends every search through them (``store.client.search``,
``store.aclient.search``). :func:`routed_langchain_milvus` builds the store as usual and
replaces both with :class:`~milvus_ltr_router.client.RoutedMilvusClient` and
:class:`~milvus_ltr_router.async_client.AsyncRoutedMilvusClient` on the same connection;
the application keeps LangChain's API (``similarity_search``, ``as_retriever``,
``asimilarity_search``, ``add_texts``, ...)::

    from langchain_milvus import Milvus
    from milvus_ltr_router.integrations.langchain import routed_langchain_milvus

    store = routed_langchain_milvus(embeddings, collection_name="docs_app",
                                    connection_args={"uri": "http://milvus:19530"},
                                    model_dir="onnx_models", nprobe=8,
                                    primary_field="id", text_field="title", vector_field="vector")
    docs = store.similarity_search("how do tides work", k=10)            # routed, nprobe 8
    docs = store.similarity_search("how do tides work", k=10, nprobe=16) # per call
    docs = store.similarity_search("how do tides work", k=10, recall_target=0.9)
    docs = await store.asimilarity_search("how do tides work", k=10)     # routed, async

Extra keyword arguments of LangChain's search methods reach ``MilvusClient.search``, so the
routed client's ``nprobe`` / ``recall_target`` / ``min_nprobe`` / ``max_nprobe`` work per
call. ``store.client.router_status(collection)`` and ``store.client.last_plan`` tell what was
routed. ``store.client.close()`` writes out the query log at shutdown.

Requires ``langchain-milvus`` 0.3.3 or newer (``pip install 'milvus-ltr-router[langchain]'``).
"""
from __future__ import annotations

from typing import Any

from . import retire_async, retire_sync, routed_clients, routing_options


def _milvus_class():
    try:
        from langchain_milvus import Milvus
    except ImportError as exc:     # pragma: no cover - depends on the installed extras
        raise ImportError("milvus_ltr_router.integrations.langchain needs langchain-milvus: "
                          "pip install 'milvus-ltr-router[langchain]'") from exc
    return Milvus


def routed_langchain_milvus(embedding_function: Any = None, *, model_dir: str = "onnx_models",
                            nprobe: int | None = None, client_options: dict | None = None,
                            **milvus_kwargs: Any):
    """``langchain_milvus.Milvus(embedding_function, **milvus_kwargs)`` whose searches go
    through the routed clients (see the module docstring).

    ``model_dir`` and ``nprobe`` are the routed clients' (the published routers' directory;
    clusters per query, None: the router's default); ``client_options`` any other
    :class:`~milvus_ltr_router.client.RoutedMilvusClient` keyword argument (``log_rate``,
    ``reload_interval``, ``recall_sample``, ...). Everything else is LangChain's
    (``collection_name``, ``connection_args``, ``primary_field``, ``text_field``,
    ``vector_field``, ``search_params``, ...). The store is built (and its collection created,
    indexed or loaded as LangChain does) through LangChain's own client first, then routed.
    """
    store = _milvus_class()(embedding_function, **milvus_kwargs)
    return route_langchain_store(store, model_dir=model_dir, nprobe=nprobe,
                                 **(client_options or {}))


def route_langchain_store(store, *, model_dir: str = "onnx_models", nprobe: int | None = None,
                          **options: Any):
    """Route an existing ``langchain_milvus.Milvus`` (e.g. from ``Milvus.from_documents``):
    its ``MilvusClient`` and ``AsyncMilvusClient`` are replaced by routed clients on the same
    ``connection_args``; returns ``store``. ``options``: other
    :class:`~milvus_ltr_router.client.RoutedMilvusClient` keyword arguments. A store already
    routed is left as it is."""
    from ..client import RoutedMilvusClient
    Milvus = _milvus_class()
    if not isinstance(store, Milvus):
        raise TypeError(f"expected a langchain_milvus.Milvus, got {type(store).__name__}")
    if not hasattr(store, "_milvus_client") or not hasattr(store, "_connection_args"):
        raise TypeError("this langchain-milvus keeps no MilvusClient to route "
                        "(langchain-milvus 0.3.3 or newer is needed)")
    if isinstance(store._milvus_client, RoutedMilvusClient):
        return store
    sync, async_ = routed_clients(dict(store._connection_args),
                                  routing_options(model_dir, nprobe, options))
    old_sync, old_async = store._milvus_client, getattr(store, "_async_milvus_client", None)
    store._milvus_client = sync
    store._async_milvus_client = async_
    # the collection view LangChain caches is keyed by the client's connection alias
    store.alias = sync._using
    store._col_cache, store._cache_key = None, None
    retire_sync(old_sync)
    retire_async(old_async)
    return store
