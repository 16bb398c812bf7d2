"""Atomic file writes: write beside the target, then rename, so an interrupted run never leaves
a half-written file that looks complete (the results contract, docs/results.md); the one translation of a full
disk into `DiskFull`; the one JSON-lines reader and the one reader of a JSON array with each element's line;
and the tool's cache root."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cl_flat.errors import DataError, DiskFull

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_full_error(exc: BaseException) -> OSError | None:
    """The OSError (ENOSPC, EDQUOT, EROFS) behind `exc`, following its causes, or None. torch and
    safetensors wrap the OSError of a failed write in their own RuntimeError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """A block that writes `path` (a file, or a folder it fills): a full disk raises DiskFull naming it (not the
    OSError's file name, often a temporary file)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        full = disk_full_error(exc) or _full_disk_behind(exc, path)
        if full is None:
            raise
        raise DiskFull(path) from exc


def _full_disk_behind(exc: BaseException, path: str | os.PathLike[str]) -> OSError | None:
    """A library's error that dropped the errno (torch.save: "unexpected pos 24000 vs 23892") while `path`'s
    file system has (almost) no space left: that is the cause."""
    if not isinstance(exc, (RuntimeError, OSError)):
        return None
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if stats.f_bavail * stats.f_frsize < 1 << 20 else None


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces `path`."""
    target = Path(path)
    with writing(target):
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


def json_lines(path: str | os.PathLike[str], error: type[Exception] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number from 1, value) of each non-blank line of a JSON-lines file (UTF-8, a BOM accepted); a
    line that is not UTF-8 or not JSON raises `error` naming `path:line`."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise error(f"{path}:{number}: JSON nested too deeply") from None
            yield number, value


def line_col(text: str, pos: int) -> tuple[int, int]:
    """The line and column (from 1) of offset `pos` in `text`."""
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def skip_space(text: str, pos: int) -> int:
    """The first offset at or after `pos` that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def json_array(path: str | os.PathLike[str], text: str, start: int = 0,
               error: type[Exception] = DataError) -> tuple[list[tuple[Any, int]], int]:
    """The elements of the JSON array at offset `start` of `text` (the contents of `path`), each with the line it
    starts on, and the offset just after the array; malformed JSON raises `error` naming `path:line:column`."""
    decoder = json.JSONDecoder()
    pos = skip_space(text, start)
    if not text.startswith("[", pos):
        raise error(f"{path}:{line_col(text, pos)[0]}: expected a JSON array of rows")
    items: list[tuple[Any, int]] = []
    line, counted = 1, 0  # the line of offset `counted`, advanced as the rows are read
    pos = skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
        line, counted = line + text.count("\n", counted, pos), pos
        items.append((value, line))
        pos = skip_space(text, end)
        if text.startswith(",", pos):
            pos = skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            where = ":".join(map(str, line_col(text, pos)))
            raise error(f"{path}:{where}: not valid JSON (expected ',' or ']' after row {len(items)})")
    return items, pos + 1


def cache_root() -> Path:
    """Where cl-flat keeps rebuildable files (de-quantised builtin models, compiled kernels):
    `$CL_FLAT_CACHE`, default `~/.cache/cl-flat`."""
    return Path(os.environ.get("CL_FLAT_CACHE") or Path.home() / ".cache" / "cl-flat")
