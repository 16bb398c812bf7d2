"""acc_matrix.csv and probe_matrix.csv, the results folder's score matrices as files (a results contract).

acc_matrix.csv: header `after_task,<task_1>,...,<task_T>`; an optional `zero_shot` row; then one row per
trained task in header order; scores in percent, an empty cell where nothing was measured (the zero-shot
row and above the diagonal only). probe_matrix.csv has the same rows over the run's probes. Readers name
`path:line` in every error (MatrixFormatError); writers replace the file atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

from cl_flat.errors import MatrixFormatError
from cl_flat.files import atomic_write_text
from cl_flat.metrics import ZERO_SHOT, Matrix, Rows, Score, score

HEADER_FIRST = "after_task"


def _parse_cell(text: str, where: str, column: str) -> Score:
    s = text.strip()
    if s == "":
        return None
    try:
        x = float(s)
    except ValueError:
        raise MatrixFormatError(f"{where}: column {column!r}: expected a number or an empty "
                                f"cell, got {s!r}") from None
    if math.isnan(x):
        return None
    if math.isinf(x):
        raise MatrixFormatError(f"{where}: column {column!r}: expected a finite number, got {s!r}")
    if not 0 <= x <= 100:  # scores are percentages; anything else is not a cl-flat matrix
        raise MatrixFormatError(f"{where}: column {column!r}: a score must lie in [0, 100], got {s!r}")
    return x


def _csv_records(path: str) -> tuple[list[tuple[int, list[str]]], int]:
    """The non-blank rows of a csv file with their line numbers, and the file's last line number."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MatrixFormatError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")  # utf-8-sig: tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise MatrixFormatError(f"{path}:{line}: not UTF-8 text") from None
    records: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for row in reader:
            if not row or all(c.strip() == "" for c in row):
                continue  # blank lines (e.g. trailing newline) carry no data
            records.append((reader.line_num, row))
    except csv.Error as exc:
        raise MatrixFormatError(f"{path}:{max(reader.line_num, 1)}: {exc}") from None
    return records, reader.line_num


def _header_tasks(path: str, line: int, header: list[str]) -> list[str]:
    """The task names of the header `after_task,<task_1>,...,<task_T>`."""
    header = [c.strip() for c in header]
    if header[0] != HEADER_FIRST:
        raise MatrixFormatError(f"{path}:{line}: expected header starting with "
                                f"'{HEADER_FIRST}', got {header[0]!r}")
    tasks = header[1:]
    if not tasks:
        raise MatrixFormatError(f"{path}:{line}: header lists no tasks; expected "
                                f"'{HEADER_FIRST},<task_1>,...,<task_T>'")
    for j, name in enumerate(tasks):
        if name == "":
            raise MatrixFormatError(f"{path}:{line}: empty task name in header column {j + 2}")
        if name == ZERO_SHOT:
            raise MatrixFormatError(f"{path}:{line}: '{ZERO_SHOT}' is reserved and cannot be a task name")
        if name in tasks[:j]:
            raise MatrixFormatError(f"{path}:{line}: duplicate task name {name!r} in header")
    return tasks


def _score_rows(path: str, tasks: list[str], records: list[tuple[int, list[str]]]
                ) -> tuple[Matrix, list[Score] | None]:
    """(the trained rows, the zero_shot row or None) of the records after the header."""
    T = len(tasks)
    zero_shot: list[Score] | None = None
    matrix: Matrix = []
    for k, (line, row) in enumerate(records):
        where = f"{path}:{line}"
        if len(row) != T + 1:
            raise MatrixFormatError(f"{where}: expected {T + 1} columns (after_task + {T} tasks), "
                                    f"got {len(row)}")
        name = row[0].strip()
        values = [_parse_cell(c, where, tasks[j]) for j, c in enumerate(row[1:])]
        if name == ZERO_SHOT:
            if k != 0:
                raise MatrixFormatError(f"{where}: the '{ZERO_SHOT}' row must be the first row "
                                        "after the header")
            zero_shot = values
            continue
        if len(matrix) >= T:
            raise MatrixFormatError(f"{where}: extra row {name!r}; expected exactly {T} trained "
                                    "rows, one per task")
        expected = tasks[len(matrix)]
        if name != expected:
            raise MatrixFormatError(f"{where}: expected row for task {expected!r} "
                                    f"(rows follow the header's task order), got {name!r}")
        empty = [task for task, v in zip(tasks[:len(matrix) + 1], values) if v is None]
        if empty:
            raise MatrixFormatError(f"{where}: no score for {', '.join(map(repr, empty))}; every task trained "
                                    "by then (on or below the diagonal) needs one")
        matrix.append(values)
    return matrix, zero_shot


