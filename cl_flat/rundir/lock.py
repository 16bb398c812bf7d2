"""One writer per results folder: `<run>/.lock`, held by rank 0 of the command that writes the folder
(`cl-flat train`, fresh or --resume, its references, `cl-flat landscape`) for the command's life.

The lock is an fcntl.flock on the open file, so the kernel releases it whenever the holder's process
ends, however it ends (SIGKILL included); the file's text (host, pid, start time) only names the
holder. A live holder refuses the second command at once (exit 2); text left by a dead one is taken
over with a one-line notice. A command refused after taking the lock (its input checked under it)
writes nothing: the holder's text is written by `claim`, when the command starts writing the folder,
and emptied on release (the file stays, a free lock); a lock file, and folders, that a never-claimed
lock created are removed again, so a fresh run refused for bad data leaves nothing behind.

`cl-flat eval` takes no lock: it reads a complete run only (metrics.json present), and no train writes
to a complete folder again (a fresh start or a --resume there is refused).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cl_flat import dist
from cl_flat.errors import UserError

NAME = ".lock"


class FolderBusy(UserError):
    """Another live process holds the run folder's lock."""

    exit_code = 2


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"{info['command']} (pid {info['pid']} on {info['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """The lock of run folder `folder`, taken for `command` (e.g. "cl-flat train")."""

    def __init__(self, folder: Path, command: str):
        self.path = Path(folder) / NAME
        self.command = command
        self._fd: int | None = None
        self._created: list[Path] = []
        self._created_file = False
        self._claimed = False

    def acquire(self) -> RunLock:
        """Take the lock or raise FolderBusy naming the holder; writes nothing into an existing folder."""
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first: the order they are removed in
        while True:
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(fd)
            if self._current(fd):
                break
            os.close(fd)  # we locked a file its never-claimed holder removed on release: open the new one
        self._created_file = not existed
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous.strip():  # a holder that ended without releasing (killed): its lock died with it
            print(f"note: taking over the lock of {_holder(previous)}, which is gone", file=sys.stderr)
        self._fd = fd
        return self

    def claim(self) -> None:
        """Name this process as the holder in the lock file: the command starts writing the folder."""
        if self._fd is not None and not self._claimed:
            info = {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode() + b"\n", 0)
            self._claimed = True

    def _current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _refuse(self, fd: int) -> None:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        self._remove_created()
        raise FolderBusy(f"{self.path.parent} is in use by {_holder(text)}: wait for it to finish or stop it "
                         "(two writers would corrupt the run), or choose another run.name (--set run.name=...)")

    def release(self) -> None:
        """Empty the holder's text (or remove the file a never-claimed lock created), then unlock, in this
        order: a waiting taker never reads our text as a dead holder's."""
        if self._fd is None:
            return
        if self._claimed:
            os.ftruncate(self._fd, 0)
        elif self._created_file:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it
                break


@contextmanager
def held(folder: Path, command: str) -> Iterator[RunLock]:
    """Rank 0 holds `folder`'s lock for the block (`claim` it where the command starts writing); every
    rank gets the same FolderBusy."""
    lock = RunLock(folder, command)
    refusal = None
    if dist.is_main():
        try:
            lock.acquire()
        except FolderBusy as exc:
            refusal = str(exc)
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise FolderBusy(refusal)
    try:
        yield lock
    finally:
        lock.release()
