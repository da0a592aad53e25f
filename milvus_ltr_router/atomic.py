"""Write-then-rename, so a reader sees the old file or the new one, never half of one.

The temp file is created with mode 0666 and the process umask applied by the
kernel (0644 under umask 022), as ``open()`` would create the final file, so
a router published by the retrain job is readable by clients running as
another user. (``tempfile.mkstemp`` would make it 0600 whatever the umask.)
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

TEMP_PREFIX = ".tmp-"
FILE_MODE = 0o666       # before the umask, as open() and touch() use


def _create_temp(directory: Path, suffix: str) -> tuple[int, Path]:
    """A new, exclusively created file ``.tmp-<random><suffix>`` in ``directory``."""
    for _ in range(100):
        tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                           FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {directory}")


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file beside it; an ``OSError`` (a full
    disk: ENOSPC) names ``path`` and leaves the old file, if any, as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)     # 0777 less the umask (0755 under 022)
    fd, tmp = _create_temp(path.parent, path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno is None:
            raise
        # a full disk or a quota says so without a file name: name the file being written
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
