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

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_flat.config import flatness_adapter
from cl_flat.errors import ConfigError
from cl_flat.metrics import METRICS, REFERENCE_MEASURES
from cl_flat.overrides import dotted_keys
from cl_flat.report.runs import (
    ReferenceRun,
    ReportInputError,
    RunResult,
    comparable_settings,
    find_run_folders,
    finite_number,
    is_reference,
    load_reference,
    load_run,
    sequence_label,
    with_reference_measures,
)
from cl_flat.rundir import RunDir
from cl_flat.stats import Summary, summarize, summarize_defined

DEFAULT_BASELINE = "flatness.method=none"
UNSET = "(unset)"


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
    if finite_number(value):
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


def _readable(folders: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The folders whose config.yaml can be read, and (folder, problem) of the others (skipped, listed)."""
    readable, unreadable = [], []
    for folder in folders:
        try:
            RunDir(folder).read_document()
            readable.append(folder)
        except ConfigError as exc:
            unreadable.append((folder, exc.problems[0]))
    return readable, unreadable


def build_report(inputs: Sequence[str], group_by: str | None = None, baseline: Sequence[str] = (),
                 allow_mixed: bool = False) -> Report:
    """Read and compare the runs named by `inputs`; raises ReportInputError before anything is written."""
    keys = None if group_by is None else [key.strip() for key in group_by.split(",")]
    if keys is not None and not all(keys):
        raise ReportInputError(f"--group-by {group_by}: expected comma-separated dotted keys, "
                               "e.g. flatness.method,flatness.scope")
    found, unreadable = _readable(find_run_folders(inputs))
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
    notes = baseline_notes + notes + [f"skipped {folder}: {problem}" for folder, problem in unreadable]
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

