"""The one skeleton every training recipe runs (`cl-flat train`, and its `--reference per_task|joint`):

    init → accept the folder → prepare (methods, data, model) → config.yaml → tracker → zero-shot →
    per unit: stack, train, save the adapter, evaluate → results

`Skeleton.run` holds the order; a recipe (`recipes.train.Sequence`, `recipes.reference.Reference`)
gives the steps that differ: which folder it accepts, its meta, the units it trains (each an adapter
stack, its task's examples, method and settings, the tasks it is scored on) and what it records.
Only rank 0 writes (but each rank its logs/rank<k>.log).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cl_flat import dist, stopping
from cl_flat.adapters import AdapterStack
from cl_flat.checkpoint import TaskCheckpoints
from cl_flat.config import RunConfig, TrainingSection
from cl_flat.data import TaskData, load_tasks
from cl_flat.data.fingerprints import META_KEY, fingerprints
from cl_flat.data.plan import BatchShape, TaskPlan, TrainTask
from cl_flat.errors import ConfigError, UserError
from cl_flat.evaluate import evaluate_tasks
from cl_flat.family import family_of, lora_targets
from cl_flat.flatness import FlatnessMethod, build_method
from cl_flat.models import check_chat_templates, check_target_modules, load_run_model, run_precision
from cl_flat.progress import announce, training_bars
from cl_flat.rank_log import RankLog
from cl_flat.rundir import RunDir
from cl_flat.rundir.lock import held
from cl_flat.seeding import deterministic_kernels
from cl_flat.strategies import LossTerms, build_strategies
from cl_flat.tracking import Tracker
from cl_flat.train import train_task


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
            "results_format": RunDir.RESULTS_FORMAT, META_KEY: fingerprints(config),
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


def check_output_dir(config: RunConfig, source: str = "config") -> None:
    """run.output_dir and the run's folder must be folders where they exist (not files)."""
    folder = RunDir.of(config).path
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(source, [f"run.output_dir: {path} is a file, not a folder"])


def check_batches(config: RunConfig, tasks: list[TaskData], world: int, source: str = "config") -> None:
    """Each task's training set (replayed examples included) fills at least one global batch
    (`TaskPlan.for_task`'s rule)."""
    problems, strategies = [], build_strategies(config)
    for index, task in enumerate(tasks):
        examples = sum(len(group) for _, group in strategies.training_groups(tasks, index))
        try:
            TaskPlan.for_task(config.task_training(index), examples, world, task.name)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(source, problems)


def prepare(config: RunConfig):
    """Everything that can fail on bad input, before any file is written (the results folder's place is
    checked before its lock is taken): each task's method and its checks, every task's data and its
    batches, the model, its target modules and chat template. Returns (methods, one per task; tasks; model;
    tokenizer)."""
    methods = task_methods(config)
    tasks = load_tasks(config)
    check_batches(config, tasks, dist.world_size())
    announce(dist.is_main() and config.logging.progress, f"loading {config.model.name_or_path} ...")
    model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
    check_chat_templates(config, tokenizer)
    check_target_modules(config.lora.target_modules, {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()},
                         family_of(model))
    return methods, tasks, model, tokenizer


def load_probes(config: RunConfig) -> list[TaskData]:
    """The data of every probe (`probes:`: tasks scored but never trained), in order."""
    return load_tasks(config.model_copy(update={"tasks": config.probes})) if config.probes else []


@dataclass(frozen=True)
class Unit:
    """One adapter a recipe trains: its stack (the adapter current), what the loop trains it on, and the
    tasks its score is measured on."""

    stack: AdapterStack
    task: TrainTask
    method: FlatnessMethod
    training: TrainingSection
    scored_on: list[TaskData]
    checkpoints: TaskCheckpoints | None = None
    regulariser: LossTerms | None = None  # the strategies' loss terms (O-LoRA's)
    end_task: Callable[[], None] | None = None  # after training (the strategies' end_task); default: check the stack


