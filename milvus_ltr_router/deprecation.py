"""Deprecation paths for names that moved to another module of the package."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved_names(module: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module``: each name in ``homes`` (name -> the
    module that holds it now) is imported from its new home when first asked for, with a
    DeprecationWarning pointing at the importing line. Lazy, so the old module imports none
    of the new ones at load time (no import cycle)."""
    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        warnings.warn(f"{module}.{name} has moved: import it from {home}", DeprecationWarning,
                      stacklevel=2)
        return value
    return __getattr__
