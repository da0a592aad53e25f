"""Framework vector stores that search through the routed clients.

- :mod:`.langchain`: ``routed_langchain_milvus(...)`` builds a ``langchain_milvus.Milvus``
  (``pip install 'milvus-ltr-router[langchain]'``); ``route_langchain_store(store)`` routes one
  built elsewhere (``Milvus.from_documents``, ...).
- :mod:`.llama_index`: ``routed_milvus_vector_store(...)`` builds a LlamaIndex
  ``MilvusVectorStore`` (``pip install 'milvus-ltr-router[llamaindex]'``);
  ``route_llama_index_store(store, uri)`` routes one built elsewhere.

Both keep the framework's own objects and API: the store's pymilvus clients (sync and async)
are replaced by :class:`~milvus_ltr_router.client.RoutedMilvusClient` and
:class:`~milvus_ltr_router.async_client.AsyncRoutedMilvusClient` on the same connection, so
every search the framework sends to a laid-out collection is routed (and everything else
passes through as with the routed clients themselves). This package imports neither
framework; each submodule imports its own only when one of its functions is called.
"""
from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["routed_langchain_milvus", "route_langchain_store", "routed_milvus_vector_store",
           "route_llama_index_store"]

_EXPORTS = {"routed_langchain_milvus": "langchain", "route_langchain_store": "langchain",
            "routed_milvus_vector_store": "llama_index", "route_llama_index_store": "llama_index"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def routed_clients(connect: dict, options: dict, *, async_client: bool = True):
    """``(RoutedMilvusClient, AsyncRoutedMilvusClient | None)`` on the connection ``connect``
    (``MilvusClient`` keyword arguments) with the routed clients' own ``options``. The async
    client connects on its first call (pymilvus's does too), so it can be built outside an
    event loop."""
    from ..async_client import AsyncRoutedMilvusClient
    from ..client import RoutedMilvusClient
    sync = RoutedMilvusClient(**connect, **options)
    if not async_client:
        return sync, None
    connect = {k: v for k, v in connect.items() if k != "alias"}   # as the frameworks do
    return sync, AsyncRoutedMilvusClient(**connect, **options)


def retire_sync(client) -> None:
    """Close a replaced pymilvus ``MilvusClient`` (its shared connection stays open for the
    routed client, pymilvus counts the clients on a connection)."""
    from ..client import RoutedMilvusClient
    if client is None or isinstance(client, RoutedMilvusClient):
        return
    try:
        client.close()
    except Exception:       # a replaced client that cannot close is not worth failing over
        pass


def retire_async(client) -> None:
    """Close a replaced ``AsyncMilvusClient``: nothing to do while it never connected (pymilvus
    connects on first use); else closed on the running loop, if any."""
    from ..async_client import AsyncRoutedMilvusClient
    if client is None or isinstance(client, AsyncRoutedMilvusClient):
        return
    if getattr(client, "_handler", None) is None:
        return
    try:
        task = asyncio.get_running_loop().create_task(client.close())
    except RuntimeError:    # no loop: it is released when collected
        return
    _closing.add(task)      # the loop keeps only a weak reference to a task
    task.add_done_callback(_closing.discard)


_closing: set = set()


def routing_options(model_dir: str, nprobe: int | None, options: dict | None) -> dict:
    """The routed clients' keyword arguments: ``model_dir``, ``nprobe`` and the rest of
    :class:`~milvus_ltr_router.client.RoutedMilvusClient`'s (``log_rate``, ``reload_interval``,
    ...), which win over the two named ones."""
    return {"model_dir": model_dir, "nprobe": nprobe, **(options or {})}
