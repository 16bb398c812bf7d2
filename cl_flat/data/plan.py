"""How a task's training examples become updates: the batch shape, the task's plan of updates, and each
rank's micro-batches of an update.

Data order: each epoch is a permutation drawn from a generator keyed by (seed, task index, epoch); update u
takes the u-th global batch of micro_batch_size × N × world examples (N = gradient_accumulation_steps) and
rank r takes its r-th contiguous share. Incomplete global batches are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_flat.config import TrainingSection
from cl_flat.data.batches import Encoded, collate
from cl_flat.errors import UserError
from cl_flat.seeding import keyed_generator


@dataclass(frozen=True)
class BatchShape:
    """One update's examples: micro_batch_size per micro-batch, `accumulation` micro-batches per rank."""

    micro_batch_size: int
    accumulation: int
    world: int

    @classmethod
    def of(cls, training: TrainingSection, world: int) -> BatchShape:
        return cls(training.micro_batch_size, training.gradient_accumulation_steps, world)

    @property
    def global_batch(self) -> int:
        """Examples per update over all ranks."""
        return self.micro_batch_size * self.accumulation * self.world


@dataclass(frozen=True)
class TaskPlan:
    """How one task is cut into updates."""

    batch: BatchShape
    updates: int
    updates_per_epoch: int

    @classmethod
    def for_task(cls, training: TrainingSection, n_examples: int, world: int, task_name: str) -> TaskPlan:
        batch = BatchShape.of(training, world)
        per_epoch = n_examples // batch.global_batch
        if per_epoch == 0:
            raise UserError(f"tasks[{task_name}]: {n_examples} training examples are fewer than one global batch "
                            f"({batch.micro_batch_size} × {batch.accumulation} accumulation × {world} ranks)")
        return cls(batch, training.max_steps or training.epochs * per_epoch, per_epoch)


@dataclass(frozen=True)
class TrainTask:
    """One task of the sequence as the loop sees it."""

    index: int                 # 0-based position in the sequence
    name: str
    examples: list[Encoded]    # tokenised training examples (the replayed ones of earlier tasks included)
    pad_id: int
    replayed: int = 0          # how many of `examples` are replayed from earlier tasks


def window_batches(task: TrainTask, plan: TaskPlan, update: int, seed: int, rank: int,
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Rank `rank`'s micro-batches of update `update` (see the module docstring)."""
    epoch, position = divmod(update, plan.updates_per_epoch)
    order = torch.randperm(len(task.examples), generator=keyed_generator(seed, "data", task.index, epoch))
    mbs, n = plan.batch.micro_batch_size, plan.batch.accumulation
    start = position * plan.batch.global_batch + rank * mbs * n
    mine = order[start:start + mbs * n].tolist()
    return [{k: v.to(device) for k, v in collate([task.examples[i] for i in mine[j * mbs:(j + 1) * mbs]],
                                                 task.pad_id).items()}
            for j in range(n)]
