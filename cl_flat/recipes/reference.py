"""Reference runs that bound a sequence's metrics (`cl-flat train CONFIG --reference per_task|joint`).

- `per_task` (PerTaskFT): every task trains its own fresh adapter on the base model alone, with the
  adapter seed, data order and settings it has in the sequence (so task 1's adapter is the
  sequence's first); P_i = its score on task i. `cl-flat metrics --per-task-reference` compares a
  sequence's R[i,i] with P_i (forward transfer against learning the task alone).
- `joint` (multi-task learning, the usual upper bound): one adapter trained on the union of all
  tasks' training data (each example with its own task's prompt), shuffled, with the run-level
  training settings; J_i = its score on task i. `--joint-reference` gives the gap mean_i J_i − AA.
Results go to results/<run.name>-<kind>/: config.yaml (meta.reference = kind), reference.csv
(rows zero_shot and <kind>), train_log.jsonl, adapters/, logs/, and metrics.json written last.
The run goes through the sequence's skeleton (`recipes.skeleton`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cl_flat import dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import RunConfig
from cl_flat.data.batches import encode_examples
from cl_flat.data.plan import TrainTask
from cl_flat.errors import UserError
from cl_flat.metrics import REFERENCE_MEASURES
from cl_flat.models import load_run_model
from cl_flat.recipes.skeleton import Skeleton, Unit
from cl_flat.rundir import RunDir

KINDS = tuple(REFERENCE_MEASURES)  # per_task, joint


@dataclass(frozen=True)
class ReferenceResult:
    run_dir: RunDir
    kind: str
    tasks: list[str]
    zero_shot: list[float]
    scores: list[float]   # score of each task under its reference adapter


class Reference(Skeleton):
    """A reference run of the config's sequence, in results/<run.name>-<kind>/ (module docstring)."""

    def __init__(self, config: RunConfig, kind: str):
        if kind not in KINDS:
            raise UserError(f"--reference: expected one of {list(KINDS)}, got {kind!r}")
        super().__init__(config.model_copy(update={"run": config.run.model_copy(
            update={"name": f"{config.run.name}-{kind}"})}))
        self.kind = kind
        self.zero_shot_scores: list[float] = []
        self.scores: list[float] = []

    def accept(self) -> None:
        if self.run_dir.metrics_path.exists() or self.run_dir.reference_path.exists():
            raise UserError(f"{self.run_dir} already holds a {self.kind} reference; choose another run.name")

    def meta(self) -> dict[str, Any]:
        return {"reference": self.kind}

    def zero_shot(self, model: torch.nn.Module) -> None:
        self.zero_shot_scores = self.evaluate(model, self.tasks)

    def _unit(self, base: torch.nn.Module, index: int, name: str, examples: list, scored_on: list) -> Unit:
        """A fresh adapter on `base` alone."""
        config = self.config
        stack = AdapterStack(base.to(self.device), config.lora, config.run.seed)
        stack.add_task(index, name)
        training = config.training if self.kind == "joint" else config.task_training(index)
        return Unit(stack, TrainTask(index, name, examples, self.tokenizer.pad_token_id), self.methods[index],
                    training, scored_on)

    def units(self, model: torch.nn.Module) -> Iterator[Unit]:
        config, length = self.config, self.config.training.max_seq_length
        if self.kind == "joint":
            examples = [e for task in self.tasks for e in encode_examples(task, self.tokenizer, task.train, length)]
            yield self._unit(model, 0, "joint", examples, self.tasks)
            return
        for index, task in enumerate(self.tasks):
            base = model if index == 0 else load_run_model(config.model, config.deepspeed, config.run.seed)[0]
            examples = encode_examples(task, self.tokenizer, task.train, length)
            yield self._unit(base, index, task.name, examples, [task])

    def record(self, unit: Unit, scores: list[float], stats: dict[str, float]) -> None:
        self.scores += scores

    def finish(self) -> ReferenceResult:
        if dist.is_main():
            self.run_dir.write_reference(self.kind, self.names, self.zero_shot_scores, self.scores)
        self.tracker.log_summary({"reference_mean": sum(self.scores) / len(self.scores)})
        return ReferenceResult(self.run_dir, self.kind, self.names, self.zero_shot_scores, self.scores)


def run_reference(config: RunConfig, kind: str) -> ReferenceResult:
    """Train and evaluate the `kind` reference of the config's sequence (module docstring)."""
    return Reference(config, kind).run()
