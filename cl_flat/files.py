"""Atomic file writes: write beside the target, then rename, so an interrupted run never leaves
a half-written file that looks complete (the README's results contract); and the tool's cache root."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def cache_root() -> Path:
    """Where cl-flat keeps rebuildable files (de-quantised builtin models, compiled kernels):
    `$CL_FLAT_CACHE`, default `~/.cache/cl-flat`."""
    return Path(os.environ.get("CL_FLAT_CACHE") or Path.home() / ".cache" / "cl-flat")
