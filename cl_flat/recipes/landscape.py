"""`cl-flat landscape`: the loss landscapes and sharpness of a saved run's tasks, each measured on the
run's adapter stack as it was right after `--after` (default: the task itself) was trained, and written to
the run's folder: landscape/<stem>_{1d,2d}.csv, plots/landscape_<stem>_*.png, landscape/sharpness.json
(the measuring: `cl_flat.landscape`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cl_flat import dist, plots
from cl_flat.config import RunConfig, with_evaluation_overrides
from cl_flat.data import load_task
from cl_flat.landscape import LandscapeOptions, held_out_batches, landscape_stem, measure_landscape, resolved
from cl_flat.models import load_run_model
from cl_flat.rundir import RunDir
from cl_flat.rundir.checks import CheckedRun, require_adapters, require_run
from cl_flat.rundir.lock import held
from cl_flat.strategies import build_strategies


@dataclass(frozen=True)
class LandscapeResult:
    stem: str
    csv: Path
    png: Path
    sharpness_json: Path
    loss: float                     # L(θ), unperturbed
    grid: list[float]               # the loss at every grid point, in csv order
    sharpness: dict[str, Any]       # the sharpness.json record
    passes: dict[str, int]          # passes over the held-out sample: forward, forward_backward
    examples: int                   # held-out examples
    seconds: float


def resolve_tasks(run: CheckedRun, task: str | None, after: str | None) -> list[str]:
    """The tasks to measure, in order: `task`, or every trained task up to `after` (flags checked by
    `require_run`)."""
    if task is not None:
        return [task]
    limit = run.names.index(after) if after is not None else len(run.names)
    return [t for t in run.trained if run.names.index(t) <= limit]


class _BaseModel:
    """The run's base model, loaded once; every adapter stack is built on a deep copy of it."""

    def __init__(self, config: RunConfig):
        self.config = config
        self._loaded = None

    def stack(self, run_dir: RunDir, after: str):
        if self._loaded is None:
            self._loaded = load_run_model(self.config.model, self.config.deepspeed, self.config.run.seed)
        base, tokenizer = self._loaded
        return run_dir.load_stack(copy.deepcopy(base), self.config, after).model, tokenizer


def _landscape(run: CheckedRun, base: _BaseModel, task: str, options: LandscapeOptions,
               progress: bool) -> LandscapeResult:
    """One task's landscape on a checked run: measured, then written, under the run folder's lock (a
    train of the same run writes its adapters and sharpness.json)."""
    with held(run.run_dir.path, "cl-flat landscape") as lock:
        lock.claim()  # its input was checked before: it writes
        return _measured(run, base, task, options, progress)


def _measured(run: CheckedRun, base: _BaseModel, task: str, options: LandscapeOptions,
              progress: bool) -> LandscapeResult:
    started = time.perf_counter()
    config, run_dir = run.config, run.run_dir
    options = resolved(options.model_copy(update={"task": task}), config.evaluation)
    after = options.after or task
    model, tokenizer = base.stack(run_dir, after)
    task_data = load_task(next(t for t in config.tasks if t.name == task), config.run.seed, config.evaluation.metric)
    device = dist.device()
    model.to(device)
    batches = held_out_batches(task_data, tokenizer, config.evaluation, max_length=config.training.max_seq_length,
                               seed=config.run.seed, split=options.split, max_samples=options.max_samples,
                               device=device, rank=0, world=1)
    surface = measure_landscape(model, batches, task, build_strategies(config).adapter_name(task), options,
                                seed=config.run.seed, after=after, progress=progress)
    stem = landscape_stem(task, after, options.space, options.direction)
    csv_path = run_dir.write_landscape(stem, surface.coords, surface.losses)
    png_path = run_dir.plot(f"landscape_{stem}_{options.dims}d")
    (plots.plot_landscape_1d if options.dims == 1 else plots.plot_landscape_2d)(csv_path, png_path,
                                                                                 plots.about_run(config))
    json_path = run_dir.merge_sharpness(landscape_stem(task, after, options.space), surface.sharpness)
    return LandscapeResult(stem, csv_path, png_path, json_path, surface.loss, surface.losses, surface.sharpness,
                           surface.passes, surface.examples, time.perf_counter() - started)


def compute_landscape(path: str | Path, task: str, options: LandscapeOptions | None = None, *,
                      progress: bool = True) -> LandscapeResult:
    """Loss landscape and sharpness of `task` with the run's adapter stack as it was right after
    `options.after` (default: `task` itself) was trained; writes the csv, the PNG and the sharpness
    entry. Directions are keyed by (run seed, task, space)."""
    options = options or LandscapeOptions()
    run = require_run(RunDir(path), complete=False, task=task, after=options.after)
    require_adapters(run, [options.after or task])
    return _landscape(run, _BaseModel(run.config), task, options, progress)


def landscapes(path: str | Path, options: LandscapeOptions, *, progress: bool | None = None,
               overrides: Sequence[str] = ()) -> Iterator[LandscapeResult]:
    """`cl-flat landscape`: every requested task's landscape (`options.task`, or every trained task up
    to `options.after`), one after another on one loaded base model; the run is checked first, once.
    `progress`: default logging.progress; `overrides`: --set evaluation.* on the run's config (e.g. the
    Hessian's hessian_iters, hessian_probes)."""
    run = require_run(RunDir(path), complete=False, task=options.task, after=options.after)
    run = replace(run, config=with_evaluation_overrides(run.config, list(overrides), "cl-flat landscape"))
    names = resolve_tasks(run, options.task, options.after)
    require_adapters(run, [options.after or name for name in names])
    base = _BaseModel(run.config)
    show = run.config.logging.progress if progress is None else progress
    return (_landscape(run, base, name, options, show) for name in names)
