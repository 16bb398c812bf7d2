"""Does a flatter minimum forget less? `cl-flat report` relates, for every run and task i < T, the flatness
of task i's minimum at the end of its own training (its landscape/sharpness.json entry, see
cl_flat.report.runs) to how much of task i the run forgot by the end: R[i,i] − R[T,i] (acc_matrix.csv).

The pooled relation over all (run, task) points is summarised by Spearman's ρ (cl_flat.stats.spearman) and
a 95% cluster-bootstrap interval that resamples SEEDS (cl_flat.stats.cluster_bootstrap_ci): the runs of
one seed share its data sample and initialisation, so their points are not independent. With one seed
there is no interval. Pooled over methods, ρ also reflects differences between the methods (a flatter
method that forgets less); the same statistic within each group separates the two. Pooled over tasks, it
also reflects differences between the tasks (an easy task may be both sharper and less forgotten than a
hard one, giving a pooled ρ of either sign while each task alone says the opposite); the statistic within
each task, over the runs, separates those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cl_flat.report.build import Report
from cl_flat.report.runs import ReportInputError, RunResult
from cl_flat.stats import BootstrapInterval, cluster_bootstrap_ci

# --flatness-measure: a field of the sharpness.json entries; auto = lambda_max where any run has it, else worst
MEASURES = ("auto", "worst", "avg", "lambda_max", "trace")
MEASURE_LABELS = {"worst": "worst-case sharpness", "avg": "average sharpness",
                  "lambda_max": "largest Hessian eigenvalue λ_max", "trace": "Hessian trace"}


@dataclass(frozen=True)
class FlatnessPoint:
    run: RunResult
    group: str                         # the label of the run's group
    task: str
    flatness: float                    # the measure of task's sharpness.json entry
    forgetting: float                  # R[i,i] − R[T,i], percent points


@dataclass(frozen=True)
class FlatnessForgetting:
    measure: str                       # the sharpness.json field used
    points: list[FlatnessPoint]
    missing: int                       # (run, task i < T) with a forgetting but without the measure
    correlation: BootstrapInterval     # Spearman ρ of (flatness, forgetting), seeds resampled
    within: dict[str, BootstrapInterval]  # group label -> the same over that group's points only
    by_task: dict[str, BootstrapInterval]  # task -> the same over that task's points only (one per run)

    @property
    def label(self) -> str:
        return MEASURE_LABELS.get(self.measure, self.measure)


def choose_measure(runs: list[RunResult], measure: str = "auto") -> str:
    """The sharpness.json field to use: `measure`, or for auto lambda_max where any run has it, else worst."""
    if measure not in MEASURES:
        raise ReportInputError(f"--flatness-measure {measure}: expected one of {', '.join(MEASURES)}")
    if measure != "auto":
        return measure
    return "lambda_max" if any("lambda_max" in entry for run in runs for entry in run.flatness.values()) else "worst"


def flatness_forgetting(report: Report, measure: str = "auto") -> FlatnessForgetting | None:
    """The (flatness, forgetting) point of every run and task i < T with both; None when no run has any
    sharpness.json entry (nothing to relate)."""
    runs = report.runs
    if not any(run.flatness for run in runs):
        return None
    field_name = choose_measure(runs, measure)
    group_of = {id(run): group.label for group in report.groups for run in group.runs}
    points, missing = [], 0
    for run in runs:
        for task, forgot in run.forgetting.items():
            value = run.flatness.get(task, {}).get(field_name)
            if value is None:
                missing += 1
            else:
                points.append(FlatnessPoint(run, group_of[id(run)], task, value, forgot))

    def rho(mine: list[FlatnessPoint]) -> BootstrapInterval:
        return cluster_bootstrap_ci([p.flatness for p in mine], [p.forgetting for p in mine],
                                    [p.run.seed for p in mine])

    within = {label: rho([p for p in points if p.group == label]) for label in dict.fromkeys(p.group for p in points)}
    by_task = {task: rho([p for p in points if p.task == task]) for task in dict.fromkeys(p.task for p in points)}
    return FlatnessForgetting(field_name, points, missing, rho(points), within, by_task)


def _interval(rho: BootstrapInterval) -> str:
    if math.isnan(rho.estimate):
        return "undefined"
    if math.isnan(rho.low):
        return f"{rho.estimate:+.2f} (no interval)"
    return f"{rho.estimate:+.2f} [{rho.low:+.2f}, {rho.high:+.2f}]"


def describe(study: FlatnessForgetting) -> str:
    """One sentence for report.md: ρ, its interval over seeds and what the interval says."""
    rho = study.correlation
    head = (f"Spearman ρ between {study.label} at the end of a task's training and its forgetting "
            f"R[i,i] − R[T,i], over {len(study.points)} (run, task) points")
    if math.isnan(rho.estimate):
        return f"{head}: undefined (fewer than 2 points, or one of the two is constant)."
    groups = (f" Within groups: {'; '.join(f'{label}: {_interval(r)}' for label, r in study.within.items())}."
              if len(study.within) > 1 else "")
    if len(study.by_task) > 1:
        groups += (" Within tasks (each task's points alone: differences between tasks cannot make these): "
                   f"{'; '.join(f'{task}: {_interval(r)}' for task, r in study.by_task.items())}.")
    head += f": ρ = {rho.estimate:+.2f}"
    if math.isnan(rho.low):
        why = "one seed" if rho.clusters < 2 else "ρ undefined in every resample"
        return f"{head}; no interval ({why}: the seed bootstrap needs 2 seeds or more), so no conclusion.{groups}"
    verdict = ("contains 0: no monotone relation distinguishable" if rho.low <= 0 <= rho.high else
               "excludes 0: flatter minima (smaller values) forget " + ("less" if rho.low > 0 else "more"))
    caveat = groups + (" With so few seeds the bootstrap has few distinct resamples and its interval understates "
                       "the uncertainty." if rho.clusters < 10 else "")
    return (f"{head}, 95% seed-bootstrap interval [{rho.low:+.2f}, {rho.high:+.2f}] ({rho.clusters} seeds "
            f"resampled, {rho.resamples} resamples): {verdict} at {rho.clusters} seeds.{caveat}")
