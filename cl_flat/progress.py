"""Progress of long work, the one home of its setup: rich bars on a terminal, and without one (nohup, SLURM,
a log file) plain lines at most every PLAIN_EVERY seconds with counts, rate and ETA, so a log never sits
silent for minutes. `announce` says what is about to happen before a long step that shows no bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PLAIN_EVERY = 30.0  # seconds between two plain progress lines of one task


def on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def announce(enabled: bool, text: str) -> None:
    """One line on stderr before a long step (model loading, zero-shot evaluation, ...)."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """'45s', '3m05s', '2h07m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress:
    """Plain-line progress of one or more counted tasks: a line when a task starts, at most every `every`
    seconds while it runs, and when it completes. `unit` names what is counted; `fields` formats extra
    values (a loss) into the line."""

    def __init__(self, unit: str, every: float = PLAIN_EVERY, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] | None = None,
                 fields: Callable[[dict[str, Any]], str] = lambda values: ""):
        self.unit, self.every, self.clock, self.fields = unit, every, clock, fields
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: int, **values) -> int:
        key = len(self.tasks)
        now = self.clock()
        self.tasks[key] = {"description": description, "total": total, "done": 0, "started": now, "first": 0,
                           "last_line": now, "values": values}
        self.write(f"{description}: {total} {self.unit}")
        return key

    def update(self, key: int, advance: int = 0, completed: int | None = None, **values) -> None:
        """As rich's: `completed` sets the count (a resumed task's head start, left out of the rate)."""
        task = self.tasks[key]
        if completed is not None:
            task["done"] = task["first"] = completed
        task["done"] += advance
        task["values"].update(values)
        now = self.clock()
        complete = task["done"] >= task["total"]
        if complete or now - task["last_line"] >= self.every:
            task["last_line"] = now
            self.write(self._line(task, now, complete))

    def advance(self, key: int, steps: int = 1) -> None:
        self.update(key, advance=steps)

    def _line(self, task: dict[str, Any], now: float, complete: bool) -> str:
        elapsed = now - task["started"]
        counted = task["done"] - task["first"]
        rate = counted / elapsed if elapsed > 0 else 0.0
        extra = self.fields(task["values"])
        head = f"{task['description']}: {task['done']}/{task['total']} {self.unit}{extra}"
        if complete:
            return f"{head}, done in {duration(elapsed)}"
        eta = f", ETA {duration((task['total'] - task['done']) / rate)}" if rate > 0 else ""
        return f"{head}, {rate:.3g}/s{eta}"


class TrainingBars:
    """One bar per task of a training run, with the fields the loop reports (loss, updates per second)."""

    def __init__(self, progress):
        self.progress = progress

    def add_task(self, name: str, total: int):
        return self.progress.add_task(name, total=total, loss=float("nan"), rate=0.0)

    def update(self, bar, **fields):
        self.progress.update(bar, **fields)


def _loss_field(values: dict[str, Any]) -> str:
    loss = values.get("loss")
    return "" if loss is None or loss != loss else f", loss {loss:.4f}"


@contextmanager
def training_bars(enabled: bool) -> Iterator[TrainingBars | None]:
    """The bars `train.train_task` advances (None when not `enabled`); they stay on screen. Without a
    terminal: plain lines (`PlainProgress`)."""
    if not enabled:
        yield None
        return
    if not on_terminal():
        yield TrainingBars(PlainProgress("updates", fields=_loss_field))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} upd/s"),
                  TimeRemainingColumn(), transient=False) as progress:
        yield TrainingBars(progress)


@contextmanager
def counter(enabled: bool, description: str, total: int, unit: str = "steps") -> Iterator[Callable[..., None]]:
    """A bar of `total` steps, gone once done (without a terminal: plain lines); yields the function that
    advances it by one or by its argument (a no-op when not `enabled`)."""
    if not enabled:
        yield lambda steps=1: None
        return
    if not on_terminal():
        plain = PlainProgress(unit)
        key = plain.add_task(description, total)
        yield lambda steps=1: plain.advance(key, steps)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda steps=1: progress.advance(bar, steps)
