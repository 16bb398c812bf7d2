"""`cl-flat report`: compare finished runs, grouped over seeds, from their result files only (never a model).

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

report.csv (CSV_COLUMNS): kind (group | run | paired), group (label), baseline (paired rows), run and
path (run rows), seed (group/paired rows: the seeds), method, tasks ("a > b"), n (1, runs, or pairs), M for
M in AA BWT FWT F AIA (run rows), M_mean, M_std, M_ci_low, M_ci_high (group and paired rows); README
"Comparing runs" explains each. An empty cell is undefined, never 0.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import yaml

from cl_flat import plots  # selects matplotlib's headless Agg backend before any figure exists
from cl_flat.config import FlatnessAdapter, config_to_dict
from cl_flat.errors import MatrixFormatError, UserError
from cl_flat.files import atomic_path, atomic_write_text
from cl_flat.metrics import read_acc_matrix
from cl_flat.overrides import dotted_keys
from cl_flat.rundir import RunDir
from cl_flat.stats import Summary, summarize, summarize_defined

METRICS = ("AA", "BWT", "FWT", "F", "AIA")
BAR_METRICS = ("AA", "BWT", "F")
DEFAULT_BASELINE = "flatness.method=none"
RUN_IDENTITY_KEYS = frozenset({"run.seed", "run.name", "run.output_dir"})
PATH_OR_LOGGING_KEY = re.compile(r"logging\..*|tasks\.\d+\.(train|test|data_files)(\..*)?")
UNSET = "(unset)"
SUMMARY_PARTS = ("mean", "std", "ci_low", "ci_high")
CSV_COLUMNS = ["kind", "group", "baseline", "run", "path", "seed", "method", "tasks", "n", *METRICS,
               *(f"{m}_{part}" for m in METRICS for part in SUMMARY_PARTS)]


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
    metrics: dict[str, float | None]   # METRICS; None where metrics.json says null
    op: tuple[float, ...]              # OP_t, t = 1..T


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
        tasks, _, _ = read_acc_matrix(run_dir.matrix_path)
    except MatrixFormatError as exc:
        raise ReportInputError(str(exc)) from None
    configured = [task.name for task in config.tasks]
    if tasks != configured:
        raise ReportInputError(f"{run_dir.matrix_path}: tasks {_sequence(tasks)} differ from those of "
                               f"{run_dir.config_path.name} ({_sequence(configured)})")
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
                     tuple(float(v) for v in op))


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs different experiments: all but run identity, logging and data file paths."""
    return {k: v for k, v in settings.items() if k not in RUN_IDENTITY_KEYS and not PATH_OR_LOGGING_KEY.fullmatch(k)}


_sequence = " > ".join  # ("a", "b") -> "a > b"
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
            FlatnessAdapter.validate_python({"method": values["flatness.method"]}).model_dump(mode="json"), "flatness.")
        label = ", ".join(f"{k}={_format_value(values[k])}" for k in label_keys
                          if k in values and not (k in only_present and defaults.get(k, UNSET) == values[k]))
        steps = range(min(len(run.op) for run in members))
        metrics = {m: summarize_defined([run.metrics[m] for run in members]) for m in METRICS}
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
    pairs = {m: [(mine[s].metrics[m], theirs[s].metrics[m]) for s in seeds] for m in METRICS}
    return PairedComparison(group, seeds, {m: summarize_defined([None if a is None or b is None else a - b
                                                                 for a, b in pairs[m]]) for m in METRICS})


