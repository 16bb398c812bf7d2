"""Writing a `cl-flat report`: report.md, report.csv and figures, drawn from a Report only.

report.csv (CSV_COLUMNS): kind (group | run | paired | reference | reference_run), group (label), baseline
(paired rows), run and path (run rows), seed (group/paired rows: the seeds), method, tasks ("a > b"), n (1,
runs, or pairs), M for M in METRICS and then
REFERENCE_KEYS (run rows), M_mean, M_std, M_ci_low, M_ci_high (group, paired and
reference rows; a reference's value is in AA); docs/results.md explains each. An empty cell is
undefined, never 0.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from cl_flat import plots  # selects matplotlib's headless Agg backend before any figure exists
from cl_flat.files import atomic_path, atomic_write_text
from cl_flat.metrics import METRICS, REFERENCE_MEASURES
from cl_flat.report.build import (
    Group,
    ReferenceGroup,
    ReferenceRun,
    Report,
    ReportInputError,
    RunResult,
    sequence_label,
)
from cl_flat.rundir import RunDir
from cl_flat.stats import Summary

REFERENCE_KEYS = tuple(key for key, _ in REFERENCE_MEASURES.values())
BAR_METRICS = ("AA", "BWT", "F")
SUMMARY_PARTS = ("mean", "std", "ci_low", "ci_high")
# the reference measures' columns come last, so that the columns of earlier versions keep their places
CSV_COLUMNS = ["kind", "group", "baseline", "run", "path", "seed", "method", "tasks", "n", *METRICS,
               *(f"{m}_{part}" for m in METRICS for part in SUMMARY_PARTS),
               *REFERENCE_KEYS, *(f"{m}_{part}" for m in REFERENCE_KEYS for part in SUMMARY_PARTS)]


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "—"
    return f"{summary.mean:.2f} (n=1)" if summary.n == 1 else f"{summary.mean:.2f} ± {summary.half_width:.2f}"


def _tasks_of(runs: list[RunResult] | list[ReferenceRun]) -> str:
    return " | ".join(dict.fromkeys(sequence_label(run.tasks) for run in runs))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: Report) -> str:
    """report.md: groups (mean ± 95% CI half-width), paired differences vs the baseline, notes, skipped runs."""
    sequences = list(dict.fromkeys(run.tasks for run in report.runs))
    mixed = len(sequences) > 1
    lines = ["# cl-flat report", "",
             f"{len(report.runs)} complete run(s) in {len(report.groups)} group(s); "
             + ("task sequences differ (--allow-mixed), see the tasks column." if mixed
                else f"task sequence {sequence_label(sequences[0])}."), "",
             "Scores in percent. A cell is mean ± h, the half-width of the 95% confidence interval "
             "(Student t with n − 1 degrees of freedom, h = t·s/√n, s the sample standard deviation). "
             "\"n=1\": one run, no interval. —: undefined (null in metrics.json). A label omits method "
             "parameters at their defaults (cl-flat methods).", "",
             f"## Groups ({report.grouping})", ""]
    measures = report.measures
    lines += _table(["group", "n", "seeds", *(["tasks"] if mixed else []), *measures],
                    [[g.label, str(len(g.runs)), " ".join(map(str, g.seeds)), *([_tasks_of(g.runs)] if mixed else []),
                      *(_cell(g.metrics[m]) for m in measures)] for g in report.groups]
                    + [[r.label, str(len(r.runs)), " ".join(map(str, r.seeds)),
                        *([_tasks_of(r.runs)] if mixed else []), _cell(r.mean), *("—" for _ in measures[1:])]
                       for r in report.references])
    if report.references:
        lines += ["", "A reference row's AA is the mean over tasks of its per-task scores (each task under its "
                  "own adapter for per_task, under the joint adapter for joint). FWT_alone = mean_{i≥2} "
                  "(R[i,i] − P_i) against the per_task reference P; gap_joint = mean_i J_i − AA against the "
                  "joint reference J; each run against the reference of its seed."]
    if report.baseline is not None:
        lines += ["", f"## Paired difference vs baseline `{report.baseline.label}`", "",
                  "Mean over seeds of (group − baseline) for runs with the same run.seed, ± the 95% CI half-width "
                  "of those differences.", ""]
        lines += _table(["group", "pairs", "seeds", *(f"Δ{m}" for m in measures)],
                        [[c.group.label, str(len(c.seeds)), " ".join(map(str, c.seeds)) or "—",
                          *(_cell(c.metrics[m]) for m in measures)] for c in report.paired])
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report.notes)]
    lines += ["", "## Skipped incomplete runs (no metrics.json)", ""]
    lines += [f"- {path}" for path in report.skipped] or ["none"]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def _summary_cells(metrics: dict[str, Summary | None]) -> dict[str, str]:
    return {f"{m}_{part}": "" if s is None else _number(getattr(s, part))
            for m, s in metrics.items() for part in SUMMARY_PARTS}


def _methods(runs: list[RunResult] | list[ReferenceRun]) -> str:
    return " ".join(dict.fromkeys(str(run.settings.get("flatness.method", "")) for run in runs))


def render_csv(report: Report) -> str:
    """report.csv: the columns of the module docstring (CSV_COLUMNS)."""
    def summary_row(kind: str, group: Group | ReferenceGroup, seeds: list[int],
                    metrics: dict[str, Summary | None]) -> dict[str, Any]:
        return {"kind": kind, "group": group.label, "seed": " ".join(map(str, seeds)), "method": _methods(group.runs),
                "tasks": _tasks_of(group.runs), "n": len(seeds), **_summary_cells(metrics)}

    rows: list[dict[str, Any]] = []
    for group in report.groups:
        rows.append(summary_row("group", group, group.seeds, group.metrics))
        rows += [{"kind": "run", "group": group.label, "run": run.name, "path": str(run.path), "seed": run.seed,
                  "method": _methods([run]), "tasks": sequence_label(run.tasks), "n": 1,
                  **{m: _number(v) for m, v in run.metrics.items()}} for run in group.runs]
    rows += [summary_row("paired", c.group, c.seeds, c.metrics) | {"baseline": report.baseline.label}
             for c in report.paired]
    for ref in report.references:
        rows.append(summary_row("reference", ref, ref.seeds, {"AA": ref.mean}))
        rows += [{"kind": "reference_run", "group": ref.label, "run": run.name, "path": str(run.path),
                  "seed": run.seed, "method": _methods([run]), "tasks": sequence_label(run.tasks), "n": 1,
                  "AA": _number(run.mean)} for run in ref.runs]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _save_figure(fig: Any, ax: Any, title: str, out_png: Path) -> None:
    """Title, legend below the axes, then savefig to a temp file and rename; always closes the figure."""
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_op_curves(groups: list[Group], out_png: Path) -> None:
    """OP_t (mean over a group's runs) against t, one line per group, its 95% CI as a band (n ≥ 2)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        ts = np.arange(1, len(group.op) + 1)
        (line,) = ax.plot(ts, [s.mean for s in group.op], marker="o", label=f"{group.label} (n={len(group.runs)})")
        if len(group.runs) > 1:
            ax.fill_between(ts, [s.ci_low for s in group.op], [s.ci_high for s in group.op],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xticks=range(1, max(len(group.op) for group in groups) + 1), xlabel="after task t", ylabel="OP$_t$ (%)")
    ax.grid(alpha=0.3)
    _save_figure(fig, ax, "Online performance: mean over seeds, 95% CI band", out_png)


def plot_metric_bars(groups: list[Group], out_png: Path) -> None:
    """AA, BWT and F: one bar per group (the mean), error bars the 95% CI (none for n = 1 or undefined)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 4), 4.5))
    width, xs = 0.8 / len(groups), np.arange(len(BAR_METRICS))
    for k, group in enumerate(groups):
        summaries = [group.metrics[m] for m in BAR_METRICS]
        ax.bar(xs + (k - (len(groups) - 1) / 2) * width, [math.nan if s is None else s.mean for s in summaries],
               width, yerr=[math.nan if s is None else s.half_width for s in summaries], capsize=3,
               label=f"{group.label} (n={len(group.runs)})")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(xticks=xs, xticklabels=BAR_METRICS, ylabel="percent points")
    _save_figure(fig, ax, "AA, BWT, F: mean over seeds, 95% CI", out_png)


def write_report(report: Report, out: str | os.PathLike[str]) -> list[Path]:
    """DIR/report.md, DIR/report.csv, DIR/op_curves.png, DIR/metrics_bars.png, DIR/heatmaps/<run>.png; every
    file written atomically, figures drawn only from the files read. Returns the paths written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out}: exists and is not a folder")
    heatmaps = [out / "heatmaps" / f"{run.name}.png" for run in report.runs]
    for run, png in zip(report.runs, heatmaps):
        plots.plot_acc_matrix(RunDir(run.path).matrix_path, png)
    plot_op_curves(report.groups, out / "op_curves.png")
    plot_metric_bars(report.groups, out / "metrics_bars.png")
    atomic_write_text(out / "report.csv", render_csv(report))
    atomic_write_text(out / "report.md", render_markdown(report))
    return [*heatmaps, out / "op_curves.png", out / "metrics_bars.png", out / "report.csv", out / "report.md"]
