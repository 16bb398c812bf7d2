"""The figures of a `cl-flat report`, drawn from a Report (itself read from the runs' saved files) and the
runs' landscape csv files only; each written atomically.

    op_curves.png            OP_t per group, 95% CI band
    metrics_bars.png         one panel per metric (its own axis: AA ~ 70 and BWT ~ −5 never share one)
    paired_differences.png   forest plot: per metric (panel) the paired difference vs the baseline, 95% CI
    flatness_forgetting.png  flatness of task i's minimum vs its forgetting R[i,i] − R[T,i], one colour per group
    landscapes/<task>_1d.png the 1-D landscapes (landscape/<task>_1d.csv) of the same task from several runs
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from cl_flat import plots  # selects matplotlib's headless Agg backend before any figure exists
from cl_flat.report.build import PairedComparison
from cl_flat.report.flatness import FlatnessForgetting
from cl_flat.report.groups import Group
from cl_flat.report.runs import RunResult
from cl_flat.rundir import RunDir

BAR_METRICS = ("AA", "BWT", "F")


def _panels(count: int, width: float, height: float, **kwargs: Any) -> tuple[Any, list[Any]]:
    """A figure of `count` panels, at most 4 a row; unused panels hidden. Returns (figure, panels)."""
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.5, height * rows), squeeze=False, **kwargs)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _legend_below(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0))


def plot_op_curves(groups: list[Group], out_png: Path) -> None:
    """OP_t (mean over a group's runs) against t, one line per group, its 95% CI as a band (n ≥ 2)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        ts = np.arange(1, len(group.op) + 1)
        (line,) = ax.plot(ts, [s.mean for s in group.op], marker="o", label=f"{group.label} (n={len(group.runs)})")
        if len(group.runs) > 1:
            ax.fill_between(ts, [s.ci_low for s in group.op], [s.ci_high for s in group.op],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xticks=range(1, max(len(group.op) for group in groups) + 1), xlabel="after task t", ylabel="OP$_t$ (%)",
           title="Online performance: mean over runs, 95% CI band")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    plots.save_figure(fig, out_png)


def plot_metric_bars(groups: list[Group], measures: tuple[str, ...], out_png: Path) -> None:
    """One panel per metric (AA, BWT, F and the flatness measures present), each on its own axis: one bar
    per group (the mean), error bars the 95% CI (none for n = 1 or undefined)."""
    fig, axes = _panels(len(measures), 2.2 + 0.3 * len(groups), 3.2)
    for ax, metric in zip(axes, measures):
        for k, group in enumerate(groups):
            summary = group.metrics.get(metric)
            ax.bar(k, math.nan if summary is None else summary.mean, 0.8, capsize=3, color=f"C{k}",
                   yerr=math.nan if summary is None else summary.half_width,
                   label=f"{group.label} (n={len(group.runs)})")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set(xticks=[], title=metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean over runs, 95% CI")
    _legend_below(fig, axes[0])
    plots.save_figure(fig, out_png)


def plot_paired_forest(paired: list[PairedComparison], measures: tuple[str, ...], baseline: str,
                       out_png: Path) -> None:
    """Forest plot: one panel per metric; per group its mean paired difference vs the baseline with the 95%
    CI as a horizontal bar (a hollow marker: one pair, no interval), 0 (no difference) marked."""
    fig, axes = _panels(len(measures), 2.8, 0.4 * len(paired) + 1.8)
    ys = np.arange(len(paired))[::-1]
    names = [f"{c.group.label} ({len(c.seeds)} pairs)" for c in paired]
    for k, (ax, metric) in enumerate(zip(axes, measures)):
        for y, comparison in zip(ys, paired):
            summary = comparison.metrics.get(metric)
            if summary is None:
                continue
            interval = not math.isnan(summary.half_width)
            ax.errorbar(summary.mean, y, xerr=summary.half_width if interval else None, fmt="o", capsize=3,
                        color="C0", markerfacecolor="C0" if interval else "white")
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set(title=f"Δ{metric}", ylim=(-0.7, len(paired) - 0.3))
        ax.set_yticks(ys, names if k % 4 == 0 else [], fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Paired difference vs {baseline}: mean, 95% CI (hollow: one pair)", fontsize=9, y=1.0)
    fig.tight_layout()
    plots.save_figure(fig, out_png)


def plot_flatness_forgetting(study: FlatnessForgetting, out_png: Path) -> None:
    """One point per (run, task i < T): x the flatness measure of task i's minimum at the end of its
    training, y its forgetting R[i,i] − R[T,i]; colour = group, marker = task (tasks differ in difficulty:
    see cl_flat.report.flatness); Spearman ρ and its seed-bootstrap CI above."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = list(dict.fromkeys(p.task for p in study.points))
    markers = {task: "osD^v<>ph*"[i % 10] for i, task in enumerate(tasks)}
    for k, label in enumerate(dict.fromkeys(p.group for p in study.points)):
        mine = [p for p in study.points if p.group == label]
        for task in tasks:
            theirs = [p for p in mine if p.task == task]
            ax.scatter([p.flatness for p in theirs], [p.forgetting for p in theirs], color=f"C{k}", s=22,
                       marker=markers[task])
        ax.scatter([], [], color=f"C{k}", s=22, label=f"{label} ({len(mine)} points)")
    if len(tasks) > 1:
        for task in tasks:
            ax.scatter([], [], color="grey", s=22, marker=markers[task], label=task)
    rho = study.correlation
    interval = "" if math.isnan(rho.low) else f", 95% CI [{rho.low:+.2f}, {rho.high:+.2f}] over {rho.clusters} seeds"
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(xlabel=f"{study.label} of task i after training it", ylabel="forgetting R[i,i] − R[T,i] (points)",
           title=f"Flatness vs forgetting: Spearman ρ = {rho.estimate:+.2f}{interval}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    plots.save_figure(fig, out_png)


def plot_landscape_overlays(runs: list[RunResult], out_dir: Path) -> tuple[list[Path], list[str]]:
    """landscapes/<task>_1d.png for every task whose landscape/<task>_1d.csv exists in 2 runs or more, one
    line per run; returns the paths written and a note per malformed csv (skipped, never fatal)."""
    by_task: dict[str, list[tuple[str, Path]]] = {}
    for run in runs:
        for task in run.tasks:
            path = RunDir(run.path).landscape_csv(task, 1)
            if path.is_file():
                by_task.setdefault(task, []).append((run.name, path))
    written, notes = [], []
    for task, curves in by_task.items():
        if len(curves) < 2:
            continue
        png = out_dir / "landscapes" / f"{task}_1d.png"
        try:
            plots.plot_landscapes_1d(curves, png, f"1-D loss landscape of {task}, right after training it")
        except ValueError as exc:
            notes.append(f"landscapes/{task}_1d.png not drawn: {exc}")
            continue
        written.append(png)
    return written, notes