def build_report(inputs: Sequence[str], group_by: str | None = None, baseline: Sequence[str] = (),
                 allow_mixed: bool = False) -> Report:
    """Read and compare the runs named by `inputs`; raises ReportInputError before anything is written."""
    keys = None if group_by is None else [key.strip() for key in group_by.split(",")]
    if keys is not None and not all(keys):
        raise ReportInputError(f"--group-by {group_by}: expected comma-separated dotted keys, "
                               "e.g. flatness.method,flatness.scope")
    found = find_run_folders(inputs)
    # reference runs (--reference) hold no sequence matrix: listed under "Notes" in report.md, not grouped
    references = [f for f in found if not RunDir(f).matrix_path.exists() and RunDir(f).reference_path.is_file()]
    folders = [f for f in found if f not in references]
    complete = [folder for folder in folders if RunDir(folder).metrics_path.is_file()]
    skipped = [folder for folder in folders if folder not in complete]
    if not complete:
        raise ReportInputError("no complete run (with metrics.json) among " + ", ".join(map(str, skipped)))
    # heatmaps/<name>.png: the folder name, made unique
    names = [f"{f.parent.name}_{f.name}" if [g.name for g in complete].count(f.name) > 1 else f.name for f in complete]
    names = [name if names.index(name) == i else f"{name}_{i}" for i, name in enumerate(names)]
    runs = [load_run(folder, name) for folder, name in zip(complete, names)]
    for run in runs[1:]:  # runs of different task sequences are not comparable
        if run.tasks != runs[0].tasks and not allow_mixed:
            raise ReportInputError(f"runs have different task sequences: {_sequence(runs[0].tasks)} "
                                   f"({runs[0].path}) and {_sequence(run.tasks)} ({run.path}); compare runs of "
                                   "one sequence, or pass --allow-mixed")
    groups = group_runs(runs, keys)
    chosen, notes = choose_baseline(groups, list(baseline))
    if chosen is not None:
        groups = [chosen, *(group for group in groups if group is not chosen)]
    paired = [compare_paired(group, chosen) for group in groups if chosen is not None and group is not chosen]
    for comparison in paired:
        unpaired = sorted(set(comparison.group.seeds) - set(comparison.seeds))
        if unpaired:
            notes.append(f"{comparison.group.label}: seed(s) {', '.join(map(str, unpaired))} not paired "
                         "(no baseline run with that seed, or the seed repeats in a group)")
    notes += [f"{f}: a reference run, not grouped (its measures: cl-flat metrics --per-task-reference / "
              "--joint-reference)" for f in references]
    notes += [f"{group.label}: its runs have different task sequences; OP_t is averaged over the first "
              f"{len(group.op)} tasks only" for group in groups if len({run.tasks for run in group.runs}) > 1]
    return Report(groups, chosen, paired, skipped, notes, f"by {', '.join(keys)}" if keys else Report.grouping)


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "—"
    return f"{summary.mean:.2f} (n=1)" if summary.n == 1 else f"{summary.mean:.2f} ± {summary.half_width:.2f}"


def _tasks_of(runs: list[RunResult]) -> str:
    return " | ".join(dict.fromkeys(_sequence(run.tasks) for run in runs))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: Report) -> str:
    """report.md: groups (mean ± 95% CI half-width), paired differences vs the baseline, notes, skipped runs."""
    sequences = list(dict.fromkeys(run.tasks for run in report.runs))
    mixed = len(sequences) > 1
    lines = ["# cl-flat report", "",
             f"{len(report.runs)} complete run(s) in {len(report.groups)} group(s); "
             + ("task sequences differ (--allow-mixed), see the tasks column." if mixed
                else f"task sequence {_sequence(sequences[0])}."), "",
             "Scores in percent. A cell is mean ± h, the half-width of the 95% confidence interval "
             "(Student t with n − 1 degrees of freedom, h = t·s/√n, s the sample standard deviation). "
             "\"n=1\": one run, no interval. —: undefined (null in metrics.json). A label omits method "
             "parameters at their defaults (cl-flat methods).", "",
             f"## Groups ({report.grouping})", ""]
    lines += _table(["group", "n", "seeds", *(["tasks"] if mixed else []), *METRICS],
                    [[g.label, str(len(g.runs)), " ".join(map(str, g.seeds)), *([_tasks_of(g.runs)] if mixed else []),
                      *(_cell(g.metrics[m]) for m in METRICS)] for g in report.groups])
    if report.baseline is not None:
        lines += ["", f"## Paired difference vs baseline `{report.baseline.label}`", "",
                  "Mean over seeds of (group − baseline) for runs with the same run.seed, ± the 95% CI half-width "
                  "of those differences.", ""]
        lines += _table(["group", "pairs", "seeds", *(f"Δ{m}" for m in METRICS)],
                        [[c.group.label, str(len(c.seeds)), " ".join(map(str, c.seeds)) or "—",
                          *(_cell(c.metrics[m]) for m in METRICS)] for c in report.paired])
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


def _methods(runs: list[RunResult]) -> str:
    return " ".join(dict.fromkeys(str(run.settings.get("flatness.method", "")) for run in runs))


def render_csv(report: Report) -> str:
    """report.csv: the columns of the module docstring (CSV_COLUMNS)."""
    def summary_row(kind: str, group: Group, seeds: list[int], metrics: dict[str, Summary | None]) -> dict[str, Any]:
        return {"kind": kind, "group": group.label, "seed": " ".join(map(str, seeds)), "method": _methods(group.runs),
                "tasks": _tasks_of(group.runs), "n": len(seeds), **_summary_cells(metrics)}

    rows: list[dict[str, Any]] = []
    for group in report.groups:
        rows.append(summary_row("group", group, group.seeds, group.metrics))
        rows += [{"kind": "run", "group": group.label, "run": run.name, "path": str(run.path), "seed": run.seed,
                  "method": _methods([run]), "tasks": _sequence(run.tasks), "n": 1,
                  **{m: _number(run.metrics[m]) for m in METRICS}} for run in group.runs]
    rows += [summary_row("paired", c.group, c.seeds, c.metrics) | {"baseline": report.baseline.label}
             for c in report.paired]
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
