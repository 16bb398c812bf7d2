"""The runs `cl-flat report` reads: run folders found from the inputs (folders, folders of them, quoted
globs), each complete run or reference run loaded from its result files through RunDir (config.yaml,
acc_matrix.csv, metrics.json, landscape/sharpness.json; never a model), and each sequence matched with its
reference runs.

Flatness of a run (FLATNESS_MEASURES, each optional): task i's entry of landscape/sharpness.json (`<task>`,
else `<task>_merged`; metrics.json's "sharpness" when the file is absent) holds the flatness of the minimum
task i reached, measured right after training it. A run's `sharpness_avg`, `sharpness_worst`, `lambda_max`,
`trace` is the mean over its tasks of that entry's "avg", "worst", "lambda_max", "trace"; undefined (None)
unless every task has the field as a finite number.

Cost of a run (COST_MEASURE, optional): `seconds_per_update`, the median time of one training update, read
from train_log.jsonl: each record's "seconds" is the time since its task's update loop started in that
process, so two records of one task with steps s and s + 1 give one update's time; a resumed task restarts
the clock, and the median leaves out the odd difference across a restart. None without two such records."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_flat.config import config_to_dict
from cl_flat.errors import ConfigError, DataError, MatrixFormatError, UserError
from cl_flat.matrix_csv import read_acc_matrix
from cl_flat.metrics import METRICS, REFERENCE_MEASURES
from cl_flat.overrides import dotted_keys
from cl_flat.rundir import RunDir

# report measure -> the field of a sharpness.json entry it averages over tasks
FLATNESS_MEASURES = {"sharpness_avg": "avg", "sharpness_worst": "worst", "lambda_max": "lambda_max",
                     "trace": "trace"}
# report measure of the probes (`probes:`): metrics.json's mean_final_drift, the mean over probes of
# (last row − zero_shot); None for a run without probes
DRIFT_MEASURE = "final_drift"
# report measure of cost: the median seconds of one training update (train_log.jsonl); compared with the
# baseline as a ratio (TIME_RATIO), not a difference
COST_MEASURE = "seconds_per_update"
TIME_RATIO = "time_ratio"


def paired_differences(measures: Sequence[str]) -> tuple[str, ...]:
    """The measures a paired comparison takes as differences: all but the cost (a ratio, TIME_RATIO)."""
    return tuple(m for m in measures if m != COST_MEASURE)

RUN_IDENTITY_KEYS = frozenset({"run.seed", "run.name", "run.output_dir"})
finite_number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
PATH_OR_LOGGING_KEY = re.compile(r"logging\..*|(tasks|probes)\.\d+\.(train|test|data_files)(\..*)?")


class ReportInputError(UserError):
    """A path, option or result file `cl-flat report` cannot use: one message naming it, exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class RunResult:
    path: Path
    name: str                          # the folder name, made unique within the report
    seed: int
    settings: dict[str, Any]           # the resolved config, flattened to dotted keys
    tasks: tuple[str, ...]
    metrics: dict[str, float | None]   # METRICS (+ reference measures); None where undefined
    op: tuple[float, ...]              # OP_t, t = 1..T
    matrix: tuple[tuple[float | None, ...], ...] = ()  # R[t][i], the trained rows of acc_matrix.csv
    flatness: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # task -> field -> value

    @property
    def forgetting(self) -> dict[str, float]:
        """R[i,i] − R[T,i] of each task i < T with both scores (0-based rows: matrix[i][i] − matrix[T−1][i])."""
        last = self.matrix[-1] if self.matrix else ()
        return {task: self.matrix[i][i] - last[i] for i, task in enumerate(self.tasks[:-1])
                if self.matrix[i][i] is not None and last[i] is not None}


@dataclass(frozen=True)
class ReferenceRun:
    path: Path
    name: str
    kind: str                          # per_task | joint
    seed: int
    settings: dict[str, Any]
    tasks: tuple[str, ...]
    scores: tuple[float, ...]          # the score of each task under its reference adapter

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores)