class Skeleton:
    """The skeleton (module docstring). The steps a recipe overrides are the methods above `run`."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.run_dir = RunDir.of(config)
        self.records: list[dict[str, Any]] = []  # train_log.jsonl's lines of this run, in order

    # ---------------------------------------------------------------- the steps a recipe gives

    def accept(self) -> None:
        """Check the results folder before anything is loaded (an error if the folder is in use)."""

    def loaded(self) -> None:
        """After the data and model are loaded, before anything is written (every rank)."""

    def meta(self) -> dict[str, Any]:
        """What the recipe adds to config.yaml's meta (rank 0)."""
        return {}

    def opened(self) -> None:
        """Once the folder is accepted, before config.yaml is saved (rank 0); an error here leaves the
        folder as it was."""

    def zero_shot(self, model: torch.nn.Module) -> None:
        """Before the first unit: the base model's scores."""

    def units(self, model: torch.nn.Module) -> Iterator[Unit]:
        raise NotImplementedError

    def record(self, unit: Unit, scores: list[float], stats: dict[str, float]) -> None:
        """The unit's scores on `unit.scored_on` and `train_task`'s stats, right after it was trained."""

    def finish(self) -> Any:
        """The results, once every unit is trained (inside the tracker); returned by `run`."""

    # ---------------------------------------------------------------- the skeleton

    def run(self) -> Any:
        rank_log = RankLog().start()  # console output held in memory until the folder is accepted
        dist.init_distributed(self.config.deepspeed.timeout_minutes)
        if os.environ.get("CL_FLAT_DETERMINISTIC") == "1":
            deterministic_kernels()
        check_output_dir(self.config)  # the lock's file goes into that folder
        with held(self.run_dir.path, "cl-flat train") as self.lock:  # before the folder is read: one writer
            return self._run(rank_log)

    def _run(self, rank_log: RankLog) -> Any:
        self.accept()
        self.methods, self.tasks, model, self.tokenizer = prepare(self.config)
        self.probes = load_probes(self.config)  # bad probe data, too, before anything is written
        self.loaded()
        rank_log.attach(self.run_dir.rank_log(dist.rank()), dist.rank(), dist.world_size())  # input accepted
        self.device = dist.device()
        model.to(self.device)
        self.names = [t.name for t in self.tasks]
        meta = self._save_config(model)
        with Tracker(self.config, self.run_dir.log_path, active=dist.is_main(), meta=meta) as self.tracker:
            self.zero_shot(model)
            with training_bars(dist.is_main() and self.config.logging.progress) as bars:
                for unit in self.units(model):
                    stats = self._train(unit, bars)
                    self.record(unit, self.evaluate(unit.stack.model, unit.scored_on, f"after {unit.task.name}"),
                                stats)
            result = self.finish()
        dist.barrier()
        return result

    def _save_config(self, model: torch.nn.Module) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if dist.is_main():
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            meta = run_metadata(self.config, model) | self.meta()
            self.opened()  # first: what it refuses (a malformed log) leaves the folder as it was
            self.lock.claim()  # the folder is accepted: from here on this run writes it
            self.run_dir.save_config(self.config, meta)
        return meta

    def _train(self, unit: Unit, bars) -> dict[str, float]:
        """Train the unit's adapter and save it; `train_task`'s stats."""
        with stopping.catching():  # SIGTERM/SIGINT: stop after the update in flight, checkpointed
            stats = train_task(unit.task, unit.stack.model, unit.method, unit.training, self.config.deepspeed,
                               self.config.run.seed, self.log_update, bars, unit.checkpoints, unit.regulariser)
        (unit.end_task or unit.stack.check_trainable)()
        if dist.is_main():
            unit.stack.save_current(self.run_dir.adapter_dir(unit.task.name))
        return stats

    def log_update(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.tracker.log_update(record)

    def evaluate(self, model: torch.nn.Module, tasks: list[TaskData], after: str = "zero-shot") -> list[float]:
        config = self.config
        shown = dist.is_main() and config.logging.progress
        return evaluate_tasks(model, tokenizer=self.tokenizer, tasks=tasks, section=config.evaluation,
                              max_length=config.training.max_seq_length, seed=config.run.seed, device=self.device,
                              progress=f"evaluate {len(tasks)} task(s), {after}" if shown else None)
