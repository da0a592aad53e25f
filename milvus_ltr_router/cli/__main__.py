"""``python -m milvus_ltr_router.cli``: the ``milvus-ltr-router`` command."""
import sys

from .app import main

sys.exit(main())
