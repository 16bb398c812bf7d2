"""A clean stop on SIGTERM (what SLURM and Kubernetes send before SIGKILL) or SIGINT (Ctrl-C) while a task
trains.

The handler (`catching`, around each task's training) only records the signal. The update loop reads
the request once per update, after the update in flight: every rank at the same update, since the flag
travels in the update's one existing reduction (`train._fetch` sums it with the non-finite flags: no
extra collective, no extra host sync). The loop then writes an in-task checkpoint and raises `Stopped`
(exit 128 + signal: 143 for SIGTERM, 130 for SIGINT). A second Ctrl-C acts at once, as it would
without the handler. Outside training (loading, evaluation) both raise `Interrupted` (`interrupt_raises`):
the CLI says that completed tasks are kept and exits 130/143.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"requested": 0, "agreed": False}  # the signal this process received; the ranks' shared decision


class Stopped(Exception):
    """Training stopped on a signal after `updates` of `total` updates of task `task`."""

    def __init__(self, signum: int, task: str, updates: int, total: int, checkpointed: bool):
        self.signum, self.task, self.updates, self.total, self.checkpointed = signum, task, updates, total, checkpointed
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after update {updates} of {total} of task "
                         f"{task!r}")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM outside training (loading, evaluation). Not a KeyboardInterrupt: typer would turn
    that into its own exit."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


def requested() -> int:
    """The signal received by this process (0: none)."""
    return _state["requested"]


def agree(stop: bool) -> None:
    """The ranks' decision for the update just done (from the update's reduction)."""
    _state["agreed"] = stop


def agreed() -> bool:
    return _state["agreed"]


def _record(signum: int, frame) -> None:
    if _state["requested"] == signum == signal.SIGINT:  # a second Ctrl-C: what it does without us (a
        # repeated SIGTERM waits: torchrun forwards the one it gets to workers that already got it)
        signal.signal(signum, _previous.get(signum, signal.SIG_DFL))
        os.kill(os.getpid(), signum)
        return
    _state["requested"] = signum


_previous: dict[int, object] = {}


@contextmanager
def catching() -> Iterator[None]:
    """Record SIGTERM and SIGINT for the block (main thread only; elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _previous.update({s: signal.getsignal(s) or signal.SIG_DFL for s in SIGNALS})  # None: set outside Python
    for s in SIGNALS:
        signal.signal(s, _record)
    try:
        yield
    finally:
        for s in SIGNALS:
            signal.signal(s, _previous[s])


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def interrupt_raises() -> None:
    """Ctrl-C and SIGTERM raise `Interrupted` outside training (the CLI says what is kept and exits 130/143)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise_interrupted)
