"""Progress reporting that suits both a terminal and a cron log.

On a TTY long steps show a tqdm bar. Otherwise (cron, CI, pipes) no bar is
drawn; instead a log line reports the count every ``LOG_EVERY_S`` seconds, so
a long step in a log file still shows it is moving and how far it got.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("milvus_ltr_router.progress")
LOG_EVERY_S = 30.0


def _want_bar(enabled: bool | None) -> bool:
    if enabled is not None:
        return enabled
    return sys.stderr.isatty()


class ProgressCounter:
    """A counter for work that arrives in blocks: a bar on a TTY, periodic log lines otherwise."""

    def __init__(self, total: int | None, desc: str, unit: str = "rows",
                 enabled: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.count = 0
        self._bar = None
        self._started = self._last_log = time.monotonic()
        if _want_bar(enabled):
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                                 dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            of = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s %s (%.0f s)", self.desc, self.count, of, self.unit, now - self._started)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "ProgressCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable``: a progress bar on a terminal, periodic log lines otherwise."""
    with ProgressCounter(total, desc, unit, enabled) as counter:
        for item in iterable:
            yield item
            counter.update(1)
