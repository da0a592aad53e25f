"""milvus-ltr-router: learned partition routing for Milvus (arXiv 2404.11731).

Serving imports (layout, router, client) need only pymilvus, numpy and
onnxruntime; training lives in :mod:`milvus_ltr_router.train` (``[train]`` extra).
"""
__version__ = "0.1.0"
