"""`cl-flat eval`: reload a finished run's adapter stacks and score its tasks again.

- `reevaluate`: the stack after the last task, every task and probe, the run's own settings; compared with
  the last row of acc_matrix.csv and probe_matrix.csv (a reproduction check).
- `rescore`: any rows (`zero_shot` and the stack after each trained task), any tasks, another metric,
  sample cap or evaluation setting (researchers train with the fast `accuracy` on a sample and score
  `exact_match` on the full test sets afterwards); written to eval/<name>.csv in acc_matrix.csv's format
  (+ eval/<name>.json with the settings and, for a full matrix, the forgetting metrics), never touching
  acc_matrix.csv or metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from cl_flat import dist
from cl_flat.config import Metric, RunConfig, Strict, config_to_dict, validate_options, with_evaluation_overrides
from cl_flat.data import load_tasks
from cl_flat.data.fingerprints import data_changes
from cl_flat.errors import ConfigError, DataError
from cl_flat.evaluate import evaluate_tasks
from cl_flat.files import atomic_write_text
from cl_flat.matrix_csv import write_acc_matrix
from cl_flat.metrics import ZERO_SHOT, compute_metrics
from cl_flat.models import load_run_model
from cl_flat.recipes.skeleton import load_probes
from cl_flat.rundir import RunDir
from cl_flat.rundir.checks import CheckedRun, require_adapters, require_run


@dataclass(frozen=True)
class Reevaluation:
    tasks: list[str]      # the tasks, then the probes
    scores: list[float]   # every task and probe, with the stack after the last trained task
    saved: list[float]    # the last row of the saved acc_matrix.csv, then of probe_matrix.csv


def _checked(path: Path) -> CheckedRun:
    run = require_run(RunDir(path))
    changed = data_changes(run.run_dir.stored_meta(), run.config)
    if changed:
        raise DataError(f"{run.run_dir.path}: a data file changed since the run was trained (the scores would "
                        "not compare): " + "; ".join(changed))
    return run


def _scores(run: CheckedRun, config: RunConfig, after: str, tasks) -> list[float]:
    """The scores of `tasks` with the base model (`after` = zero_shot) or the stack right after task `after`."""
    model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
    if after != ZERO_SHOT:
        model = run.run_dir.load_stack(model, config, after).model
    device = dist.device()
    model.to(device)
    shown = dist.is_main() and config.logging.progress
    return evaluate_tasks(model, tokenizer, tasks, config.evaluation, config.training.max_seq_length,
                          config.run.seed, device, progress=f"evaluate {after}" if shown else None)


def reevaluate(path: Path) -> Reevaluation:
    """Check the run (complete, its last stack's adapters saved), then reload that stack and score every task."""
    run = _checked(path)
    require_adapters(run, run.trained[-1:])
    probes = [probe.name for probe in run.config.probes]
    saved = run.matrix[-1]
    if probes:  # the probes' last row too, where the run saved one
        saved = saved + run.run_dir.restored_probe_rows(probes, run.trained[-1:])[0][1]
    dist.init_distributed()
    scores = _scores(run, run.config, run.trained[-1], load_tasks(run.config) + load_probes(run.config))
    return Reevaluation(run.trained + probes, scores, saved)


class RescoreOptions(Strict):
    metric: Metric | None = None  # default: the run's evaluation.metric (a task's own metric stays)
    max_samples: int | Literal["all"] | None = None  # default: the run's evaluation.max_samples_per_task
    tasks: list[str] | None = None  # default: every task of the sequence; probes (`probes:`) when named
    after: list[str] | None = None  # default: zero_shot and every trained task (the whole matrix)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

    @field_validator("max_samples")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("expected a number ≥ 1 or 'all'")
        return value


RESCORE_FLAGS = {"metric": "--metric", "max_samples": "--max-samples", "tasks": "--tasks", "after": "--after",
                 "name": "--name"}


@dataclass(frozen=True)
class Rescore:
    tasks: list[str]
    metric: str  # what the rows hold (RunConfig.metric_label)
    rows: list[tuple[str, list[float]]]
    metrics: dict[str, Any] | None  # the forgetting metrics, when every row and task was scored
    csv: Path
    record: Path


def rescore_config(config: RunConfig, options: RescoreOptions, overrides: list[str]) -> RunConfig:
    """The run's config with `--set evaluation.*` overrides, then --metric and --max-samples, applied."""
    config = with_evaluation_overrides(config, overrides, "cl-flat eval")
    changes: dict[str, Any] = {}
    if options.metric is not None:
        changes["metric"] = options.metric
    if options.max_samples is not None:
        changes["max_samples_per_task"] = None if options.max_samples == "all" else options.max_samples
    return config.model_copy(update={"evaluation": config.evaluation.model_copy(update=changes)})


def _chosen(given: list[str] | None, allowed: list[str], flag: str, what: str) -> list[str]:
    if given is None:
        return allowed
    unknown = [name for name in given if name not in allowed]
    if unknown:
        raise ConfigError("cl-flat eval", [f"{flag}: {', '.join(map(repr, unknown))} not among the {what} "
                                           f"{allowed}"], kind="options")
    return [name for name in allowed if name in given]  # in the run's order


def rescore(path: Path, values: dict[str, Any], overrides: list[str]) -> Rescore:
    """Score the chosen rows × tasks again under the chosen settings; write eval/<name>.{csv,json} (rank 0)."""
    options = validate_options(RescoreOptions, values, "cl-flat eval", RESCORE_FLAGS)
    run = _checked(path)
    config = rescore_config(run.config, options, overrides)
    names = [task.name for task in config.tasks]
    probes = [probe.name for probe in config.probes]  # scored only when --tasks names them
    tasks = names if options.tasks is None else _chosen(options.tasks, names + probes, "--tasks",
                                                        "run's tasks" + (" and probes" if probes else ""))
    rows = _chosen(options.after, [ZERO_SHOT, *run.trained], "--after", "rows (zero_shot and trained tasks)")
    require_adapters(run, [row for row in rows if row != ZERO_SHOT])
    cap = config.evaluation.max_samples_per_task
    name = options.name or f"{config.evaluation.metric}-{'all' if cap is None else cap}"
    dist.init_distributed()
    data = [task for task in load_tasks(config) + load_probes(config) if task.name in tasks]
    scored = [(row, _scores(run, config, row, data)) for row in rows]
    whole = tasks == names and rows == [ZERO_SHOT, *names]  # a complete run's full matrix
    metrics = compute_metrics([s for _, s in scored[1:]], scored[0][1]) if whole else None
    folder = run.run_dir.path / "eval"
    csv_path, record_path = folder / f"{name}.csv", folder / f"{name}.json"
    if dist.is_main():
        folder.mkdir(exist_ok=True)
        write_acc_matrix(csv_path, tasks, scored)
        record = {"metric": config.evaluation.metric, "max_samples_per_task": cap, "tasks": tasks, "rows": rows,
                  "evaluation": config_to_dict(config)["evaluation"], "metrics": metrics}
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return Rescore(tasks, config.metric_label(), scored, metrics, csv_path, record_path)


def rescoring(values: dict[str, Any], overrides: list[str]) -> bool:
    """Whether `cl-flat eval` was asked to re-score (any option) rather than to check the last row."""
    return bool(overrides) or any(value is not None for value in values.values())

