"""`cl-flat eval`: reload a finished run's adapter stack in order and evaluate every task again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cl_flat import dist
from cl_flat.data import load_tasks
from cl_flat.data.fingerprints import data_changes
from cl_flat.errors import DataError
from cl_flat.evaluate import evaluate_tasks
from cl_flat.models import load_run_model
from cl_flat.rundir import RunDir
from cl_flat.rundir.checks import require_adapters, require_run


@dataclass(frozen=True)
class Reevaluation:
    tasks: list[str]
    scores: list[float]   # every task, with the stack after the last trained task
    saved: list[float]    # the last row of the saved acc_matrix.csv


def reevaluate(path: Path) -> Reevaluation:
    """Check the run (complete, its last stack's adapters saved), then reload that stack and score every task."""
    run = require_run(RunDir(path))
    require_adapters(run, run.trained[-1:])
    config = run.config
    changed = data_changes(run.run_dir.stored_meta(), config)
    if changed:
        raise DataError(f"{run.run_dir.path}: a data file changed since the run was trained (the scores would "
                        "not compare): " + "; ".join(changed))
    dist.init_distributed()
    tasks = load_tasks(config)
    model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
    stack = run.run_dir.load_stack(model, config, run.trained[-1])
    device = dist.device()
    stack.model.to(device)
    scores = evaluate_tasks(stack.model, tokenizer, tasks, config.evaluation, config.training.max_seq_length,
                            config.run.seed, device)
    return Reevaluation(run.trained, scores, run.matrix[-1])
