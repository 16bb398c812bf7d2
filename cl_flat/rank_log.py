"""`RankLog`: every rank's console output (file descriptors 1 and 2) copied into logs/rank<k>.log while the
console keeps it."""

from __future__ import annotations

import atexit
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cl_flat.files import writing


class _Terminal:
    """A text stream that writes through `stream` but reports whether the console is a terminal, as before
    RankLog put a pipe under it (rich draws live progress bars only on a terminal)."""

    def __init__(self, stream, is_terminal: bool):
        self._stream = stream
        self._is_terminal = is_terminal

    def isatty(self) -> bool:
        return self._is_terminal

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class RankLog:
    """Copies everything this process writes to stdout and stderr (file descriptors 1 and 2: print, Python
    warnings, logging, DeepSpeed, C++ libraries, child processes) into a log file, while it still reaches the
    console as before. Output before `attach` is held in memory (at most HELD_BYTES) and written first; if the
    run never gets its folder (it was refused) nothing is written. The log gets whole lines of each stream (a
    print's pieces and a message on the other stream never interleave mid-line; a line longer than LINE_BYTES is
    cut). Lasts until the process exits (`close`)."""

    HELD_BYTES = 1 << 20
    LINE_BYTES = 1 << 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = bytearray()
        self._file = None
        self._path: Path | None = None
        self._consoles: dict[int, int] = {}  # fd -> a duplicate of what it was (the console)
        self._streams: dict[str, Any] = {}
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()

    active: RankLog | None = None  # the one this process started: `last_words` ends it

    @classmethod
    def last_words(cls, text: str) -> None:
        """`text` (the message a failing command ends with) on the console and in the rank log, written after
        the console is put back under fd 2: it does not depend on the copier threads draining the pipe at
        exit, which a loaded machine showed they may not do (an empty stderr after a refusal)."""
        log, cls.active = cls.active, None
        path = log.close() if log is not None else None
        print(text, file=sys.stderr, flush=True)
        if path is not None:
            try:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(text + "\n")
            except OSError:  # a full disk: the console has it
                pass

    def start(self) -> RankLog:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            stream = getattr(sys, name)
            stream.flush()
            console = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._copy, args=(read, console), daemon=True, name=f"rank-log-{name}")
            thread.start()
            self._consoles[fd], self._streams[name] = console, stream
            self._threads.append(thread)
            setattr(sys, name, _Terminal(stream, os.isatty(console)))
        atexit.register(self.close)
        RankLog.active = self
        return self

    def attach(self, path: Path, rank: int, world: int) -> None:
        """From now on (and what was held) into `path`, appended to what earlier attempts (a resume) wrote."""
        with self._lock, writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab")
            self._path = path
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._file.write(f"==== cl-flat {' '.join(sys.argv[1:])} | rank {rank} of {world} | pid {os.getpid()}"
                             f" | {stamp} ====\n".encode())
            self._file.write(bytes(self._held))
            self._file.flush()
            self._held.clear()

    def _copy(self, read: int, console: int) -> None:
        """Pipe -> console and log, until EOF or, once closing, until the pipe is empty (a library may hold a
        duplicate of fd 2 for the life of the process: EOF would never come)."""
        waiting = select.poll()
        waiting.register(read, select.POLLIN)
        partial = bytearray()  # the stream's line not yet ended
        while True:
            if not waiting.poll(100):
                if self._closing.is_set():
                    break
                continue
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(console, view):]
            except OSError:  # the console went away: keep the log
                pass
            partial += chunk
            cut = partial.rfind(b"\n") + 1 if len(partial) <= self.LINE_BYTES else len(partial)
            if cut:
                self._log(bytes(partial[:cut]))
                del partial[:cut]
        if partial:
            self._log(bytes(partial))
        os.close(read)

    def _log(self, lines: bytes) -> None:
        with self._lock:
            if self._file is not None:
                self._write_log(lines)
            elif len(self._held) < self.HELD_BYTES:
                self._held += lines

    def _write_log(self, chunk: bytes) -> None:
        """Into the log file; if it cannot be written (a full disk) the log stops there, while the console still
        gets everything: a copier that died would leave the pipe full and every print blocked."""
        try:
            self._file.write(chunk)
            self._file.flush()
        except OSError:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass

    def close(self) -> Path | None:
        """Put the console back under fd 1 and 2 and copy what is still in the pipes; returns the log file's
        path (None before `attach`)."""
        if not self._consoles:
            return self._path
        for name, stream in self._streams.items():
            try:
                getattr(sys, name).flush()
            except (OSError, ValueError):
                pass
            setattr(sys, name, stream)
        for fd, console in self._consoles.items():
            os.dup2(console, fd)
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=2)  # never wait long for a writer that keeps writing
        if not any(thread.is_alive() for thread in self._threads):
            for console in self._consoles.values():
                os.close(console)
        self._consoles.clear()
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:  # a full disk: the log ends where it could be written
                    pass
                self._file = None
        return self._path
