"""Reading and comparing finished runs for `cl-flat report`, from their result files only (never a model).

Inputs: run folders, folders of them, or globs (expanded here, so a quoted glob works), read through
RunDir (config.yaml, acc_matrix.csv, metrics.json). A run without metrics.json is incomplete: listed and
skipped, never averaged.

Grouping: runs whose resolved configs are equal once run.seed, run.name, run.output_dir, logging.* and
the tasks' data file paths (tasks.<i>.train / test / data_files) are set aside form one group ("meta" is
never part of a config); `group_by` (dotted keys) groups by just those keys. A group's label is
flatness.method plus the keys whose values differ between groups (see group_runs), or the `group_by` keys.

Per group and metric M over its n runs (cl_flat.stats): mean, sample std s (n − 1), 95% CI mean ± h with
h = t_{0.975, n−1}·s/√n; for n = 1, s and h are undefined (NaN; empty in the csv). A metric null in any run
of a group is undefined for the group. Paired difference vs the baseline group: for each seed s found
once in both groups, d_s = M(group, s) − M(baseline, s), summarised the same way (n = pairs).

Reference runs (`cl-flat train --reference per_task|joint`, meta.reference in config.yaml) are not grouped
with the sequences: they form reference groups of their own (kind, settings), whose value is the mean over
tasks of their per-task scores. Each sequential run is measured against the reference of each kind with
its task sequence and seed (among several, the one whose settings equal the run's; a kind's only
reference when none has the seed): FWT_alone against per_task, gap_joint against joint
(cl_flat.metrics). The measures are summarised per group like the others.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cl_flat.config import config_to_dict, flatness_adapter
from cl_flat.errors import ConfigError, MatrixFormatError, UserError
from cl_flat.metrics import METRICS, REFERENCE_MEASURES, read_acc_matrix
from cl_flat.overrides import dotted_keys
from cl_flat.rundir import RunDir
from cl_flat.stats import Summary, summarize, summarize_defined

DEFAULT_BASELINE = "flatness.method=none"
RUN_IDENTITY_KEYS = frozenset({"run.seed", "run.name", "run.output_dir"})
PATH_OR_LOGGING_KEY = re.compile(r"logging\..*|tasks\.\d+\.(train|test|data_files)(\..*)?")
UNSET = "(unset)"


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


@dataclass
class ReferenceGroup:
    label: str                         # "reference <kind>" and the keys that differ between its groups
    kind: str
    runs: list[ReferenceRun]
    mean: Summary                      # over the runs of the mean score over tasks

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


@dataclass
class Group:
    label: str
    runs: list[RunResult]
    metrics: dict[str, Summary | None]  # None: undefined in some run
    op: list[Summary]                   # OP_t for t = 1..(shortest sequence in the group)

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


@dataclass
class PairedComparison:
    group: Group
    seeds: list[int]                    # the seeds paired with the baseline
    metrics: dict[str, Summary | None]  # summary of M(group, s) − M(baseline, s); None: no pair or undefined


@dataclass
class Report:
    groups: list[Group]                 # the baseline first, if any
    baseline: Group | None
    paired: list[PairedComparison]
    skipped: list[Path]                 # incomplete runs (no metrics.json)
    notes: list[str] = field(default_factory=list)
    grouping: str = "runs that differ only in run.seed"
    references: list[ReferenceGroup] = field(default_factory=list)
    measures: tuple[str, ...] = METRICS  # METRICS and the reference measures the inputs allow

    @property
    def runs(self) -> list[RunResult]:
        return [run for group in self.groups for run in group.runs]


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
    try:
        config = run_dir.load_config()
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{run_dir.config_path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
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
        if key not in data or not (_finite(data[key]) or (nullable and data[key] is None)):
            raise ReportInputError(f"{path}: {key} must be a finite number{' or null' if nullable else ''}, "
                                   + (f"got {data[key]!r}" if key in data else "but is missing"))
    op = data.get("OP")
    if not isinstance(op, list) or len(op) != len(tasks) or not all(_finite(v) for v in op):
        raise ReportInputError(f"{path}: OP must be a list of {len(tasks)} finite numbers (one per task), "
                               f"got {op!r}")
    metrics = {key: None if data[key] is None else float(data[key]) for key in METRICS}
    return RunResult(folder, name, config.run.seed, dotted_keys(config_to_dict(config)), tuple(tasks), metrics,
                     tuple(float(v) for v in op), tuple(tuple(row) for row in matrix))


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
            or not all(_finite(v) for v in scores):
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


def group_references(references: list[ReferenceRun]) -> list[ReferenceGroup]:
    """Reference runs grouped by kind and comparable settings; labelled by kind and the keys that differ."""
    buckets: dict[str, list[ReferenceRun]] = {}
    for ref in references:
        buckets.setdefault(_canonical([ref.kind, comparable_settings(ref.settings)]), []).append(ref)
    settings = [comparable_settings(members[0].settings) for members in buckets.values()]
    keys = list(dict.fromkeys(key for values in settings for key in values))
    differing = [key for key in keys if len({_canonical(values.get(key, UNSET)) for values in settings}) > 1]
    groups = []
    for members, values in zip(buckets.values(), settings):
        label = ", ".join([f"reference {members[0].kind}",
                           *(f"{k}={_format_value(values[k])}" for k in differing if k in values)])
        groups.append(ReferenceGroup(label, members[0].kind, members, summarize([ref.mean for ref in members])))
    return sorted(groups, key=lambda group: group.label)


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs different experiments: all but run identity, logging and data file paths."""
    return {k: v for k, v in settings.items() if k not in RUN_IDENTITY_KEYS and not PATH_OR_LOGGING_KEY.fullmatch(k)}


