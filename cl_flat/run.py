"""run_sequence(): for each task: add adapter -> train -> save -> evaluate every task.

The results folder (`RunDir`) is written as the run goes: config.yaml first, acc_matrix.csv
after every task (completed tasks are never lost), each task's adapter, train_log.jsonl, the
plots and, last, metrics.json, whose presence marks a complete run. Only rank 0 writes.
"""

from __future__ import annotations

import os
import platform
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cl_flat import dist, plots
from cl_flat.adapters import AdapterStack
from cl_flat.checkpoint import TaskCheckpoints
from cl_flat.config import RunConfig
from cl_flat.data import load_tasks
from cl_flat.errors import ConfigError, UserError
from cl_flat.evaluate import evaluate_tasks
from cl_flat.family import family_of, lora_targets
from cl_flat.flatness import FlatnessMethod, build_method
from cl_flat.landscape import compute_sharpness, landscape_stem
from cl_flat.metrics import ZERO_SHOT, compute_metrics
from cl_flat.models import check_target_modules, load_run_model, run_precision
from cl_flat.rundir import Rows, RunDir
from cl_flat.seeding import deterministic_kernels
from cl_flat.strategies import build_strategies
from cl_flat.tracking import RankLog, Tracker
from cl_flat.train import BatchShape, TrainTask, train_task

PLOTS = ("acc_matrix", "op_curve", "learning_curves")  # the figures a run draws; also logged to wandb


