"""Progress reporting that suits both a terminal and a cron log.

On a TTY long steps show a tqdm bar; otherwise (cron, CI, pipes) nothing is
drawn and the caller's logging carries the story, so logs stay readable.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _want_bar(enabled: bool | None) -> bool:
    if enabled is not None:
        return enabled
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar when stderr is a terminal."""
    if not _want_bar(enabled):
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a soft dependency
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True,
                    dynamic_ncols=True, leave=False)


class ProgressCounter:
    """A counter-style bar for work that arrives in blocks of unknown size."""

    def __init__(self, total: int | None, desc: str, unit: str = "rows",
                 enabled: bool | None = None):
        self._bar = None
        if _want_bar(enabled):
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                                 dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "ProgressCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
