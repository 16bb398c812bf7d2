"""Writing a `cl-flat report`: report.md, report.csv and figures (cl_flat.report.figures), drawn from a
Report only.

report.csv (CSV_COLUMNS): kind (group | run | paired | reference | reference_run | published), group
(label), baseline (paired rows), run and path (run rows), seed (group/paired rows: the seeds), method,
tasks ("a > b", several orders joined by "; "), n (1, runs, or pairs), M for M in METRICS, then
REFERENCE_KEYS, then FLATNESS_KEYS (run rows), M_mean, M_std, M_ci_low, M_ci_high (group, paired and
reference rows; a reference's or a published row's value is in AA), source (published rows), then
final_drift and its summary parts (probes), then seconds_per_update and its summary parts (group and run
rows) and time_ratio's (paired rows: the group's seconds per update over the baseline's, per pair), then
M_p and M_p_holm (paired rows: the t test of each difference and its Holm-adjusted p, TESTED; M_p_holm empty
for a measure outside --primary);
docs/results.md explains each. An empty cell is undefined, never 0. No cell holds a newline; report.md
escapes "|" in its cells.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from cl_flat import plots
from cl_flat.files import atomic_write_text
from cl_flat.metrics import METRICS, REFERENCE_MEASURES
from cl_flat.report import figures
from cl_flat.report.build import PairedComparison, Report
from cl_flat.report.flatness import FlatnessForgetting, describe, flatness_forgetting
from cl_flat.report.groups import Group, ReferenceGroup
from cl_flat.report.runs import (
    COST_MEASURE,
    DRIFT_MEASURE,
    FLATNESS_MEASURES,
    TIME_RATIO,
    ReferenceRun,
    ReportInputError,
    RunResult,
    paired_differences,
    sequence_label,
)
from cl_flat.rundir import RunDir
from cl_flat.stats import CONFIDENCE, Summary, detectable_difference, t_test_p

REFERENCE_KEYS = tuple(key for key, _ in REFERENCE_MEASURES.values())
FLATNESS_KEYS = tuple(FLATNESS_MEASURES)
ALPHA = 1.0 - CONFIDENCE  # the intervals' 95% as a test's level
SUMMARY_PARTS = ("mean", "std", "ci_low", "ci_high")
TESTED = (*METRICS, *REFERENCE_KEYS, *FLATNESS_KEYS, DRIFT_MEASURE)  # the paired differences with a p
# later additions come last, so that the columns of earlier versions keep their places
CSV_COLUMNS = ["kind", "group", "baseline", "run", "path", "seed", "method", "tasks", "n", *METRICS,
               *(f"{m}_{part}" for m in METRICS for part in SUMMARY_PARTS),
               *REFERENCE_KEYS, *(f"{m}_{part}" for m in REFERENCE_KEYS for part in SUMMARY_PARTS),
               *FLATNESS_KEYS, *(f"{m}_{part}" for m in FLATNESS_KEYS for part in SUMMARY_PARTS), "source",
               DRIFT_MEASURE, *(f"{DRIFT_MEASURE}_{part}" for part in SUMMARY_PARTS),
               COST_MEASURE, *(f"{m}_{part}" for m in (COST_MEASURE, TIME_RATIO) for part in SUMMARY_PARTS),
               *(f"{m}_{part}" for m in TESTED for part in ("p", "p_holm"))]
FIGURE_CAPTIONS = {
    "op_curves.png": "OP_t per group (mean over runs, 95% CI band)",
    "metrics_bars.png": "each metric in its own panel: group means, 95% CI error bars",
    "paired_differences.png": "forest plot: each metric's paired difference vs the baseline, 95% CI; "
                              "an interval crossing the dashed 0 line is not distinguishable from no difference",
    "flatness_forgetting.png": "flatness of each task's minimum vs its forgetting, one colour per group, "
                               "one marker per task",
}


def _cell(summary: Summary | None, metric: str = "") -> str:
    """mean ± h in points (2 decimals), or for a flatness measure (loss units, often small) 3 significant digits."""
    if summary is None:
        return "—"
    form = ".3g" if metric in FLATNESS_KEYS else ".2f"
    return (f"{summary.mean:{form}} (n=1)" if summary.n == 1
            else f"{summary.mean:{form}} ± {summary.half_width:{form}}")


def _md(text: object) -> str:
    """A markdown table cell: one line, "|" escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _tasks_of(runs: list[RunResult] | list[ReferenceRun]) -> str:
    return "; ".join(dict.fromkeys(sequence_label(run.tasks) for run in runs))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(_md, row)) + " |" for row in rows])


