"""Prints the README's two tables (python3 runs_table.py, from this folder). Per run, from runs/: AA, BWT, F, FWT
from metrics.json; forgetting R[i,i] − R[T,i] from acc_matrix.csv; λ_max and worst-case sharpness of each
task's minimum right after training it, for the tasks before the last (landscape/sharpness.json, as the
report reads them: where a later measurement replaced an early one, e.g. none seed 1's sst2 λ_max). Per
group, from report.csv: mean ± 95% half-width of AA, BWT, FWT_alone, gap_joint, λ_max, the paired ΔAA, ΔBWT,
Δλ_max (bold: the interval excludes 0 alone) and time × none."""

import csv
import json
import math
import re
from pathlib import Path

ORDER = ["none", "sam", "bilora", "flat_lora", "rwp", "gsam", "looksam", "cflat"]


def number(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}".replace("-", "−")


def row(run: Path) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    with (run / "acc_matrix.csv").open() as handle:
        matrix = {line["after_task"]: line for line in csv.DictReader(handle)}
    tasks = [task for task in matrix if task != "zero_shot"]
    earlier, last = tasks[:-1], tasks[-1]
    forgetting = [float(matrix[t][t]) - float(matrix[last][t]) for t in earlier]
    sharpness = json.loads((run / "landscape" / "sharpness.json").read_text())
    method, seed = re.fullmatch(r"real-cpu-(.+)-s(\d+)", run.name).groups()
    cells = [f"{method}, seed {seed}", number(metrics["AA"], 2), number(metrics["BWT"]), number(metrics["F"]),
             number(metrics["FWT"]), " / ".join(number(f) for f in forgetting),
             " / ".join(number(sharpness[t]["lambda_max"]) for t in earlier),
             " / ".join(number(sharpness[t]["worst"], 2) for t in earlier)]
    return "| " + " | ".join(cells) + " |"


def cell(line: dict, measure: str, form: str = ".2f", paired: bool = False) -> str:
    """mean ± half-width of a report.csv row's summary columns (n = 1: the mean); bold where a paired interval
    excludes 0."""
    if not line.get(f"{measure}_mean"):
        return "—"
    low, high = float(line[f"{measure}_ci_low"] or "nan"), float(line[f"{measure}_ci_high"] or "nan")
    mean, half = float(line[f"{measure}_mean"]), (high - low) / 2
    text = f"{mean:+{form}}" if paired else f"{mean:{form}}"
    text = (text if math.isnan(half) else f"{text} ± {half:{form}}").replace("-", "−")
    return f"**{text}**" if paired and (low > 0 or high < 0) else text


def groups_table() -> list[str]:
    with open("report.csv") as handle:
        rows = list(csv.DictReader(handle))
    paired = {row["method"]: row for row in rows if row["kind"] == "paired"}
    lines = []
    for row in sorted((r for r in rows if r["kind"] == "group"), key=lambda r: ORDER.index(r["method"])):
        other = paired.get(row["method"])
        cells = [row["method"], row["n"], cell(row, "AA"), cell(row, "BWT"), cell(row, "FWT_alone"),
                 cell(row, "gap_joint"), cell(row, "lambda_max", ".3g"),
                 *(("—",) * 4 if other is None else (cell(other, "AA", paired=True), cell(other, "BWT", paired=True),
                                                     cell(other, "lambda_max", ".3g", paired=True),
                                                     cell(other, "time_ratio")))]
        lines.append("| " + " | ".join(cells) + " |")
    for row in sorted((r for r in rows if r["kind"] == "reference"), key=lambda r: "joint" in r["group"]):
        lines.append(f"| {row['group']} | {row['n']} | {cell(row, 'AA')} (mean of "
                     f"{'P_i' if 'per_task' in row['group'] else 'J_i'}) |" + " — |" * 8)
    return lines


def key(run: Path) -> tuple[int, int]:
    method, seed = re.fullmatch(r"real-cpu-(.+)-s(\d+)", run.name).groups()
    return ORDER.index(method) if method in ORDER else len(ORDER), int(seed)


runs = [run for run in Path("runs").iterdir() if re.fullmatch(r"real-cpu-.+-s\d+", run.name)]
print("\n".join([*(row(run) for run in sorted(runs, key=key)), "", *groups_table()]))
