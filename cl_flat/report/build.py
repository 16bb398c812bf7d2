"""Reading and comparing finished runs for `cl-flat report`, from their result files only (never a model).

Inputs: run folders, folders of them, or globs (expanded here, so a quoted glob works), read through
RunDir (config.yaml, acc_matrix.csv, metrics.json). A run without metrics.json is incomplete: listed and
skipped, never averaged.

Grouping: runs whose resolved configs are equal once run.seed, run.name, run.output_dir, logging.*, the
tasks' and probes' data file paths (tasks.<i>.train / test / data_files) and the ORDER of the tasks are set aside form
one group ("meta" is never part of a config; a task's override blocks count as the values they change,
wherever in the sequence, see order_free): runs of the same tasks in different orders are one group, its
numbers averaged over the orders (the number O-LoRA reports); runs of different task sets are refused unless
--allow-mixed. `group_by` (dotted keys) groups by just those keys. A group's label is flatness.method plus
the keys whose values differ between groups (see group_runs), or the `group_by` keys, each value shortened
to one line (labels never hold a prompt template).

Per group and metric M over its n runs (cl_flat.stats): mean, sample std s (n − 1), 95% CI mean ± h with
h = t_{0.975, n−1}·s/√n; for n = 1, s and h are undefined (NaN; empty in the csv). A metric null in any run
of a group is undefined for the group. Paired difference vs the baseline group: runs are paired by PAIR_BY
(default: the same run.seed and task order; "order": the same task order whatever the seed; "seed": the
same seed), a key found once in both groups giving d = M(group) − M(baseline), summarised the same way
(n = pairs).

Reference runs (`cl-flat train --reference per_task|joint`, meta.reference in config.yaml) are not grouped
with the sequences: they form reference groups of their own (kind, settings), whose value is the mean over
tasks of their per-task scores. Each sequential run is measured against the reference of each kind with
its task sequence and seed (among several, the one whose settings equal the run's; a kind's only
reference when none has the seed): FWT_alone against per_task, gap_joint against joint
(cl_flat.metrics). The measures are summarised per group like the others.

Cost: a run's seconds per update (train_log.jsonl, cl_flat.report.runs) is summarised per group like a
metric, but paired as a ratio, group run over baseline run (TIME_RATIO: "time × baseline").

Multiplicity: every paired difference with n ≥ 2 of every group is one test of "mean 0" (the two-sided t test
its interval inverts); their p values are Holm-adjusted over that whole family (`tested`, cl_flat.stats), so
that one interval in dozens excluding 0 by chance is not read as an effect. A study that names its primary
measures before it looks (`primary`, e.g. BWT) makes the family those measures' differences only; the others
are then descriptive, their p unadjusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cl_flat.config import flatness_adapter
from cl_flat.errors import ConfigError
from cl_flat.metrics import METRICS, REFERENCE_MEASURES
from cl_flat.overrides import dotted_keys
from cl_flat.report.published import PUBLISHED, PublishedResult
from cl_flat.report.runs import (
    COST_MEASURE,
    DRIFT_MEASURE,
    FLATNESS_MEASURES,
    TIME_RATIO,
    ReferenceRun,
    ReportInputError,
    RunResult,
    comparable_settings,
    find_run_folders,
    finite_number,
    is_reference,
    load_reference,
    load_run,
    paired_differences,
    sequence_label,
    with_reference_measures,
)
from cl_flat.rundir import RunDir
from cl_flat.stats import Summary, holm, summarize, summarize_defined, t_test_p

DEFAULT_BASELINE = "flatness.method=none"
UNSET = "(unset)"
PAIR_BY = {"seed,order": lambda run: (run.seed, run.tasks), "order": lambda run: run.tasks,
           "seed": lambda run: run.seed}
TASK_KEY = re.compile(r"tasks\.(\d+)\.(.+)")
TASK_BLOCKS = ("training", "flatness", "lora")  # a task's overrides of the run-level sections
LABEL_WIDTH = 40


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

    @property
    def orders(self) -> list[tuple[str, ...]]:
        """The task orders of its runs, each once."""
        return list(dict.fromkeys(run.tasks for run in self.runs))


@dataclass
class PairedComparison:
    group: Group
    seeds: list[int]                    # the seeds of the group's paired runs, sorted
    metrics: dict[str, Summary | None]  # summary of M(group) − M(baseline) over pairs; None: no pair or undefined
    unpaired: list[RunResult] = field(default_factory=list)  # the group's runs without a pair
    # the t test of mean 0 of each difference with n ≥ 2 (stats.t_test_p of its summary), Holm-adjusted over
    # the report's family (tested)
    p_holm: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    groups: list[Group]                 # the baseline first, if any
    baseline: Group | None
    paired: list[PairedComparison]
    skipped: list[Path]                 # incomplete runs (no metrics.json)
    notes: list[str] = field(default_factory=list)
    grouping: str = "runs that differ only in run.seed or task order"
    references: list[ReferenceGroup] = field(default_factory=list)
    measures: tuple[str, ...] = METRICS  # METRICS, the reference, flatness and drift measures the inputs allow
    pair_by: str = "seed,order"
    published: tuple[str, tuple[PublishedResult, ...]] | None = None  # (--published key, its rows)
    primary: tuple[str, ...] | None = None  # the measures of the tested family; None: every measure

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
                           *(f"{k}={short_value(values[k])}" for k in differing if k in values)])
        groups.append(ReferenceGroup(label, members[0].kind, members, summarize([ref.mean for ref in members])))
    return sorted(groups, key=lambda group: group.label)


_canonical = functools.partial(json.dumps, sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else _canonical(value)  # true, null, 0.05, ["q_proj", "v_proj"]


def short_value(value: Any) -> str:
    """A value as one short line for a label: whitespace runs (newlines too) become one space; beyond
    LABEL_WIDTH characters, its start, "…" and 6 hex digits of its sha1 (two long values stay apart)."""
    text = " ".join(_format_value(value).split())
    if len(text) <= LABEL_WIDTH:
        return text
    return f"{text[:LABEL_WIDTH - 8]}…{hashlib.sha1(_format_value(value).encode()).hexdigest()[:6]}"


def order_free(settings: dict[str, Any]) -> dict[str, Any]:
    """comparable_settings, equal for runs of the same tasks in different orders: each task's own fields
    (tasks.<i>.<field>) renamed tasks.<name>.<field>; its override blocks (tasks.<i>.training / flatness /
    lora) reduced to the values that differ from the run-level section's (e.g. training.learning_rate=0.001)
    and gathered over all tasks into one sorted list, `tasks.overrides`: configs set them by position
    (O-LoRA's LLaMA scripts: a higher learning rate for whichever task comes first) and by task (MNLI's two
    epochs) alike, so neither the position nor the task of an override tells orders apart."""
    out: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in comparable_settings(settings).items():
        match = TASK_KEY.fullmatch(key)
        if not match:
            out[key] = value
        elif match[2].split(".")[0] in TASK_BLOCKS:
            if value is not None and _canonical(settings.get(match[2], UNSET)) != _canonical(value):
                overrides.append(f"{match[2]}={_format_value(value)}")
        else:
            out[f"tasks.{settings.get(f'tasks.{match[1]}.name', match[1])}.{match[2]}"] = value
    if overrides:
        out["tasks.overrides"] = sorted(overrides)
    return out


def _label_parts(settings: list[dict[str, Any]], differing: list[str]) -> tuple[list[str], dict[str, str]]:
    """The differing keys to show and, when the task sets differ, each bucket's "tasks=a,b" part: per-task
    keys of tasks not in every bucket are summarised by that part, never shown one by one."""
    name_sets = [frozenset(key.split(".")[1] for key in values if key.startswith("tasks.") and key != "tasks.overrides")
                 for values in settings]
    common = frozenset.intersection(*name_sets) if name_sets else frozenset()
    shown = [key for key in differing
             if not key.startswith("tasks.") or key == "tasks.overrides" or key.split(".")[1] in common]
    if len(set(name_sets)) == 1:
        return shown, {}
    return shown, {_canonical(values): "tasks=" + ",".join(sorted(names)) for values, names in zip(settings, name_sets)}


def group_runs(runs: list[RunResult], group_by: list[str] | None = None) -> list[Group]:
    """Groups of runs with equal order-free settings (or equal `group_by` values), sorted by label. The label
    shows the `group_by` keys, or flatness.method and each key whose value (or presence) differs between
    groups, in config order, except a method's parameter at its default that no other group sets otherwise;
    values shortened by short_value, different task sets by their names."""
    unknown = [key for key in group_by or [] if not any(key in run.settings for run in runs)]
    if unknown:
        raise ReportInputError(f"--group-by: no run has the key(s) {', '.join(unknown)}")
    buckets: dict[str, tuple[dict[str, Any], list[RunResult]]] = {}
    for run in runs:
        values = {k: run.settings.get(k, UNSET) for k in group_by} if group_by else order_free(run.settings)
        buckets.setdefault(_canonical(values), (values, []))[1].append(run)
    settings = [values for values, _ in buckets.values()]
    keys = list(dict.fromkeys(key for values in settings for key in values))
    differing = [key for key in keys if len({_canonical(values.get(key, UNSET)) for values in settings}) > 1]
    shown, task_sets = ([], {}) if group_by else _label_parts(settings, differing)
    label_keys = list(group_by) if group_by else list(dict.fromkeys(["flatness.method", *shown]))
    only_present = {key for key in differing if len({_canonical(v[key]) for v in settings if key in v}) == 1}
    groups = []
    for values, members in buckets.values():
        defaults = {} if group_by else dotted_keys(  # flatness.<parameter> -> its default for this method
            flatness_adapter().validate_python({"method": values["flatness.method"]}).model_dump(mode="json"),
            "flatness.")
        parts = [f"{k}={short_value(values[k])}" for k in label_keys
                 if k in values and not (k in only_present and defaults.get(k, UNSET) == values[k])]
        label = ", ".join(parts + ([task_sets[_canonical(values)]] if task_sets else []))
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
    present = {key: sorted({short_value(run.settings[key]) for g in groups for run in g.runs if key in run.settings})
               for key, _ in conditions}
    raise ReportInputError(f"--baseline {' '.join(specs)}: no group has " + "; ".join(
        f"{key}={text} (values of {key}: {', '.join(present[key]) or 'none, no run has this key'})"
        for key, text in conditions))


def compare_paired(group: Group, baseline: Group, pair_by: str = "seed,order") -> PairedComparison:
    """Pairs the runs of `group` and `baseline` with the same PAIR_BY[pair_by] key (a key found more than once
    in either group is not paired) and summarises d = M(group run) − M(baseline run) per metric; the cost
    (COST_MEASURE) as the ratio group/baseline, under TIME_RATIO."""
    key_of = PAIR_BY[pair_by]

    def once(g: Group) -> dict[Any, RunResult]:
        keys = [key_of(run) for run in g.runs]
        return {key: run for key, run in zip(keys, g.runs) if keys.count(key) == 1}

    mine, theirs = once(group), once(baseline)
    keys = [key for key in mine if key in theirs]
    metrics = group.runs[0].metrics
    pairs = {m: [(mine[k].metrics[m], theirs[k].metrics[m]) for k in keys] for m in metrics}
    summaries = {m: summarize_defined([None if a is None or b is None else a - b for a, b in pairs[m]])
                 for m in paired_differences(metrics)}
    summaries[TIME_RATIO] = summarize_defined([None if a is None or not b else a / b
                                               for a, b in pairs.get(COST_MEASURE, [])])
    return PairedComparison(group, sorted(mine[k].seed for k in keys), summaries,
                            [run for run in group.runs if key_of(run) not in keys])


def tested(paired: list[PairedComparison], primary: Sequence[str] | None = None) -> list[PairedComparison]:
    """The comparisons with p_holm filled: one test per difference with n ≥ 2 (the cost ratio is not a
    difference and is not tested) of every measure, or of the `primary` measures only, Holm-adjusted over all
    of them together (module docstring)."""
    family = [(i, m, t_test_p(s)) for i, c in enumerate(paired) for m, s in c.metrics.items()
              if m != TIME_RATIO and s is not None and (primary is None or m in primary)]
    adjusted: list[dict[str, float]] = [{} for _ in paired]
    for (i, m, raw), q in zip(family, holm([raw for *_, raw in family])):
        if not math.isnan(raw):  # n = 1: no test, not part of the family
            adjusted[i][m] = q
    return [replace(c, p_holm=adjusted[i]) for i, c in enumerate(paired)]


def _unpaired_note(comparison: PairedComparison, pair_by: str, one_order: bool) -> str:
    runs = comparison.unpaired
    if pair_by == "seed" or (pair_by == "seed,order" and one_order):
        what = f"seed(s) {', '.join(map(str, sorted({run.seed for run in runs})))}"
    elif pair_by == "order":
        what = f"order(s) {'; '.join(dict.fromkeys(sequence_label(run.tasks) for run in runs))}"
    else:
        what = "(seed, order) " + "; ".join(f"({run.seed}, {sequence_label(run.tasks)})" for run in runs)
    return (f"{comparison.group.label}: {what} not paired (no baseline run with that {pair_by.replace(',', ' and ')}"
            ", or it repeats in a group)")


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
                 allow_mixed: bool = False, pair_by: str = "seed,order", published: str | None = None,
                 primary: str | None = None) -> Report:
    """Read and compare the runs named by `inputs`; raises ReportInputError before anything is written.
    `primary`: comma-separated measures whose paired differences alone form the tested family."""
    keys = None if group_by is None else [key.strip() for key in group_by.split(",")]
    if keys is not None and not all(keys):
        raise ReportInputError(f"--group-by {group_by}: expected comma-separated dotted keys, "
                               "e.g. flatness.method,flatness.scope")
    pair_by = ",".join(part.strip() for part in pair_by.split(","))
    if pair_by not in PAIR_BY:
        raise ReportInputError(f"--pair-by {pair_by}: expected one of {', '.join(PAIR_BY)}")
    if published is not None and published not in PUBLISHED:
        raise ReportInputError(f"--published {published}: expected one of {', '.join(PUBLISHED)}")
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
    for run in runs[1:]:  # runs of different task sets are not comparable; other orders of one set are
        if sorted(run.tasks) != sorted(runs[0].tasks) and not allow_mixed:
            raise ReportInputError(f"runs have different task sets: {sequence_label(runs[0].tasks)} "
                                   f"({runs[0].path}) and {sequence_label(run.tasks)} ({run.path}); compare runs of "
                                   "the same tasks (in any order), or pass --allow-mixed")
    groups = group_runs(runs, keys)
    chosen, baseline_notes = choose_baseline(groups, list(baseline))
    notes = baseline_notes + notes + [f"skipped {folder}: {problem}" for folder, problem in unreadable]
    if chosen is not None:
        groups = [chosen, *(group for group in groups if group is not chosen)]
    measures = (*METRICS, *(key for kind, (key, _) in REFERENCE_MEASURES.items()
                            if any(ref.kind == kind for ref in references)),
                *(key for key in (*FLATNESS_MEASURES, DRIFT_MEASURE, COST_MEASURE)
                  if any(run.metrics[key] is not None for run in runs)))
    family = None if primary is None else _primary_measures(primary, paired_differences(measures))
    paired = tested([compare_paired(group, chosen, pair_by)
                     for group in groups if chosen is not None and group is not chosen], family)
    one_order = len({run.tasks for run in runs}) == 1
    notes += [_unpaired_note(comparison, pair_by, one_order) for comparison in paired if comparison.unpaired]
    notes += [f"{group.label}: its runs have task sequences of different lengths; OP_t is averaged over the first "
              f"{len(group.op)} tasks only" for group in groups if len({len(run.tasks) for run in group.runs}) > 1]
    if len({frozenset(group.orders) for group in groups}) > 1:
        notes.append("the groups cover different task orders (see the orders column): their means average "
                     "different orders; the paired differences compare like with like")
    return Report(groups, chosen, paired, skipped, notes, f"by {', '.join(keys)}" if keys else Report.grouping,
                  group_references(references), measures, pair_by,
                  None if published is None else (published, PUBLISHED[published]), family)


def _primary_measures(primary: str, available: Sequence[str]) -> tuple[str, ...]:
    """--primary's measures, each one with a paired difference in this report."""
    names = tuple(name.strip() for name in primary.split(","))
    wrong = [name for name in names if name not in available]
    if not all(names) or wrong:
        raise ReportInputError(f"--primary {primary}: expected comma-separated measures of this report's paired "
                               f"differences, e.g. BWT,lambda_max; they are {', '.join(available)}"
                               + (f" ({', '.join(wrong)} is not one)" if wrong else ""))
    return names