def interval_words(name: str, summary: Summary | None, form: str = ".2f", p_holm: float | None = None,
                   family: int = 0, descriptive: bool = False) -> str | None:
    """What a paired difference's interval says, e.g. "ΔBWT +3.30 ± 9.90: not distinguishable from 0 at
    n = 3 (80% power only for |Δ| ≥ 12.34)" (the 95% CI contains 0; the difference it could have found,
    cl_flat.stats.detectable_difference) or "ΔAA +5.33 ± 2.87: above 0 at n = 3 (95% CI [+2.46, +8.20])"; with its
    Holm-adjusted p over a family of `family` tests, whether the exclusion holds for the family; `descriptive`:
    a difference outside the family of primary measures, its p not adjusted."""
    if summary is None:
        return None
    if summary.n == 1 or math.isnan(summary.half_width):
        return f"{name} {summary.mean:+{form}}: one pair, no interval, no conclusion"
    head = f"{name} {summary.mean:+{form}} ± {summary.half_width:{form}}"
    if summary.ci_low <= 0 <= summary.ci_high:
        return (f"{head}: not distinguishable from 0 at n = {summary.n} (80% power only for |Δ| ≥ "
                f"{detectable_difference(summary):{form}})")
    side = "above" if summary.ci_low > 0 else "below"
    holm = "" if p_holm is None else (
        f"; Holm p {p_holm:.2g} over {family} tests: " + ("holds for the family" if p_holm < ALPHA
                                                        else "could be one of the family's chance exclusions"))
    if descriptive:
        holm = f"; not a primary measure: p {t_test_p(summary):.2g}, not adjusted"
    return (f"{head}: {side} 0 at n = {summary.n} (95% CI [{summary.ci_low:+{form}}, "
            f"{summary.ci_high:+{form}}]{holm})")


def _paired_words(comparison: PairedComparison, measures: tuple[str, ...], family: int,
                  primary: tuple[str, ...] | None) -> str:
    words = [w for m in measures if (w := interval_words(f"Δ{m}", comparison.metrics.get(m),
                                                         ".3g" if m in FLATNESS_KEYS else ".2f",
                                                         comparison.p_holm.get(m), family,
                                                         primary is not None and m not in primary))]
    if (cost := comparison.metrics.get(TIME_RATIO)) is not None:
        words.append(f"time × baseline {_cell(cost)}")
    return f"- {_one_line(comparison.group.label)}: " + ("; ".join(words) if words else "no pair") + "."


def _family_words(paired: list[PairedComparison], family: int, primary: tuple[str, ...] | None) -> str:
    """One sentence on the family of `family` paired tests (of every measure, or of the primary ones): how
    many exclusions chance alone gives, and which differences hold after Holm's adjustment."""
    held = [f"Δ{m} of {_one_line(c.group.label)} (Holm p {q:.2g})"
            for c in paired for m, q in c.p_holm.items() if q < ALPHA]
    which = ("one per group and measure" if primary is None
             else "one per group and primary measure: " + ", ".join(f"Δ{m}" for m in primary))
    return (f"{family} paired differences are tested here ({which}; the two-sided t test whose "
            f"95% CI is shown): with nothing different, about {family * ALPHA:.2g} of them would exclude 0 by "
            "chance alone. Holm's adjustment over all of them keeps " + ("; ".join(held) or "none") + "."
            + ("" if primary is None else " The other differences are descriptive: their p is not adjusted."))


def _groups_table(report: Report, measures: tuple[str, ...]) -> list[str]:
    mixed = len({run.tasks for run in report.runs}) > 1
    orders = any(len(g.orders) > 1 for g in report.groups)
    def extra(runs: list, n_orders: int | str) -> list[str]:
        return [*([str(n_orders)] if orders else []), *([_tasks_of(runs)] if mixed else [])]
    rows = [[g.label, str(len(g.runs)), " ".join(map(str, sorted(set(g.seeds)))), *extra(g.runs, len(g.orders)),
             *(_cell(g.metrics[m], m) for m in measures)] for g in report.groups]
    rows += [[r.label, str(len(r.runs)), " ".join(map(str, r.seeds)), *extra(r.runs, len(set(x.tasks for x in r.runs))),
              _cell(r.mean), *("—" for _ in measures[1:])] for r in report.references]
    if report.published:
        rows += [[f"published: {p.method}", "—", "—", *(["—"] * len(extra([], 0))), f"{p.aa:.1f}",
                  *("—" for _ in measures[1:])] for p in report.published[1]]
    return _table(["group", "n", "seeds", *(["orders"] if orders else []), *(["tasks"] if mixed else []), *measures],
                  rows)