sequence_label = " > ".join  # ("a", "b") -> "a > b"
_finite = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
_canonical = functools.partial(json.dumps, sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else _canonical(value)  # true, null, 0.05, ["q_proj", "v_proj"]


def group_runs(runs: list[RunResult], group_by: list[str] | None = None) -> list[Group]:
    """Groups of runs with equal comparable settings (or equal `group_by` values), sorted by label. The label
    shows the `group_by` keys, or flatness.method and each key whose value (or presence) differs between
    groups, in config order, except a method's parameter at its default that no other group sets otherwise."""
    unknown = [key for key in group_by or [] if not any(key in run.settings for run in runs)]
    if unknown:
        raise ReportInputError(f"--group-by: no run has the key(s) {', '.join(unknown)}")
    buckets: dict[str, tuple[dict[str, Any], list[RunResult]]] = {}
    for run in runs:
        values = {k: run.settings.get(k, UNSET) for k in group_by} if group_by else comparable_settings(run.settings)
        buckets.setdefault(_canonical(values), (values, []))[1].append(run)
    settings = [values for values, _ in buckets.values()]
    keys = list(dict.fromkeys(key for values in settings for key in values))
    differing = [key for key in keys if len({_canonical(values.get(key, UNSET)) for values in settings}) > 1]
    label_keys = list(group_by) if group_by else list(dict.fromkeys(["flatness.method", *differing]))
    only_present = {key for key in differing if len({_canonical(v[key]) for v in settings if key in v}) == 1}
    groups = []
    for values, members in buckets.values():
        defaults = {} if group_by else dotted_keys(  # flatness.<parameter> -> its default for this method
            flatness_adapter().validate_python({"method": values["flatness.method"]}).model_dump(mode="json"),
            "flatness.")
        label = ", ".join(f"{k}={_format_value(values[k])}" for k in label_keys
                          if k in values and not (k in only_present and defaults.get(k, UNSET) == values[k]))
        steps = range(min(len(run.op) for run in members))
        metrics = {m: summarize_defined([run.metrics[m] for run in members]) for m in members[0].metrics}
        groups.append(Group(label, members, metrics, [summarize([run.op[t] for run in members]) for t in steps]))
    return sorted(groups, key=lambda group: group.label)


def _matches(value: Any, text: str) -> bool:
    """Whether a config value equals a command-line VALUE: numbers as numbers (5e-4 = 0.0005), booleans and
    null as YAML writes them (true, false, null), anything else as its text."""
    if _finite(value):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return _format_value(value) == (text.lower() if isinstance(value, bool) or value is None else text)


def choose_baseline(groups: list[Group], specs: Sequence[str]) -> tuple[Group | None, list[str]]:
    """The group whose every run has KEY=VALUE for each spec (an error naming the key if none or several);
    without specs the one group with flatness.method=none, else (None, a note if several have it)."""
    conditions = []
    for spec in specs or [DEFAULT_BASELINE]:
        key, sep, text = (part.strip() for part in spec.partition("="))
        if not sep or not key:
            raise ReportInputError(f"--baseline {spec}: expected KEY=VALUE, e.g. {DEFAULT_BASELINE}")
        conditions.append((key, text))
    matching = [group for group in groups if all(_matches(run.settings.get(key, UNSET), text)
                                                 for key, text in conditions for run in group.runs)]
    if len(matching) == 1:
        return matching[0], []
    labels = "; ".join(group.label for group in matching)
    if not specs:
        return None, [f"no paired differences: {len(matching)} groups have {DEFAULT_BASELINE}"
                      f"{f' ({labels})' if matching else ''}; choose a baseline with --baseline KEY=VALUE"]
    if matching:
        raise ReportInputError(f"--baseline {' '.join(specs)} matches {len(matching)} groups ({labels}); "
                               "add another --baseline KEY=VALUE to choose one")
    present = {key: sorted({_format_value(run.settings[key]) for g in groups for run in g.runs if key in run.settings})
               for key, _ in conditions}
    raise ReportInputError(f"--baseline {' '.join(specs)}: no group has " + "; ".join(
        f"{key}={text} (values of {key}: {', '.join(present[key]) or 'none, no run has this key'})"
        for key, text in conditions))


def compare_paired(group: Group, baseline: Group) -> PairedComparison:
    """Pairs the runs of `group` and `baseline` with the same run.seed (a seed found more than once in either
    group is not paired) and summarises d_s = M(group, s) − M(baseline, s) per metric."""
    mine, theirs = ({run.seed: run for run in g.runs if g.seeds.count(run.seed) == 1} for g in (group, baseline))
    seeds = sorted(set(mine) & set(theirs))
    keys = group.runs[0].metrics
    pairs = {m: [(mine[s].metrics[m], theirs[s].metrics[m]) for s in seeds] for m in keys}
    return PairedComparison(group, seeds, {m: summarize_defined([None if a is None or b is None else a - b
                                                                 for a, b in pairs[m]]) for m in keys})


def build_report(inputs: Sequence[str], group_by: str | None = None, baseline: Sequence[str] = (),
                 allow_mixed: bool = False) -> Report:
    """Read and compare the runs named by `inputs`; raises ReportInputError before anything is written."""
    keys = None if group_by is None else [key.strip() for key in group_by.split(",")]
    if keys is not None and not all(keys):
        raise ReportInputError(f"--group-by {group_by}: expected comma-separated dotted keys, "
                               "e.g. flatness.method,flatness.scope")
    found = find_run_folders(inputs)
    reference_folders = [f for f in found if is_reference(f)]  # --reference runs: grouped on their own
    finished = [f for f in reference_folders if RunDir(f).metrics_path.is_file()]
    references = [load_reference(f, f.name) for f in finished]
    folders = [f for f in found if f not in reference_folders]
    complete = [folder for folder in folders if RunDir(folder).metrics_path.is_file()]
    skipped = [folder for folder in folders if folder not in complete]
    skipped += [folder for folder in reference_folders if folder not in finished]
    if not complete:
        raise ReportInputError("no complete run (with metrics.json) among " + ", ".join(map(str, skipped)))
    # heatmaps/<name>.png: the folder name, made unique
    names = [f"{f.parent.name}_{f.name}" if [g.name for g in complete].count(f.name) > 1 else f.name for f in complete]
    names = [name if names.index(name) == i else f"{name}_{i}" for i, name in enumerate(names)]
    runs = [load_run(folder, name) for folder, name in zip(complete, names)]
    runs, notes = with_reference_measures(runs, references)
    for run in runs[1:]:  # runs of different task sequences are not comparable
        if run.tasks != runs[0].tasks and not allow_mixed:
            raise ReportInputError(f"runs have different task sequences: {sequence_label(runs[0].tasks)} "
                                   f"({runs[0].path}) and {sequence_label(run.tasks)} ({run.path}); compare runs of "
                                   "one sequence, or pass --allow-mixed")
    groups = group_runs(runs, keys)
    chosen, baseline_notes = choose_baseline(groups, list(baseline))
    notes = baseline_notes + notes
    if chosen is not None:
        groups = [chosen, *(group for group in groups if group is not chosen)]
    paired = [compare_paired(group, chosen) for group in groups if chosen is not None and group is not chosen]
    for comparison in paired:
        unpaired = sorted(set(comparison.group.seeds) - set(comparison.seeds))
        if unpaired:
            notes.append(f"{comparison.group.label}: seed(s) {', '.join(map(str, unpaired))} not paired "
                         "(no baseline run with that seed, or the seed repeats in a group)")
    notes += [f"{group.label}: its runs have different task sequences; OP_t is averaged over the first "
              f"{len(group.op)} tasks only" for group in groups if len({run.tasks for run in group.runs}) > 1]
    measures = (*METRICS, *(key for kind, (key, _) in REFERENCE_MEASURES.items()
                            if any(ref.kind == kind for ref in references)))
    return Report(groups, chosen, paired, skipped, notes, f"by {', '.join(keys)}" if keys else Report.grouping,
                  group_references(references), measures)