def read_acc_matrix(path: str | os.PathLike[str], *, allow_partial: bool = False
                    ) -> tuple[list[str], Matrix, list[Score] | None]:
    """Parse acc_matrix.csv into (task_names, matrix T x T, zero_shot row or None).

    Format: header `after_task,<task_1>,...,<task_T>`; optional first row `zero_shot,...`;
    then exactly T rows, one per trained task in header order (first cell = task name).
    `allow_partial` accepts fewer rows (a run in progress; used by --resume).
    Empty cells are missing (None): allowed in the zero_shot row and above the diagonal only.
    Raises MatrixFormatError naming `path:line`.
    """
    path = os.fspath(path)
    records, last_line = _csv_records(path)
    if not records:
        raise MatrixFormatError(f"{path}:1: empty file; expected header "
                                f"'{HEADER_FIRST},<task_1>,...,<task_T>'")
    tasks = _header_tasks(path, *records[0])
    matrix, zero_shot = _score_rows(path, tasks, records[1:])
    if len(matrix) != len(tasks) and not allow_partial:
        raise MatrixFormatError(f"{path}:{last_line}: expected {len(tasks)} trained rows "
                                f"({', '.join(tasks)}), found {len(matrix)}; "
                                f"missing {', '.join(tasks[len(matrix):])}")
    return tasks, matrix, zero_shot


def read_probe_matrix(path: str | os.PathLike[str]) -> tuple[list[str], Rows]:
    """probe_matrix.csv as (probe names, rows (after_task, scores)): header `after_task,<probe_1>,...`, rows
    named as acc_matrix.csv's (zero_shot, then the trained tasks), any cell may be empty (None).
    Raises MatrixFormatError naming `path:line`."""
    path = os.fspath(path)
    records, _ = _csv_records(path)
    if not records:
        raise MatrixFormatError(f"{path}:1: empty file; expected header '{HEADER_FIRST},<probe_1>,...'")
    probes = _header_tasks(path, *records[0])
    rows: Rows = []
    for line, row in records[1:]:
        if len(row) != len(probes) + 1:
            raise MatrixFormatError(f"{path}:{line}: expected {len(probes) + 1} columns, got {len(row)}")
        rows.append((row[0].strip(), [_parse_cell(c, f"{path}:{line}", p) for p, c in zip(probes, row[1:])]))
    return probes, rows


def _format_cell(value: Any) -> str:
    v = score(value)
    if v is None:
        return ""
    if math.isinf(v):
        raise ValueError(f"cannot write non-finite score {v!r}")
    return repr(v)  # shortest text that round-trips exactly


def write_acc_matrix(path: str | os.PathLike[str], task_names: Sequence[str],
                     rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Write acc_matrix.csv atomically (temp file in the same dir, then os.replace).

    `rows` are (name, scores) pairs in file order: optionally ("zero_shot", b) first, then
    one row per trained task. A run in progress may write fewer rows than tasks; readers
    (read_acc_matrix) then reject it as incomplete. None/NaN is written as an empty cell.
    """
    path = os.fspath(path)
    names = list(task_names)
    lines: list[list[str]] = [[HEADER_FIRST, *names]]
    for name, values in rows:
        vals = list(values)
        if len(vals) != len(names):
            raise ValueError(f"row {name!r} has {len(vals)} scores; expected {len(names)} "
                             "(one per task)")
        lines.append([name, *(_format_cell(v) for v in vals)])

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    atomic_write_text(path, buffer.getvalue())
