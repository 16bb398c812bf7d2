"""Prints the README's per-run table from runs/ (python3 runs_table.py, from this folder): AA, BWT, F, FWT
from metrics.json; forgetting R[i,i] − R[T,i] from acc_matrix.csv; λ_max and worst-case sharpness of each
task's minimum right after training it (metrics.json `sharpness`), for the tasks before the last."""

import csv
import json
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


def key(run: Path) -> tuple[int, int]:
    method, seed = re.fullmatch(r"real-cpu-(.+)-s(\d+)", run.name).groups()
    return ORDER.index(method) if method in ORDER else len(ORDER), int(seed)


runs = [run for run in Path("runs").iterdir() if re.fullmatch(r"real-cpu-.+-s\d+", run.name)]
for run in sorted(runs, key=key):
    print(row(run))
