"""CL strategies: one registered class per `lora.strategy` (inclora, seqlora, olora, each in its own
file with its config class), plus the composable ones the config turns on (replay).

A new strategy is one file: a config class extending `cl_flat.config.LoraSection` with
`strategy: Literal["name"]` (and its own keys), and an `AdapterStrategy` subclass decorated with
`@cl_flat.strategies.register("name", ConfigClass)` overriding the hooks it changes
(`cl_flat.strategies.base`). A module of this package is found without an import list; an outside
one through the entry-point group `cl_flat.strategies` (`cl_flat.registry`). The `lora` block then
accepts `strategy: name` and its keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from cl_flat.adapters import AdapterStack
from cl_flat.config import RunConfig
from cl_flat.data import TaskData
from cl_flat.data.batches import Encoded, encode_examples
from cl_flat.registry import STRATEGIES
from cl_flat.strategies.base import AdapterStrategy, Groups, LossTerms, Strategy
from cl_flat.strategies.replay import Replay

register = STRATEGIES.register
COMPOSABLE: tuple[type[Strategy], ...] = (Replay,)  # strategies a run adds when its config enables them


class SummedTerms:
    """The loss terms of several strategies as one regulariser: their sum, their stats merged."""

    def __init__(self, parts: Sequence[LossTerms]):
        self.parts = tuple(parts)

    def __call__(self, module=None):
        total = self.parts[0](module)
        for part in self.parts[1:]:
            total = total + part(module)
        return total

    def stats(self):
        return {k: v for part in self.parts for k, v in part.stats().items()}


class RunStrategies:
    """A run's strategies: its `lora.strategy`, then the enabled composable ones; every hook calls
    them in that order."""

    def __init__(self, adapters: AdapterStrategy, others: Sequence[Strategy] = ()):
        self.adapters = adapters
        self.parts: tuple[Strategy, ...] = (adapters, *others)

    def adapter_name(self, task_name: str) -> str:
        return self.adapters.adapter_name(task_name)

    def saved_adapters(self, task_names: Sequence[str], upto: str) -> list[tuple[str, str]]:
        return self.adapters.saved_adapters(task_names, upto)

    def training_groups(self, tasks: Sequence[TaskData], index: int) -> Groups:
        """Task `index`'s training examples, each group with the task whose prompt it takes (its own first)."""
        groups = [(tasks[index], tasks[index].train)]
        for part in self.parts:
            groups = part.training_examples(tasks, index, groups)
        return groups

    def training_set(self, tasks: Sequence[TaskData], index: int, tokenizer,
                     max_length: int) -> tuple[list[Encoded], int]:
        """Task `index`'s tokenised training set and how many of it come from other tasks (replayed).
        Encoded when the task's turn comes, so tasks restored on resume are never tokenised."""
        groups = self.training_groups(tasks, index)
        encoded = [encode_examples(task, tokenizer, examples, max_length) for task, examples in groups]
        return [e for group in encoded for e in group], sum(len(group) for group in encoded[1:])

    def begin_task(self, stack: AdapterStack, index: int, task_name: str) -> None:
        for part in self.parts:
            part.begin_task(stack, index, task_name)

    def loss_terms(self, stack: AdapterStack, index: int) -> LossTerms | None:
        terms = [t for part in self.parts if (t := part.loss_terms(stack, index)) is not None]
        return None if not terms else terms[0] if len(terms) == 1 else SummedTerms(terms)

    def end_task(self, stack: AdapterStack, index: int, task_name: str) -> None:
        for part in self.parts:
            part.end_task(stack, index, task_name)


def build_strategies(config: RunConfig) -> RunStrategies:
    """The run's strategies: the registered `lora.strategy` and every composable one its config enables."""
    adapters = STRATEGIES.get(config.lora.strategy).cls(config)
    return RunStrategies(adapters, [cls(config) for cls in COMPOSABLE if cls.enabled(config)])


__all__ = ["COMPOSABLE", "AdapterStrategy", "LossTerms", "RunStrategies", "Strategy", "SummedTerms",
           "build_strategies", "register"]
