"""Figures of a run's results, never of a model: `draw_*` from results in memory (a run draws its figures
from the rows and log records it just produced), `plot_*` from the saved files (csv/jsonl).

Every figure is written atomically: saved to a temporary .png in the target directory,
then renamed over the target, so an interrupted run never leaves a truncated image.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on CI, clusters and ranks without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cl_flat import matrix_csv, metrics  # noqa: E402
from cl_flat.files import atomic_path, json_lines  # noqa: E402

__all__ = [
    "draw_acc_matrix",
    "draw_op_curve",
    "draw_learning_curves",
    "plot_acc_matrix",
    "plot_op_curve",
    "plot_learning_curves",
    "plot_landscape_1d",
    "plot_landscapes_1d",
    "plot_landscape_2d",
]

PathLike = str | os.PathLike[str]


def save_figure(fig: Figure, out_png: PathLike) -> None:
    """savefig to a temp .png beside the target, then os.replace; always closes the figure."""
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def _nan(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _split_rows(rows: metrics.Rows) -> tuple[list[list[float]], list[float] | None]:
    """(the trained tasks' rows, the zero_shot row or None) of `rows` as acc_matrix.csv orders them."""
    if rows and rows[0][0] == metrics.ZERO_SHOT:
        return [scores for _, scores in rows[1:]], rows[0][1]
    return [scores for _, scores in rows], None


def about_run(config) -> str:
    """What a run's figures are about: its name, flatness method (per-task methods: "per task") and metric."""
    methods = {config.task_flatness(i).method for i in range(len(config.tasks))}
    method = methods.pop() if len(methods) == 1 else "per-task methods"
    return f"{config.run.name} · {method} · {config.metric_label()}"


def _titled(title: str, about: str) -> str:
    """A figure's title, with what it is about (run, method, metric) on a second line."""
    return f"{title}\n{about}" if about else title


def _saved_rows(csv_path: PathLike) -> tuple[list[str], metrics.Rows]:
    tasks, matrix, zero_shot = matrix_csv.read_acc_matrix(csv_path)
    return tasks, ([(metrics.ZERO_SHOT, zero_shot)] if zero_shot is not None else []) + list(zip(tasks, matrix))


def plot_acc_matrix(csv_path: PathLike, out_png: PathLike, about: str = "") -> None:
    """`draw_acc_matrix` of a saved acc_matrix.csv."""
    draw_acc_matrix(*_saved_rows(csv_path), out_png, about)


def draw_acc_matrix(tasks: list[str], score_rows: metrics.Rows, out_png: PathLike, about: str = "") -> None:
    """Heatmap of the accuracy matrix (zero_shot row first if present), cell values annotated."""
    matrix, zero_shot = _split_rows(score_rows)
    rows = ([zero_shot] if zero_shot is not None else []) + matrix
    labels = ([metrics.ZERO_SHOT] if zero_shot is not None else []) + [f"after {t}" for t in tasks]
    data = _nan(rows)
    T = len(tasks)

    finite = data[np.isfinite(data)]
    # Fixed 0..100 (percent) keeps heatmaps of different runs comparable.
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(100.0, float(finite.max())) if finite.size else 100.0
    fig, ax = plt.subplots(figsize=(1.2 * T + 3, 0.8 * len(rows) + 2))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey = not evaluated
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, label="score (%)")
    mid = (vmin + vmax) / 2
    for r in range(data.shape[0]):
        for c in range(T):
            v = data[r, c]
            text = "–" if math.isnan(v) else f"{v:.1f}"
            color = "black" if math.isnan(v) or v > mid else "white"
            ax.text(c, r, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(T), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training")
    ax.set_title(_titled("Score matrix R[t, i] (%)", about))
    save_figure(fig, out_png)


def plot_op_curve(csv_path: PathLike, out_png: PathLike) -> None:
    """`draw_op_curve` of a saved acc_matrix.csv."""
    draw_op_curve(*_saved_rows(csv_path), out_png)


def draw_op_curve(tasks: list[str], rows: metrics.Rows, out_png: PathLike, about: str = "") -> None:
    """OP_t vs t, plus each task's score across rows (t = 0 is the zero-shot row)."""
    matrix, zero_shot = _split_rows(rows)
    T = len(tasks)
    op = metrics.online_performance(matrix)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ts = np.arange(1, T + 1)
    col = _nan(matrix)
    b = _nan([zero_shot])[0] if zero_shot is not None else None
    for i, name in enumerate(tasks):
        ys = col[:, i]
        xs = ts
        if b is not None:
            xs, ys = np.concatenate([[0], ts]), np.concatenate([[b[i]], ys])
        ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.7, label=name)
    ax.plot(ts, op, color="black", linewidth=2.5, marker="o", label="OP$_t$ (seen tasks)")
    ax.set_xticks(range(0 if b is not None else 1, T + 1))
    ax.set_xlabel("after task t" + (" (0 = zero-shot)" if b is not None else ""))
    ax.set_ylabel("score (%)")
    ax.set_title(_titled("Online performance and per-task scores", about))
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, out_png)


def plot_learning_curves(train_log_jsonl: PathLike, out_png: PathLike) -> None:
    """`draw_learning_curves` of a saved train_log.jsonl (errors name its file:line)."""
    path = os.fspath(train_log_jsonl)
    _learning_curves(json_lines(path, error=ValueError), path, out_png)