def _paired_section(report: Report, baseline: Group, measures: tuple[str, ...]) -> list[str]:
    """report.md's paired differences vs the baseline (the cost as a ratio) and what their intervals say."""
    pairing = {"seed,order": "the same run.seed and task order", "order": "the same task order",
               "seed": "the same run.seed"}[report.pair_by]
    lines = ["", f"## Paired difference vs baseline `{_one_line(baseline.label)}`", "",
             f"Mean over pairs (runs with {pairing}) of (group − baseline), ± the 95% CI half-width of those "
             "differences.", ""]
    differences = paired_differences(measures)
    cost = ["time × baseline"] if COST_MEASURE in measures else []
    lines += _table(["group", "pairs", "seeds", *(f"Δ{m}" for m in differences), *cost],
                    [[c.group.label, str(len(c.seeds)), " ".join(map(str, sorted(set(c.seeds)))) or "—",
                      *(_cell(c.metrics[m], m) for m in differences),
                      *(_cell(c.metrics[TIME_RATIO]) for _ in cost)] for c in report.paired])
    family = sum(len(c.p_holm) for c in report.paired)
    lines += ["", "What the intervals say (a 95% CI that contains 0: the data do not tell the group from the "
              "baseline; more seeds narrow it):", "",
              *(_paired_words(c, measures, family, report.primary) for c in report.paired)]
    return lines + (["", _family_words(report.paired, family, report.primary)] if family else [])


def render_markdown(report: Report, figures_written: list[Path] | None = None,
                    study: FlatnessForgetting | None = None) -> str:
    """report.md: groups (mean ± 95% CI half-width), paired differences vs the baseline and what their
    intervals say, flatness vs forgetting, published numbers, figures, notes, skipped runs."""
    sequences = list(dict.fromkeys(run.tasks for run in report.runs))
    lines = ["# cl-flat report", "",
             f"{len(report.runs)} complete run(s) in {len(report.groups)} group(s); "
             + (f"{len(sequences)} task sequences (orders or sets), see the orders/tasks columns." if len(sequences) > 1
                else f"task sequence {sequence_label(sequences[0])}."), "",
             "Scores in percent. A cell is mean ± h, the half-width of the 95% confidence interval "
             "(Student t with n − 1 degrees of freedom, h = t·s/√n, s the sample standard deviation) over the "
             "group's runs (seeds, and task orders where it has several: the mean over orders is the number "
             "O-LoRA reports). \"n=1\": one run, no interval. —: undefined (null in metrics.json). A label omits "
             "method parameters at their defaults (cl-flat methods).", "",
             f"## Groups ({report.grouping})", ""]
    measures = report.measures
    lines += _groups_table(report, measures)
    if report.references:
        lines += ["", "A reference row's AA is the mean over tasks of its per-task scores (each task under its "
                  "own adapter for per_task, under the joint adapter for joint). FWT_alone = mean_{i≥2} "
                  "(R[i,i] − P_i) against the per_task reference P; gap_joint = mean_i J_i − AA against the "
                  "joint reference J; each run against the reference of its seed."]
    if any(m in FLATNESS_KEYS for m in measures):
        lines += ["", "Flatness columns: the mean over a run's tasks of each task's landscape/sharpness.json entry, "
                  "measured right after training it (sharpness_avg / sharpness_worst: its \"avg\" / \"worst\"; "
                  "lambda_max, trace: the Hessian's), in loss units; — where a task lacks it."]
    if DRIFT_MEASURE in measures:
        lines += ["", f"{DRIFT_MEASURE}: the mean over a run's probes (tasks scored after every task, never trained) "
                  "of the probe's score after the last task minus its zero-shot score, in points (< 0: the sequence "
                  "cost the ability the probes measure); — for a run without probes."]
    if COST_MEASURE in measures:
        lines += ["", f"{COST_MEASURE}: the median time of one training update of a run (train_log.jsonl), in "
                  "seconds: what its runs cost on the machines they ran on (compare runs of one machine; "
                  "`cl-flat bench` measures the cost of a method alone). Paired, it is a ratio: time × baseline."]
    if report.published:
        key, rows = report.published
        lines += ["", f"Rows \"published: …\" are **published numbers, not measured here** (--published {key}): "
                  "AA as the source reports it, on its own setup.", ""]
        lines += _table(["published", "AA", "source"], [[p.method, f"{p.aa:.1f}", p.source] for p in rows])
    if report.baseline is not None:
        lines += _paired_section(report, report.baseline, measures)
    if study is not None:
        lines += ["", "## Flatness vs forgetting", "", describe(study)
                  + (f" {study.missing} (run, task) pairs lack the measure and are left out." if study.missing else "")]
    if figures_written:
        lines += ["", "## Figures", ""]
        for path in figures_written:
            caption = FIGURE_CAPTIONS.get(path.name, "heatmap of a run's accuracy matrix" if path.parent.name ==
                                          "heatmaps" else f"1-D landscapes of {path.stem[:-3]} from several runs")
            lines.append(f"- [{path.as_posix()}]({path.as_posix()}): {caption}")
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {_one_line(note)}" for note in report.notes)]
    lines += ["", "## Skipped incomplete runs (no metrics.json)", ""]
    lines += [f"- {path}" for path in report.skipped] or ["none"]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def _summary_cells(metrics: dict[str, Summary | None]) -> dict[str, str]:
    return {f"{m}_{part}": "" if s is None else _number(getattr(s, part))
            for m, s in metrics.items() for part in SUMMARY_PARTS}


