"""`cl-flat metrics`: the forgetting metrics of a saved accuracy matrix, with reference runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cl_flat.errors import ConfigError, MatrixFormatError
from cl_flat.matrix_csv import read_acc_matrix
from cl_flat.metrics import REFERENCE_MEASURES, compute_metrics
from cl_flat.rundir import RunDir


def matrix_metrics(matrix: Path, per_task_reference: Path | None = None,
                   joint_reference: Path | None = None) -> dict[str, Any]:
    """AA, BWT, FWT, F, AIA, OP of an acc_matrix.csv; FWT_alone and gap_joint against reference runs."""
    if not matrix.is_file():
        problem = "a folder, not a csv file" if matrix.is_dir() else "file not found"
        raise ConfigError(str(matrix), [f"{matrix}: {problem}"], kind="accuracy matrix")
    try:
        names, rows, zero_shot = read_acc_matrix(matrix)
    except MatrixFormatError as exc:
        raise ConfigError(str(matrix), [str(exc)], kind="accuracy matrix") from None
    result = compute_metrics(rows, zero_shot)
    for kind, folder in (("per_task", per_task_reference), ("joint", joint_reference)):
        key, measure = REFERENCE_MEASURES[kind]
        if folder is not None:
            tasks, scores = RunDir(folder).read_reference(kind)
            if tasks != names:
                raise ConfigError(str(folder), [f"{folder}: tasks {tasks} differ from {matrix}'s {names}"],
                                  kind="reference run")
            result[key] = measure(rows, scores)
    return result
