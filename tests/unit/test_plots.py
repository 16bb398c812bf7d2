"""Each figure is drawn from small files on disk and saved as a real PNG, atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cl_flat import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ACC_CSV = """after_task,task1,task2,task3
zero_shot,10,20,30
task1,70,25,
task2,80,90,40
task3,60,85,75
"""


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC)
    assert data.startswith(PNG_MAGIC)
    # atomic save: only the final file, no temp files beside it
    assert sorted(x.name for x in path.parent.iterdir()) == [path.name]


@pytest.fixture
def acc_csv(tmp_path: Path) -> Path:
    p = tmp_path / "acc_matrix.csv"
    p.write_text(ACC_CSV)
    return p


def test_plot_acc_matrix(acc_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "acc_matrix.png"  # parent created on demand
    plots.plot_acc_matrix(acc_csv, out)
    assert_png(out)


def test_plot_acc_matrix_without_zero_shot(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("after_task,a,b\na,70,\nb,80,90\n")
    out = tmp_path / "out" / "m.png"
    plots.plot_acc_matrix(p, out)
    assert_png(out)


def test_plot_op_curve(acc_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "op.png"
    plots.plot_op_curve(acc_csv, out)
    assert_png(out)


def test_plot_learning_curves(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    lines = []
    for task, start in (("task1", 2.0), ("task2", 3.0)):
        for step in range(5):  # step restarts per task: x is the line order
            lines.append(json.dumps({"step": step, "task": task, "loss": start / (step + 1),
                                     "lr": 1e-3}))
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "plots" / "learning_curves.png"
    plots.plot_learning_curves(log, out)
    assert_png(out)


def test_plot_learning_curves_bad_line_names_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0, "task": "a", "loss": 1.0}\n{not json\n')
    with pytest.raises(ValueError, match=re.escape(f"{log}:2:")):
        plots.plot_learning_curves(log, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_landscape_1d(tmp_path: Path) -> None:
    p = tmp_path / "task1_1d.csv"
    p.write_text("alpha,loss\n" + "".join(f"{a / 4},{(a / 4) ** 2 + 0.1}\n" for a in range(-4, 5)))
    out = tmp_path / "plots" / "task1_1d.png"
    plots.plot_landscape_1d(p, out)
    assert_png(out)


def test_plot_landscape_2d(tmp_path: Path) -> None:
    p = tmp_path / "task1_2d.csv"
    rows = [f"{a / 2},{b / 2},{(a / 2) ** 2 + 2 * (b / 2) ** 2}"
            for a in range(-2, 3) for b in range(-2, 3)]  # full 5 x 5 grid
    p.write_text("alpha,beta,loss\n" + "\n".join(rows) + "\n")
    out = tmp_path / "plots" / "task1_2d.png"
    plots.plot_landscape_2d(p, out)
    assert_png(out)


def test_plot_landscape_2d_rejects_incomplete_grid(tmp_path: Path) -> None:
    p = tmp_path / "task1_2d.csv"
    p.write_text("alpha,beta,loss\n0,0,1\n0,1,2\n1,0,3\n")  # (1,1) missing
    with pytest.raises(ValueError, match="full grid"):
        plots.plot_landscape_2d(p, tmp_path / "x.png")


def test_a_run_s_figures_name_the_run_its_method_and_metric(acc_csv: Path, tmp_path: Path, monkeypatch) -> None:
    from cl_flat.config import validate_config

    raw = {"run": {"name": "q1-sam-s3"}, "model": {"name_or_path": "tiny-random:llama"},
           "tasks": [{"name": "a", "source": "builtin"}, {"name": "b", "source": "builtin"}],
           "flatness": {"method": "sam", "rho": 0.05}, "evaluation": {"metric": "exact_match"}}
    assert plots.about_run(validate_config(raw)) == "q1-sam-s3 · sam · exact_match"
    raw["tasks"][1]["flatness"] = {"method": "none"}
    assert plots.about_run(validate_config(raw)) == "q1-sam-s3 · per-task methods · exact_match"
    titles = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: titles.append(fig.axes[0].get_title()))
    plots.plot_acc_matrix(acc_csv, tmp_path / "m.png", "q1-sam-s3 · sam · accuracy")
    assert titles == ["Score matrix R[t, i] (%)\nq1-sam-s3 · sam · accuracy"]