def _methods(runs: list[RunResult] | list[ReferenceRun]) -> str:
    return " ".join(dict.fromkeys(_one_line(run.settings.get("flatness.method", "")) for run in runs))


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
             | {f"{m}_p": _number(t_test_p(s)) for m, s in c.metrics.items() if m in TESTED and s is not None}
             | {f"{m}_p_holm": _number(q) for m, q in c.p_holm.items()}
             for c in report.paired]
    for ref in report.references:
        rows.append(summary_row("reference", ref, ref.seeds, {"AA": ref.mean}))
        rows += [{"kind": "reference_run", "group": ref.label, "run": run.name, "path": str(run.path),
                  "seed": run.seed, "method": _methods([run]), "tasks": sequence_label(run.tasks), "n": 1,
                  "AA": _number(run.mean)} for run in ref.runs]
    if report.published:
        rows += [{"kind": "published", "group": f"published: {p.method}", "AA_mean": repr(p.aa), "source": p.source}
                 for p in report.published[1]]
    rows = [{key: _one_line(value) if isinstance(value, str) else value for key, value in row.items()} for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(report: Report, out: str | os.PathLike[str], flatness_measure: str = "auto") -> list[Path]:
    """DIR/report.md, DIR/report.csv and the figures (cl_flat.report.figures; paired_differences.png only
    with a baseline and a pair, flatness_forgetting.png only with sharpness entries, landscapes/ only for a
    task with 1-D landscapes in several runs) and DIR/heatmaps/<run>.png; every file written atomically,
    figures drawn only from the files read. Returns the paths written, report.csv and report.md last."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out}: exists and is not a folder")
    study = flatness_forgetting(report, flatness_measure)
    heatmaps = [out / "heatmaps" / f"{run.name}.png" for run in report.runs]
    for run, png in zip(report.runs, heatmaps):
        plots.plot_acc_matrix(RunDir(run.path).matrix_path, png)
    written = [out / "op_curves.png", out / "metrics_bars.png"]
    figures.plot_op_curves(report.groups, written[0])
    bars = tuple(m for m in report.measures if m in figures.BAR_METRICS or m in FLATNESS_KEYS)
    figures.plot_metric_bars(report.groups, bars, written[1])
    if report.baseline is not None and any(c.seeds for c in report.paired):
        written.append(out / "paired_differences.png")
        figures.plot_paired_forest(report.paired, paired_differences(report.measures), _one_line(report.baseline.label),
                                   written[-1])
    if study is not None and study.points:
        written.append(out / "flatness_forgetting.png")
        figures.plot_flatness_forgetting(study, written[-1])
    landscapes, notes = figures.plot_landscape_overlays(report.runs, out)
    report.notes.extend(notes)
    written += landscapes + heatmaps
    atomic_write_text(out / "report.csv", render_csv(report))
    atomic_write_text(out / "report.md", render_markdown(report, [p.relative_to(out) for p in written], study))
    return [*written, out / "report.csv", out / "report.md"]
