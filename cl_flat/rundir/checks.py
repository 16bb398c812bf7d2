"""The checks a command runs once, before it loads a model or writes a file, on the saved run it reads
(`cl-flat eval`, `cl-flat landscape`): a cl-flat run folder of the results format this code reads, an
acc_matrix.csv with a row per trained task, the tasks named by --task/--after, the adapters it will load.
Malformed input is a ConfigError (exit 2) naming the file (file:line) or the flag."""

from __future__ import annotations

from dataclasses import dataclass

from cl_flat import __version__
from cl_flat.config import RunConfig
from cl_flat.errors import MatrixFormatError, UserError
from cl_flat.matrix_csv import read_acc_matrix
from cl_flat.metrics import Matrix
from cl_flat.rundir.adapter_check import adapter_problems
from cl_flat.rundir.layout import RunDir


@dataclass(frozen=True)
class CheckedRun:
    """A saved run that passed `require_run`: what the checks read, for the command to use."""

    run_dir: RunDir
    config: RunConfig
    trained: list[str]     # the tasks with a row in acc_matrix.csv, in order
    matrix: Matrix         # their rows

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.config.tasks]


def _check_format(run_dir: RunDir, document) -> None:
    meta = (document.get("meta") if isinstance(document, dict) else None) or {}
    found = meta.get("results_format", 1) if isinstance(meta, dict) else "unknown"
    if str(found).split(".")[0] != str(RunDir.RESULTS_FORMAT):
        versions = meta.get("versions") if isinstance(meta, dict) else None
        written_by = versions.get("cl_flat", "?") if isinstance(versions, dict) else "?"
        run_dir.refuse(f"{run_dir.config_path}: results format {found} (written by cl-flat {written_by}); this "
                         f"cl-flat {__version__} reads format {RunDir.RESULTS_FORMAT}: use the cl-flat version "
                         "that wrote it, or train the run again")


def _check_tasks(run_dir: RunDir, names: list[str], trained: list[str], task: str | None, after: str | None) -> None:
    """--task/--after name trained tasks, --after the task itself or a later one."""
    flags = {"--task": task, "--after": after}
    run_dir.refuse(*(f"{flag} {name!r}: unknown task; the run's tasks are {names}" if name not in names
                       else f"{flag} {name!r}: not trained yet (trained: {trained})"
                       for flag, name in flags.items() if name is not None and name not in trained),
            kind="options for run")
    if task is not None and after is not None and names.index(after) < names.index(task):
        raise UserError(f"--after {after!r} comes before --task {task!r} in the sequence {names}; "
                        "--after must be the task itself or a later one")


def require_run(run_dir: RunDir, *, complete: bool = True, task: str | None = None,
                after: str | None = None) -> CheckedRun:
    """Check the folder: a cl-flat run folder of the results format this code reads (config.yaml read
    once), an acc_matrix.csv with a row per trained task (every task if `complete`), and `task`/`after`
    (the --task/--after flags) naming trained tasks in that order."""
    document = run_dir.read_document()
    _check_format(run_dir, document)
    config = run_dir.config_of(document)
    names = [t.name for t in config.tasks]
    if not run_dir.matrix_path.is_file():
        run_dir.refuse(f"{run_dir.matrix_path}: missing: no task was evaluated yet")
    try:
        columns, rows, _ = read_acc_matrix(run_dir.matrix_path, allow_partial=not complete)
    except MatrixFormatError as exc:
        run_dir.refuse(str(exc))
    if columns != names:
        run_dir.refuse(f"{run_dir.matrix_path}:1: tasks {columns} differ from {run_dir.config_path.name}'s {names}")
    trained = names[:len(rows)]
    if not trained:
        run_dir.refuse(f"{run_dir.matrix_path}: no task trained yet")
    _check_tasks(run_dir, names, trained, task, after)
    return CheckedRun(run_dir, config, trained, rows)


def require_adapters(run: CheckedRun, stacks: list[str]) -> None:
    """Check that the adapters of the stack after each task in `stacks` are saved and read back."""
    folders = dict.fromkeys(folder for upto in stacks for _, folder in run.run_dir.adapter_dirs(run.config, upto))
    run.run_dir.refuse(*(f"{folder}: the adapter of task {folder.name!r} is missing ("
                           + (f"no {RunDir.ADAPTER_WEIGHTS})" if folder.is_dir() else "no such folder)")
                           for folder in folders if not (folder / RunDir.ADAPTER_WEIGHTS).is_file()))
    run.run_dir.refuse(*adapter_problems(list(folders), run.config.lora.r))