def draw_learning_curves(records: Sequence[dict[str, Any]], out_png: PathLike, source: str = "train log",
                         about: str = "") -> None:
    """Training loss vs global update (record order), one colour per task: `records` are train_log.jsonl's
    lines (errors name `source`:line)."""
    _learning_curves(enumerate(records, start=1), source, out_png, about)


def _learning_curves(numbered: Iterable[tuple[int, dict[str, Any]]], path: str, out_png: PathLike,
                     about: str = "") -> None:
    by_task: dict[str, tuple[list[int], list[float]]] = {}
    x = 0
    for n, rec in numbered:
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line")
        if "loss" not in rec:
            continue  # non-update events (if any) are not part of the curve
        if "task" not in rec:
            raise ValueError(f"{path}:{n}: update record has no 'task' key")
        try:
            loss = float(rec["loss"]) if rec["loss"] is not None else math.nan
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{n}: 'loss' must be a number, got {rec['loss']!r}") from None
        # 'step' may restart per task, so the global x is the record's order in the log.
        xs, ys = by_task.setdefault(str(rec["task"]), ([], []))
        xs.append(x)
        ys.append(loss)
        x += 1
    if not by_task:
        raise ValueError(f"{path}: no update records with a 'loss' key")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (xs, ys) in by_task.items():  # dict keeps first-appearance (= training) order
        ax.plot(xs, ys, linewidth=1, label=name)
    ax.set_xlabel("global update")
    ax.set_ylabel("training loss")
    ax.set_title(_titled("Learning curves", about))
    ax.legend(title="task", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out_png)


def _read_columns(path: PathLike, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Numeric columns of a csv with a header, selected by name (order-independent)."""
    p = os.fspath(path)
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{p}:1: expected columns {', '.join(columns)}; missing {', '.join(missing)}")
        reader.fieldnames = header
        data: dict[str, list[float]] = {c: [] for c in columns}
        for row in reader:
            if all((v or "").strip() == "" for v in row.values() if isinstance(v, str)):
                continue
            for c in columns:
                try:
                    data[c].append(float(row[c]))
                except (TypeError, ValueError):
                    raise ValueError(f"{p}:{reader.line_num}: column {c!r}: expected a number, "
                                     f"got {row[c]!r}") from None
    if not data[columns[0]]:
        raise ValueError(f"{p}: no data rows")
    return {c: np.array(v, dtype=float) for c, v in data.items()}


def plot_landscape_1d(csv_path: PathLike, out_png: PathLike, about: str = "") -> None:
    """Loss along one direction: csv columns alpha,loss (alpha = 0 is the trained point)."""
    plot_landscapes_1d([(None, csv_path)], out_png,
                       _titled(f"1-D loss landscape: {os.path.basename(os.fspath(csv_path))}", about))


def plot_landscapes_1d(curves: Sequence[tuple[str | None, PathLike]], out_png: PathLike, title: str) -> None:
    """Several 1-D landscapes (csv alpha,loss each) on one axis, one line per (label, csv); a ValueError
    names the file:line of a malformed csv."""
    fig, ax = plt.subplots(figsize=(6, 4) if len(curves) == 1 else (7, 4.5))
    try:
        for label, csv_path in curves:
            d = _read_columns(csv_path, ("alpha", "loss"))
            order = np.argsort(d["alpha"], kind="stable")
            ax.plot(d["alpha"][order], d["loss"][order], marker=".", label=label)
    except ValueError:
        plt.close(fig)
        raise
    ax.axvline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if any(label for label, _ in curves):
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(alpha=0.3)
    save_figure(fig, out_png)


def plot_landscape_2d(csv_path: PathLike, out_png: PathLike, about: str = "") -> None:
    """Loss on a full alpha x beta grid (csv alpha,beta,loss): contour and 3-D surface."""
    p = os.fspath(csv_path)
    d = _read_columns(p, ("alpha", "beta", "loss"))
    alphas, betas = np.unique(d["alpha"]), np.unique(d["beta"])
    if len(alphas) < 2 or len(betas) < 2:
        raise ValueError(f"{p}: a 2-D landscape needs at least 2 distinct alpha and beta values")
    grid = np.full((len(betas), len(alphas)), np.nan)
    ia, ib = np.searchsorted(alphas, d["alpha"]), np.searchsorted(betas, d["beta"])
    grid[ib, ia] = d["loss"]
    if len(d["loss"]) != grid.size or np.isnan(grid).any():
        raise ValueError(f"{p}: expected a full grid of {len(alphas)} x {len(betas)} = {grid.size} "
                         f"(alpha, beta) points, each once; got {len(d['loss'])} rows")
    A, B = np.meshgrid(alphas, betas)
    fig = plt.figure(figsize=(12, 5))
    ax1 = fig.add_subplot(1, 2, 1)
    cs = ax1.contourf(A, B, grid, levels=20, cmap="viridis")
    ax1.contour(A, B, grid, levels=20, colors="k", linewidths=0.3)
    fig.colorbar(cs, ax=ax1, label="loss")
    ax1.plot([0], [0], "r*", markersize=10)  # the trained weights
    ax1.set_xlabel("alpha")
    ax1.set_ylabel("beta")
    ax1.set_title("contour")
    ax2 = fig.add_subplot(1, 2, 2, projection="3d")
    ax2.plot_surface(A, B, grid, cmap="viridis", linewidth=0, antialiased=True)
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("beta")
    ax2.set_zlabel("loss")
    ax2.set_title("surface")
    fig.suptitle(_titled(f"2-D loss landscape: {os.path.basename(p)}", about))
    save_figure(fig, out_png)
