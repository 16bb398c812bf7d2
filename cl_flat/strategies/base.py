"""The CL-strategy interface: what a continual-learning strategy may decide, as explicit hooks.

A run's strategies are its `lora.strategy` (an `AdapterStrategy`, registered in
`cl_flat.registry.STRATEGIES` with its config class, the `lora` block) and the composable ones the
config turns on (experience replay). `cl_flat.strategies.RunStrategies` calls each hook on every
strategy of the run, in that order:

    config time   check(raw, chosen)          problems of the raw config (every registered strategy)
                  task_config                 the class of a task's own `tasks[i].lora` block, if any
                  enabled(config)             whether a composable strategy takes part in the run
    per task      training_examples(...)      the task's training set: data mixing (replay)
                  begin_task(stack, i, name)  adapter construction: which adapter trains, which are frozen
                  loss_terms(stack, i)        a regulariser added to every pass, with its logged stats
                  end_task(stack, i, name)    after training, before the adapter is saved and evaluated
    adapters      adapter_name(task)          the adapter a task trains (adapters/<task>/ holds it)
                  saved_adapters(names, upto) which saved adapters make the stack after task `upto` (resume)

Every hook but the two adapter ones (an AdapterStrategy's) has a neutral default, so a strategy
overrides only what it changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from cl_flat.adapters import AdapterStack
from cl_flat.config import RunConfig
from cl_flat.data import Example, TaskData

# (task, examples): examples trained with that task's prompt; a task's training set is a list of groups
Groups = list[tuple[TaskData, Sequence[Example]]]


class LossTerms(Protocol):
    """A regulariser: `terms(module)` is added to the loss of every pass (a perturbed pass sees the
    perturbed weights); `stats()` are logged per update (0-dim tensors, fetched with the update's values)."""

    def __call__(self, module: nn.Module | None = None) -> torch.Tensor: ...

    def stats(self) -> dict[str, torch.Tensor]: ...


class Strategy(ABC):
    """One CL strategy of a run, built from the run's config."""

    name: ClassVar[str]
    config_class: ClassVar[type[BaseModel]]
    # the class of a task's own `tasks[i].lora` block under this strategy (its fields are keys of the `lora`
    # block a task may set for itself: merged onto the run's values when the config is read); None: none
    task_config: ClassVar[type[BaseModel] | None] = None

    def __init__(self, config: RunConfig):
        self.config = config

    @classmethod
    def enabled(cls, config: RunConfig) -> bool:
        """Whether a composable strategy (`cl_flat.strategies.COMPOSABLE`) takes part in this run; the
        `lora.strategy` always does."""
        return True

    @classmethod
    def check(cls, raw: dict[str, Any], chosen: Any) -> list[str]:
        """Problems of the raw config (a dict, before validation, so they are reported with the schema's
        errors) under this strategy's rules. Called for every registered strategy, the run's or not
        (`chosen` is the run's lora.strategy): a strategy's keys may appear in a config that chose
        another (a task's O-LoRA λ under inclora), and only their strategy knows them."""
        return []

    def training_examples(self, tasks: Sequence[TaskData], index: int, groups: Groups) -> Groups:
        """Task `index`'s training set: `groups` (the task's own examples first, then what the strategies
        before this one added), with this strategy's changes. Default: unchanged."""
        return groups

    def begin_task(self, stack: AdapterStack, index: int, task_name: str) -> None:
        """Before task `index` trains: set up the adapter stack (its trainable set is what the task trains)."""

    def loss_terms(self, stack: AdapterStack, index: int) -> LossTerms | None:
        """The regulariser task `index` trains with (after `begin_task`); None: none."""
        return None

    def end_task(self, stack: AdapterStack, index: int, task_name: str) -> None:
        """After task `index` trained, before its adapter is saved and every task evaluated."""


class AdapterStrategy(Strategy):
    """A `lora.strategy`: which adapter each task trains on the frozen base model. Every adapter of the
    stack stays active; only the one the task trains is trainable (AdapterStack keeps that invariant).
    Each task's trained adapter is saved in adapters/<task>/."""

    @abstractmethod
    def adapter_name(self, task_name: str) -> str:
        """The adapter task `task_name` trains (and that adapters/<task_name>/ holds)."""

    @abstractmethod
    def saved_adapters(self, task_names: Sequence[str], upto: str) -> list[tuple[str, str]]:
        """(adapter, task whose adapters/<task>/ folder holds it) of the stack right after task `upto`
        was trained, in load order (resume and `cl-flat eval` rebuild the stack from them)."""

    def begin_task(self, stack: AdapterStack, index: int, task_name: str) -> None:
        """A new adapter (or the existing one of that name, made trainable); the others frozen, all active."""
        stack.add_task(index, self.adapter_name(task_name))

    def end_task(self, stack: AdapterStack, index: int, task_name: str) -> None:
        stack.check_trainable()  # training changed nothing of the frozen set
