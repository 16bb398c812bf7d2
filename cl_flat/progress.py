"""The console progress bars (rich), off unless asked for: the one home of their setup."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class TrainingBars:
    """One bar per task of a training run, with the fields the loop reports (loss, updates per second)."""

    def __init__(self, progress):
        self.progress = progress

    def add_task(self, name: str, total: int):
        return self.progress.add_task(name, total=total, loss=float("nan"), rate=0.0)

    def update(self, bar, **fields):
        self.progress.update(bar, **fields)


@contextmanager
def training_bars(enabled: bool) -> Iterator[TrainingBars | None]:
    """The bars `train.train_task` advances (None when not `enabled`); they stay on screen."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} upd/s"),
                  TimeRemainingColumn(), transient=False) as progress:
        yield TrainingBars(progress)


@contextmanager
def counter(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A bar of `total` steps, gone once done; yields the function that advances it (a no-op when not
    `enabled`)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda: progress.advance(bar)