def find_run_folders(inputs: Sequence[str]) -> list[Path]:
    """Run folders (those holding config.yaml) named by `inputs`, in order, each once. An input is a
    run folder, a folder of run folders, or a glob (its matches that are not runs are ignored)."""
    found: dict[Path, Path] = {}
    for text in inputs:
        if set("*?[") & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text)))
            if not matches:
                raise ReportInputError(f"{text}: matches no path")
            folders = [folder for match in matches for folder in _run_folders_in(Path(match), strict=False)]
            if not folders:
                raise ReportInputError(f"{text}: matches no cl-flat run folder (none holds a config.yaml)")
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise ReportInputError(f"{path}: no such file or folder")
            folders = _run_folders_in(path, strict=True)
        for folder in folders:
            found.setdefault(folder.resolve(), folder)
    return list(found.values())


def _run_folders_in(path: Path, strict: bool) -> list[Path]:
    if RunDir(path).config_path.is_file():
        return [path]
    inside = sorted(p for p in path.iterdir() if RunDir(p).config_path.is_file()) if path.is_dir() else []
    if not inside and strict:
        raise ReportInputError(f"{path}: not a cl-flat run folder (no config.yaml) and holds no run folders")
    return inside


def load_run(folder: Path, name: str) -> RunResult:
    """One complete run from its config.yaml, acc_matrix.csv and metrics.json."""
    run_dir = RunDir(folder)
    config = run_dir.load_config()  # an unreadable config.yaml is a ConfigError naming file:line
    if not run_dir.matrix_path.is_file():
        raise ReportInputError(f"{run_dir.matrix_path}: missing, though metrics.json marks the run complete")
    try:
        tasks, matrix, _ = read_acc_matrix(run_dir.matrix_path)
    except MatrixFormatError as exc:
        raise ReportInputError(str(exc)) from None
    configured = [task.name for task in config.tasks]
    if tasks != configured:
        raise ReportInputError(f"{run_dir.matrix_path}: tasks {sequence_label(tasks)} differ from those of "
                               f"{run_dir.config_path.name} ({sequence_label(configured)})")
    path = run_dir.metrics_path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc})") from None
    data = data if isinstance(data, dict) else {}
    for key in METRICS:
        nullable = key not in ("AA", "AIA")
        if key not in data or not (finite_number(data[key]) or (nullable and data[key] is None)):
            raise ReportInputError(f"{path}: {key} must be a finite number{' or null' if nullable else ''}, "
                                   + (f"got {data[key]!r}" if key in data else "but is missing"))
    op = data.get("OP")
    if not isinstance(op, list) or len(op) != len(tasks) or not all(finite_number(v) for v in op):
        raise ReportInputError(f"{path}: OP must be a list of {len(tasks)} finite numbers (one per task), "
                               f"got {op!r}")
    metrics = {key: None if data[key] is None else float(data[key]) for key in METRICS}
    flatness = _flatness(run_dir, tasks, data.get("sharpness"))
    for key, field_name in FLATNESS_MEASURES.items():
        values = [flatness.get(task, {}).get(field_name) for task in tasks]
        metrics[key] = None if any(v is None for v in values) else sum(values) / len(values)
    drift = data.get("mean_final_drift")
    metrics[DRIFT_MEASURE] = float(drift) if finite_number(drift) else None
    metrics[COST_MEASURE] = _seconds_per_update(run_dir)
    return RunResult(folder, name, config.run.seed, dotted_keys(config_to_dict(config)), tuple(tasks), metrics,
                     tuple(float(v) for v in op), tuple(tuple(row) for row in matrix), flatness)


def _flatness(run_dir: RunDir, tasks: list[str], in_metrics: Any) -> dict[str, dict[str, float]]:
    """task -> the finite numbers of its sharpness.json entry (see the module docstring); {} when none."""
    path = run_dir.sharpness_path
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportInputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(saved, dict):
            raise ReportInputError(f"{path}: expected an object of entries per task, got {type(saved).__name__}")
    else:
        saved = in_metrics if isinstance(in_metrics, dict) else {}
    found = {}
    for task in tasks:
        entry = saved.get(task, saved.get(f"{task}_merged"))
        if isinstance(entry, dict):
            found[task] = {key: float(value) for key, value in entry.items() if finite_number(value)}
    return found


