"""Reading and comparing finished runs for `cl-flat report`, from their result files only (never a model).

Inputs: run folders, folders of them, or globs (expanded here, so a quoted glob works), read through
RunDir (config.yaml, acc_matrix.csv, metrics.json). A run without metrics.json is incomplete: listed and
skipped, never averaged.

Grouping, labels, reference groups and the baseline group: cl_flat.report.groups.

Per group and metric M over its n runs (cl_flat.stats): mean, sample std s (n − 1), 95% CI mean ± h with
h = t_{0.975, n−1}·s/√n; for n = 1, s and h are undefined (NaN; empty in the csv). A metric null in any run
of a group is undefined for the group. Paired difference vs the baseline group: runs are paired by PAIR_BY
(default: the same run.seed and task order; "order": the same task order whatever the seed; "seed": the
same seed), a key found once in both groups giving d = M(group) − M(baseline), summarised the same way
(n = pairs).

Reference measures: each sequential run is measured against the reference of each kind with its task
sequence and seed (among several, the one whose settings equal the run's; a kind's only
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cl_flat.errors import ConfigError
from cl_flat.metrics import METRICS, REFERENCE_MEASURES
from cl_flat.report.groups import Group, ReferenceGroup, choose_baseline, group_references, group_runs
from cl_flat.report.published import PUBLISHED, PublishedResult
from cl_flat.report.runs import (
    COST_MEASURE,
    DRIFT_MEASURE,
    FLATNESS_MEASURES,
    TIME_RATIO,
    ReportInputError,
    RunResult,
    find_run_folders,
    is_reference,
    load_reference,
    load_run,
    paired_differences,
    sequence_label,
    with_reference_measures,
)
from cl_flat.rundir import RunDir
from cl_flat.stats import Summary, holm, summarize_defined, t_test_p

PAIR_BY = {"seed,order": lambda run: (run.seed, run.tasks), "order": lambda run: run.tasks,
           "seed": lambda run: run.seed}


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
