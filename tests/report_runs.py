"""Hand-made result folders for the `cl-flat report` tests (unit and integration): 2 methods × 3 seeds
with hand-chosen scores and their metrics worked out by hand."""

from __future__ import annotations

from pathlib import Path

from cl_flat.config import validate_config
from cl_flat.rundir import RunDir

SEQUENCE = ("food_sentiment", "service_sentiment")
SAM = {"method": "sam", "rho": 0.05}

# Hand-chosen accuracy matrices, T = 2 (zero_shot, after task 1, after task 2), and their metrics by hand:
# AA = (R21 + R22)/2, BWT = R21 − R11, F = R11 − R21, FWT = R12 − b2, OP = [R11, AA], AIA = (R11 + AA)/2.
ZERO_SHOT = [50.0, 40.0]
RUNS = {
    ("none", 1): ([80, 45], [60, 80], {"AA": 70, "BWT": -20, "FWT": 5, "F": 20, "AIA": 75, "OP": [80, 70]}),
    ("none", 2): ([82, 46], [64, 80], {"AA": 72, "BWT": -18, "FWT": 6, "F": 18, "AIA": 77, "OP": [82, 72]}),
    ("none", 3): ([84, 47], [70, 84], {"AA": 77, "BWT": -14, "FWT": 7, "F": 14, "AIA": 80.5, "OP": [84, 77]}),
    ("sam", 1): ([81, 44], [71, 81], {"AA": 76, "BWT": -10, "FWT": 4, "F": 10, "AIA": 78.5, "OP": [81, 76]}),
    ("sam", 2): ([83, 46], [75, 81], {"AA": 78, "BWT": -8, "FWT": 6, "F": 8, "AIA": 80.5, "OP": [83, 78]}),
    ("sam", 3): ([85, 50], [77, 85], {"AA": 81, "BWT": -8, "FWT": 10, "F": 8, "AIA": 83, "OP": [85, 81]}),
}


def make_run(root: Path, name: str, seed: int, flatness: dict, rows: list[list[float]] | None,
             metrics: dict | None, tasks: tuple[str, ...] = SEQUENCE, task_fields: dict | None = None,
             first_task: dict | None = None, zero_shot: list[float] | None = None) -> Path:
    """A result folder as cl-flat writes it (RunDir.save_config / write_matrix / write_metrics); `task_fields`
    are added to every task's config (e.g. a prompt_template), `first_task` to the first one's."""
    raw = {"run": {"name": name, "output_dir": str(root), "seed": seed},
           "model": {"name_or_path": "tiny-random:llama"},
           "tasks": [{"name": task, "source": "builtin", **(task_fields or {}),
                      **((first_task or {}) if i == 0 else {})} for i, task in enumerate(tasks)],
           "flatness": flatness, "logging": {"progress": False}}
    config = validate_config(raw)
    run = RunDir.of(config)
    run.save_config(config, {"world_size": 1, "git_commit": f"commit-of-{name}"})
    if rows is not None:
        run.write_matrix(list(tasks), [("zero_shot", zero_shot or ZERO_SHOT)] + list(zip(tasks, rows)))
    if metrics is not None:
        run.write_metrics(metrics)
    return run.path


def make_results(root: Path) -> Path:
    """Every run of RUNS under `root`, named `<method>-s<seed>`."""
    for (method, seed), (after_1, after_2, metrics) in RUNS.items():
        make_run(root, f"{method}-s{seed}", seed, SAM if method == "sam" else {"method": "none"},
                 [after_1, after_2], metrics)
    return root
