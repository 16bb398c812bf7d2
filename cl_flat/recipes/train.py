"""`cl-flat train`: for each task: add adapter -> train -> save -> evaluate every task (`run_sequence`).

The results folder (`RunDir`) is written as the run goes: config.yaml first, acc_matrix.csv
after every task (completed tasks are never lost; with `probes:`, probe_matrix.csv just before it),
each task's adapter, train_log.jsonl, the plots and, last, metrics.json, whose presence marks a
complete run. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cl_flat import dist, plots
from cl_flat.adapters import AdapterStack
from cl_flat.checkpoint import TaskCheckpoints
from cl_flat.config import RunConfig
from cl_flat.data.plan import TrainTask
from cl_flat.landscape import LandscapeOptions, compute_sharpness, landscape_stem
from cl_flat.metrics import ZERO_SHOT, Rows, compute_metrics, probe_metrics
from cl_flat.progress import announce, duration
from cl_flat.recipes.skeleton import Skeleton, Unit
from cl_flat.rundir import RunDir
from cl_flat.rundir.resume import restart, skipped_updates, truncate_log
from cl_flat.strategies import build_strategies
from cl_flat.tracking import WANDB_RUN_ID, new_wandb_run_id

PLOTS = ("acc_matrix", "op_curve", "learning_curves")  # the figures a run draws; also logged to wandb


@dataclass(frozen=True)
class SequenceResult:
    run_dir: RunDir
    tasks: list[str]
    rows: Rows                 # (after_task, scores): zero_shot first, then one row per task
    metrics: dict[str, Any]
    probes: list[str] = dataclasses.field(default_factory=list)  # the probes' names (`probes:`)
    probe_rows: Rows = dataclasses.field(default_factory=list)   # their scores, rows as `rows`


def _record_flatness(config: RunConfig, run_dir: RunDir, stack: AdapterStack, tokenizer, tasks, index: int) -> None:
    """Flatness (sharpness and the Hessian's λ_max and trace, `compute_sharpness`) of the solution just
    trained (collective: every rank calls it), saved under landscape/sharpness.json keyed by task, like
    `cl-flat landscape`. With evaluation.sharpness_every_task also every earlier task's, on its own
    adapter in the current stack (key `<task>_after_<current>`), and sharpness_matrix.csv rewritten."""
    evaluation, names = config.evaluation, [t.name for t in tasks]
    strategies = build_strategies(config)
    earlier = range(index) if evaluation.sharpness_every_task else range(0)
    shown = dist.is_main() and config.logging.progress
    for i in [index, *earlier]:
        # minutes on a CPU (about a dozen updates' worth) with nothing else to show meanwhile
        announce(shown, f"flatness of {names[i]} after {names[index]}: sharpness"
                        f"{', Hessian' if evaluation.hessian_iters or evaluation.hessian_probes else ''} "
                        f"on {evaluation.landscape_samples()} held-out examples ...")
        start = time.perf_counter()
        record = compute_sharpness(stack.model, tokenizer, tasks[i], strategies.adapter_name(names[i]), evaluation,
                                   max_length=config.training.max_seq_length, seed=config.run.seed,
                                   options=LandscapeOptions(after=names[index]))
        announce(shown, f"flatness of {names[i]} after {names[index]}: done in {duration(time.perf_counter() - start)}")
        if dist.is_main():
            run_dir.merge_sharpness(landscape_stem(names[i], names[index], evaluation.sharpness_space), record)
    if evaluation.sharpness_every_task and dist.is_main():
        space = evaluation.sharpness_space
        run_dir.write_sharpness_matrix([(after, task, landscape_stem(task, after, space))
                                        for t, after in enumerate(names[:index + 1]) for task in names[:t + 1]], space)


class Sequence(Skeleton):
    """The task sequence on one adapter stack: a row of the accuracy matrix after every task."""

    def __init__(self, config: RunConfig, resume: bool, allow_config_change: bool, overwrite: bool = False):
        super().__init__(config)
        self.resume, self.allow_config_change, self.overwrite = resume, allow_config_change, overwrite
        self.rows: Rows = []
        self.probe_rows: Rows = []  # the probes' scores, one row per row of `rows`
        self.skipped: dict[str, int] = {}  # per task, the updates dropped as non-finite

    def accept(self) -> None:
        self.restart = restart(self.run_dir, self.config, self.resume, self.allow_config_change, self.overwrite)
        self.done = self.restart.done

    def loaded(self) -> None:
        if self.overwrite:  # only now: a config or data error leaves the old run as it was
            if dist.is_main():
                self.run_dir.clear()
            dist.barrier()  # before any rank writes its log into the folder

    def checkpoints(self, index: int) -> TaskCheckpoints:
        return TaskCheckpoints(self.run_dir.checkpoint_dir(self.names[index]),
                               self.config.task_training(index).checkpoint_every)

    def meta(self) -> dict[str, Any]:
        # one wandb run for the whole sequence, however often it is resumed
        meta = {WANDB_RUN_ID: self.restart.meta.get(WANDB_RUN_ID) or new_wandb_run_id()}
        if not self.resume:
            return meta
        # the changes accepted by earlier resumes are kept, this one's appended
        changes = list(self.restart.meta.get("config_changes") or [])
        if self.restart.changes:
            changes.append({"before_task": self.names[self.done] if self.done < len(self.names) else None,
                            "changes": self.restart.changes})
        return meta | {"config_changes": changes}

    def opened(self) -> None:
        # the log first: a malformed one is refused (DataError) before anything else of the folder changes
        in_flight = self.done < len(self.names)
        restarts = bool(self.restart.changes) and in_flight  # the in-flight task restarts under the new config
        if self.resume:
            kept = self.checkpoints(self.done).latest() if in_flight and not restarts else 0  # its saved updates
            self.records = truncate_log(self.run_dir, self.done, kept)
            self.skipped = skipped_updates([r for r in self.records if r["task_index"] < self.done], self.names)
        if restarts:
            self.checkpoints(self.done).remove()

    @property
    def probe_names(self) -> list[str]:
        return [probe.name for probe in self.probes]

    def _add_row(self, after: str, scores: list[float]) -> None:
        """`scores`: the tasks' then the probes' (one evaluation pass over `scored`)."""
        self.rows.append((after, scores[:len(self.names)]))
        if self.probes:
            self.probe_rows.append((after, scores[len(self.names):]))
        self.tracker.log_row(self.names, self.rows, self.probe_names, self.probe_rows)
        if dist.is_main():
            self.run_dir.write_matrix(self.names, self.rows, self.probe_names, self.probe_rows)

    @property
    def scored(self) -> list:
        """What every row scores: the tasks, then the probes."""
        return self.tasks + self.probes

    def zero_shot(self, model: torch.nn.Module) -> None:
        if self.done:
            self.rows.extend(self.restart.rows)
            self.probe_rows.extend(self.restart.probe_rows)
        else:
            self._add_row(ZERO_SHOT, self.evaluate(model, self.scored))

    def units(self, model: torch.nn.Module) -> Iterator[Unit]:
        config = self.config
        if self.done:
            stack = self.run_dir.load_stack(model, config, self.names[self.done - 1])
        else:
            stack = AdapterStack(model, config.lora, config.run.seed)
        strategies = build_strategies(config)
        for index, task in enumerate(self.tasks[self.done:], start=self.done):
            examples, replayed = strategies.training_set(self.tasks, index, self.tokenizer,
                                                         config.training.max_seq_length)
            strategies.begin_task(stack, index, task.name)
            yield Unit(stack, TrainTask(index, task.name, examples, self.tokenizer.pad_token_id, replayed),
                       self.methods[index], config.task_training(index), self.scored, self.checkpoints(index),
                       strategies.loss_terms(stack, index), functools.partial(strategies.end_task, stack, index,
                                                                              task.name))

    def record(self, unit: Unit, scores: list[float], stats: dict[str, float]) -> None:
        self.skipped[unit.task.name] = stats["skipped"]
        if self.config.evaluation.sharpness:  # before the row: a run stopped in between redoes both on resume
            _record_flatness(self.config, self.run_dir, unit.stack, self.tokenizer, self.tasks, unit.task.index)
        self._add_row(unit.task.name, scores)
        unit.checkpoints.remove()

    def finish(self) -> SequenceResult:
        is_main, names, rows, run_dir = dist.is_main(), self.names, self.rows, self.run_dir
        metrics = compute_metrics([r for _, r in rows[1:]], rows[0][1])
        metrics["skipped_updates"] = {name: self.skipped.get(name, 0) for name in names} if is_main else None
        if self.config.evaluation.sharpness:
            metrics["sharpness"] = run_dir.saved_sharpness(names) if is_main else None
        if self.probes:  # never part of AA, BWT, ...: they are computed on `rows` alone
            metrics |= probe_metrics(self.probe_names, self.probe_rows[0][1], [r for _, r in self.probe_rows[1:]])
        if is_main:
            about = plots.about_run(self.config)
            plots.draw_acc_matrix(names, rows, run_dir.plot("acc_matrix"), about)
            plots.draw_op_curve(names, rows, run_dir.plot("op_curve"), about)
            plots.draw_learning_curves(self.records, run_dir.plot("learning_curves"), str(run_dir.log_path), about)
            run_dir.write_metrics(metrics | {"tasks": names})
        self.tracker.log_results(names, rows, metrics, {name: run_dir.plot(name) for name in PLOTS},
                                 self.probe_names, self.probe_rows)
        return SequenceResult(run_dir, names, rows, metrics, self.probe_names, self.probe_rows)


def run_sequence(config: RunConfig, resume: bool = False, allow_config_change: bool = False,
                 overwrite: bool = False) -> SequenceResult:
    """Train and evaluate the sequence. With `resume`, tasks whose adapter and matrix row are
    saved are reloaded, not retrained, and the in-flight task continues from its newest in-task
    checkpoint; all randomness is keyed by (seed, task, update), so the final matrix equals that
    of an uninterrupted run. `allow_config_change`: resume although the config differs (the
    changes are recorded in meta.config_changes; the in-flight task restarts from its start). `overwrite`:
    a fresh start in a folder that holds a run, whose files are removed once the config, data and model
    are loaded."""
    return Sequence(config, resume, allow_config_change, overwrite).run()
