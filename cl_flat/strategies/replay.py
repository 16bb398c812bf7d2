"""Experience replay (`replay: {examples_per_task: N}`, 0 = off), composed with any `lora.strategy`:
a fixed sample of N training examples of every earlier task is mixed into each later task's training
set (shuffled with it, each example keeping its own task's prompt). The sample is keyed by the run
seed and the task's name, so a resumed run replays the same examples; `train_log.jsonl` records
`replayed_examples` per update."""

from __future__ import annotations

from collections.abc import Sequence

from cl_flat.config import ReplaySection, RunConfig
from cl_flat.data import Example, TaskData
from cl_flat.data.sources import subsample
from cl_flat.strategies.base import Groups, Strategy


def replay_examples(earlier: Sequence[TaskData], per_task: int, seed: int) -> tuple[Example, ...]:
    """Experience replay's memory for the next task: a fixed sample of `per_task` training examples
    of every earlier task (keyed by seed and task name, so a resumed run replays the same)."""
    if not per_task:
        return ()
    return tuple(e for task in earlier for e in subsample(task.train, per_task, seed, "replay", task.name))


class Replay(Strategy):
    """Mixes a replayed sample of every earlier task into the task's training set."""

    name = "replay"
    config_class = ReplaySection

    @classmethod
    def enabled(cls, config: RunConfig) -> bool:
        return config.replay.examples_per_task > 0

    def training_examples(self, tasks: Sequence[TaskData], index: int, groups: Groups) -> Groups:
        per_task, seed = self.config.replay.examples_per_task, self.config.run.seed
        return groups + [(earlier, replay_examples([earlier], per_task, seed)) for earlier in tasks[:index]]