@dataclass(frozen=True)
class SequenceResult:
    run_dir: RunDir
    tasks: list[str]
    rows: Rows                 # (after_task, scores): zero_shot first, then one row per task
    metrics: dict[str, Any]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(config: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The "meta" block of config.yaml: what a rerun needs beyond the config, and what the config
    resolved to on `model` (the LoRA targets: the default q_proj, v_proj are q, v on T5)."""
    import deepspeed
    import peft
    import transformers

    from cl_flat import __version__

    world = dist.world_size()
    return {"world_size": world, "global_batch": BatchShape.of(config.training, world).global_batch,
            "evaluation_precision": run_precision(config.model, config.deepspeed),
            "lora_target_modules": lora_targets(config.lora.target_modules, family_of(model)),
            "results_format": RunDir.RESULTS_FORMAT,
            "versions": {"cl_flat": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "deepspeed": deepspeed.__version__},
            "git_commit": _git_commit()}


def task_methods(config: RunConfig, source: str = "config") -> list[FlatnessMethod]:
    """One flatness method per task (its own block or the run's), each checked under that task's
    training settings; a ConfigError lists every problem (at tasks.<i>. where the task has its own)."""
    methods, problems = [], []
    for index, task in enumerate(config.tasks):
        methods.append(build_method(config.task_flatness(index)))
        where = f"tasks.{index}." if task.flatness is not None or task.training is not None else ""
        problems += [where + p for p in methods[-1].check(config.task_training(index))]
    if problems:
        raise ConfigError(source, list(dict.fromkeys(problems)))
    return methods


def prepare(config: RunConfig):
    """Everything that can fail on bad input, before any file is written: each task's method and
    its checks, every task's data, the model and its target modules.
    Returns (methods, one per task; tasks; model; tokenizer)."""
    methods = task_methods(config)
    tasks = load_tasks(config)
    model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
    check_target_modules(config.lora.target_modules, {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()},
                         family_of(model))
    return methods, tasks, model, tokenizer


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} upd/s"),
                    TimeRemainingColumn(), transient=False)


class _Bars:
    """rich.Progress with the fields our columns expect."""

    def __init__(self, progress):
        self.progress = progress

    def add_task(self, name: str, total: int):
        return self.progress.add_task(name, total=total, loss=float("nan"), rate=0.0)

    def update(self, bar, **fields):
        self.progress.update(bar, **fields)


@dataclass(frozen=True)
class Restart:
    """Where a run starts: the saved rows it keeps and the config changes it accepted."""

    rows: Rows
    changes: list[str]


def _restart(run_dir: RunDir, config: RunConfig, resume: bool, allow_changes: bool) -> Restart:
    """Rank 0 reads the folder; every rank gets the same answer or the same error."""
    outcome: Restart | str = Restart([], [])
    if dist.is_main():
        try:
            rows = run_dir.completed_rows(config, resume, allow_changes)
            outcome = Restart(rows, run_dir.config_changes(config) if rows and allow_changes else [])
        except UserError as exc:
            outcome = str(exc)
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise UserError(outcome)
    return outcome


def _record_sharpness(config: RunConfig, run_dir: RunDir, stack: AdapterStack, tokenizer, task) -> None:
    """Sharpness of the solution just trained (collective: every rank calls it), saved under
    landscape/sharpness.json keyed by task, like `cl-flat landscape`."""
    record = compute_sharpness(stack.model, tokenizer, task, stack.current, config.evaluation,
                               max_length=config.training.max_seq_length, seed=config.run.seed)
    if dist.is_main():
        run_dir.merge_sharpness(landscape_stem(task.name, None, config.evaluation.sharpness_space), record)


def run_sequence(config: RunConfig, resume: bool = False, allow_config_change: bool = False) -> SequenceResult:
    """Train and evaluate the sequence. With `resume`, tasks whose adapter and matrix row are
    saved are reloaded, not retrained, and the in-flight task continues from its newest in-task
    checkpoint; all randomness is keyed by (seed, task, update), so the final matrix equals that
    of an uninterrupted run. `allow_config_change`: resume although the config differs (the
    changes are recorded in meta.config_changes; the in-flight task restarts from its start)."""
    rank_log = RankLog().start()  # console output held in memory until the folder is accepted
    dist.init_distributed(config.deepspeed.timeout_minutes)
    if os.environ.get("CL_FLAT_DETERMINISTIC") == "1":
        deterministic_kernels()
    is_main = dist.is_main()
    run_dir = RunDir.of(config)
    restart = _restart(run_dir, config, resume, allow_config_change)
    restored = restart.rows
    done = max(len(restored) - 1, 0)
    methods, tasks, model, tokenizer = prepare(config)
    rank_log.attach(run_dir.rank_log(dist.rank()), dist.rank(), dist.world_size())  # input accepted
    device = dist.device()
    model.to(device)
    names = [t.name for t in tasks]

    def checkpoints(index: int) -> TaskCheckpoints:
        return TaskCheckpoints(run_dir.checkpoint_dir(names[index]), config.task_training(index).checkpoint_every)

    meta: dict[str, Any] = {}
    if is_main:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        meta = run_metadata(config, model)
        if resume:  # the changes accepted by earlier resumes are kept, this one's appended
            meta["config_changes"] = run_dir.stored_meta().get("config_changes") or []
        if restart.changes:
            meta["config_changes"].append({"before_task": names[done] if done < len(names) else None,
                                           "changes": restart.changes})
            if done < len(names):
                checkpoints(done).remove()
        run_dir.save_config(config, meta)
        if resume:
            run_dir.truncate_log(done, checkpoints(done).latest() if done < len(names) else 0)
    rows: Rows = []

    def evaluate(model) -> list[float]:
        return evaluate_tasks(model, tokenizer, tasks, config.evaluation, config.training.max_seq_length,
                              config.run.seed, device)

    with Tracker(config, run_dir.log_path, active=is_main, meta=meta) as tracker:
        def record(after: str, scores: list[float]) -> None:
            rows.append((after, scores))
            tracker.log_row(names, rows)
            if is_main:
                run_dir.write_matrix(names, rows)

        if done:
            rows.extend(restored)
            stack = run_dir.load_stack(model, config, names[done - 1])
        else:
            record(ZERO_SHOT, evaluate(model))
            stack = AdapterStack(model, config.lora, config.run.seed)
        strategies = build_strategies(config)
        with _progress(is_main and config.logging.progress) as progress:
            bars = _Bars(progress) if progress is not None else None
            for index, task in enumerate(tasks[done:], start=done):
                examples, replayed = strategies.training_set(tasks, index, tokenizer, config.training.max_seq_length)
                strategies.begin_task(stack, index, task.name)
                terms = strategies.loss_terms(stack, index)
                train_task(TrainTask(index, task.name, examples, tokenizer.pad_token_id, replayed),
                           stack.model, methods[index], config.task_training(index), config.deepspeed, config.run.seed,
                           tracker.log_update, bars, checkpoints(index), terms)
                strategies.end_task(stack, index, task.name)
                if is_main:
                    stack.save_current(run_dir.adapter_dir(task.name))
                record(task.name, evaluate(stack.model))
                if config.evaluation.sharpness:
                    _record_sharpness(config, run_dir, stack, tokenizer, task)
                checkpoints(index).remove()
        metrics = compute_metrics([r for _, r in rows[1:]], rows[0][1])
        metrics["skipped_updates"] = run_dir.skipped_updates(names) if is_main else None
        if config.evaluation.sharpness:
            metrics["sharpness"] = run_dir.saved_sharpness(names) if is_main else None
        if is_main:
            plots.plot_acc_matrix(run_dir.matrix_path, run_dir.plot("acc_matrix"))
            plots.plot_op_curve(run_dir.matrix_path, run_dir.plot("op_curve"))
            plots.plot_learning_curves(run_dir.log_path, run_dir.plot("learning_curves"))
            run_dir.write_metrics(metrics | {"tasks": names})
        tracker.log_results(names, rows, metrics, {name: run_dir.plot(name) for name in PLOTS})
    dist.barrier()
    return SequenceResult(run_dir, names, rows, metrics)
