"""Durable atomic writes: a temporary file in the target's folder, flushed and fsync'ed, then
``os.replace``d into place, then the folder fsync'ed, as databases do. A kill at any moment
leaves the old file or the new one; a power loss cannot leave a renamed but empty file
(a rename without the fsyncs can be persisted before the data it points to)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: names created or renamed in it). No-op where
    directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under ``root`` and every folder, deepest first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *,
                 prefix: str = ".tmp-", mode: int | None = None, binary: bool = False) -> None:
    """Call ``write(fh)`` on a temporary text (``binary=True``: bytes) file next to ``path``,
    then make it ``path`` durably and atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix="-" + os.path.basename(path), dir=folder)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:  # what open() would have given (mkstemp makes 0600)
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