def _seconds_per_update(run_dir: RunDir) -> float | None:
    """The median time of one update (module docstring); None without two consecutive records of a task."""
    try:
        records = [record for _, record in run_dir.logged_updates()]
    except DataError as exc:
        raise ReportInputError(str(exc)) from None
    times = [later["seconds"] - earlier["seconds"] for earlier, later in zip(records, records[1:])
             if later["task_index"] == earlier["task_index"] and later["step"] == earlier["step"] + 1
             and finite_number(earlier.get("seconds")) and finite_number(later.get("seconds"))]
    return statistics.median(times) if times else None


def is_reference(folder: Path) -> bool:
    return RunDir(folder).stored_meta().get("reference") is not None


def load_reference(folder: Path, name: str) -> ReferenceRun:
    """One finished reference run from its config.yaml and metrics.json (scores per task)."""
    run_dir = RunDir(folder)
    kind = run_dir.stored_meta()["reference"]
    if kind not in REFERENCE_MEASURES:
        raise ReportInputError(f"{run_dir.config_path}: meta.reference must be one of {list(REFERENCE_MEASURES)}, "
                               f"got {kind!r}")
    try:
        tasks, scores = run_dir.read_reference(kind)
    except ConfigError as exc:
        raise ReportInputError("; ".join(exc.problems)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{run_dir.metrics_path}: not valid JSON ({exc})") from None
    if not isinstance(tasks, list) or not isinstance(scores, list) or len(scores) != len(tasks) or not tasks \
            or not all(finite_number(v) for v in scores):
        raise ReportInputError(f"{run_dir.metrics_path}: scores must be a list of finite numbers, one per task")
    config = run_dir.load_config()
    return ReferenceRun(folder, name, kind, config.run.seed, dotted_keys(config_to_dict(config)), tuple(tasks),
                        tuple(float(v) for v in scores))


def match_reference(run: RunResult, references: list[ReferenceRun]) -> tuple[ReferenceRun | None, bool]:
    """The reference (of one kind) a run is measured against, or None, and whether it has the run's seed:
    those of the run's task sequence; of these the ones with its seed, and among several of those the one
    whose comparable settings equal the run's; with no reference of its seed, the sequence's only one."""
    same_tasks = [ref for ref in references if ref.tasks == run.tasks]
    same_seed = [ref for ref in same_tasks if ref.seed == run.seed]
    if len(same_seed) > 1:
        same_seed = [ref for ref in same_seed
                     if comparable_settings(ref.settings) == comparable_settings(run.settings)]
    if len(same_seed) == 1:
        return same_seed[0], True
    if not same_seed and len(same_tasks) == 1:
        return same_tasks[0], False
    return None, False


def with_reference_measures(runs: list[RunResult], references: list[ReferenceRun]) -> tuple[list[RunResult],
                                                                                            list[str]]:
    """The runs with FWT_alone / gap_joint added for each reference kind present, and the lines
    report.md prints about which reference each measure used."""
    notes: list[str] = []
    for kind, (key, measure) in REFERENCE_MEASURES.items():
        of_kind = [ref for ref in references if ref.kind == kind]
        if not of_kind:
            continue
        measured, unmatched, other_seed = [], [], {}
        for run in runs:
            ref, by_seed = match_reference(run, of_kind)
            if ref is None:
                unmatched.append(run.name)
            elif not by_seed:
                other_seed.setdefault(ref.path, []).append(run.name)
            value = None if ref is None else measure([list(row) for row in run.matrix], list(ref.scores))
            measured.append(dataclasses.replace(run, metrics={**run.metrics, key: value}))
        runs = measured
        notes += [f"{key} of {', '.join(names)}: against {path}, the sequence's only {kind} reference, of "
                  "another seed" for path, names in other_seed.items()]
        if unmatched:
            notes.append(f"{key} undefined for {', '.join(unmatched)}: no {kind} reference of that task sequence, "
                         "or several and none with the run's seed and settings")
    return runs, notes



def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs different experiments: all but run identity, logging and data file paths."""
    return {k: v for k, v in settings.items() if k not in RUN_IDENTITY_KEYS and not PATH_OR_LOGGING_KEY.fullmatch(k)}


sequence_label = " > ".join  # ("a", "b") -> "a > b"
