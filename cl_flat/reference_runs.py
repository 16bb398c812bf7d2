"""Reference runs that bound a sequence's metrics (`cl-flat train CONFIG --reference per_task|joint`).

- `per_task` (PerTaskFT): every task trains its own fresh adapter on the base model alone, with the
  adapter seed, data order and settings it has in the sequence (so task 1's adapter is the
  sequence's first); P_i = its score on task i. `cl-flat metrics --per-task-reference` compares a
  sequence's R[i,i] with P_i (forward transfer against learning the task alone).
- `joint` (multi-task learning, the usual upper bound): one adapter trained on the union of all
  tasks' training data (each example with its own task's prompt), shuffled, with the run-level
  training settings; J_i = its score on task i. `--joint-reference` gives the gap mean_i J_i − AA.
Results go to results/<run.name>-<kind>/: config.yaml (meta.reference = kind), reference.csv
(rows zero_shot and <kind>), train_log.jsonl, adapters/, and metrics.json written last.
"""

from __future__ import annotations

from dataclasses import dataclass

from cl_flat import dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import RunConfig
from cl_flat.data.batches import encode_examples
from cl_flat.errors import UserError
from cl_flat.evaluate import evaluate_tasks
from cl_flat.metrics import REFERENCE_MEASURES
from cl_flat.models import load_run_model
from cl_flat.run import prepare, run_metadata
from cl_flat.rundir import RunDir
from cl_flat.tracking import Tracker
from cl_flat.train import TrainTask, train_task

KINDS = tuple(REFERENCE_MEASURES)  # per_task, joint


@dataclass(frozen=True)
class ReferenceResult:
    run_dir: RunDir
    kind: str
    tasks: list[str]
    zero_shot: list[float]
    scores: list[float]   # score of each task under its reference adapter


def run_reference(config: RunConfig, kind: str) -> ReferenceResult:
    """Train and evaluate the `kind` reference of the config's sequence (module docstring)."""
    if kind not in KINDS:
        raise UserError(f"--reference: expected one of {list(KINDS)}, got {kind!r}")
    config = config.model_copy(update={"run": config.run.model_copy(update={"name": f"{config.run.name}-{kind}"})})
    dist.init_distributed(config.deepspeed.timeout_minutes)
    run_dir = RunDir.of(config)
    if run_dir.metrics_path.exists() or run_dir.reference_path.exists():
        raise UserError(f"{run_dir} already holds a {kind} reference; choose another run.name")
    methods, tasks, model, tokenizer = prepare(config)
    device = dist.device()
    names = [t.name for t in tasks]
    if dist.is_main():
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.save_config(config, run_metadata(config, model) | {"reference": kind})
    length, seed = config.training.max_seq_length, config.run.seed

    def trained(base, index: int, name: str, examples, method, training, tracker) -> AdapterStack:
        stack = AdapterStack(base.to(device), config.lora, seed)
        stack.add_task(index, name)
        train_task(TrainTask(index, name, examples, tokenizer.pad_token_id), stack.model, method, training,
                   config.deepspeed, seed, tracker.log_update)
        if dist.is_main():
            stack.save_current(run_dir.adapter_dir(name))
        return stack

    with Tracker(config, run_dir.log_path, active=dist.is_main()) as tracker:
        zero_shot = evaluate_tasks(model.to(device), tokenizer, tasks, config.evaluation, length, seed, device)
        if kind == "joint":
            examples = [e for task in tasks for e in encode_examples(task, tokenizer, task.train, length)]
            stack = trained(model, 0, "joint", examples, methods[0], config.training, tracker)
            scores = evaluate_tasks(stack.model, tokenizer, tasks, config.evaluation, length, seed, device)
        else:
            scores = []
            for index, task in enumerate(tasks):
                base = model if index == 0 else load_run_model(config.model, config.deepspeed, seed)[0]
                stack = trained(base, index, task.name, encode_examples(task, tokenizer, task.train, length),
                                methods[index], config.task_training(index), tracker)
                scores += evaluate_tasks(stack.model, tokenizer, [task], config.evaluation, length, seed, device)
        if dist.is_main():
            run_dir.write_reference(kind, names, zero_shot, scores)
        tracker.log_summary({"reference_mean": sum(scores) / len(scores)})
    dist.barrier()
    return ReferenceResult(run_dir, kind, names, zero_shot, scores)
