"""Metrics against hand-derived values (arithmetic in the comments), and the csv format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cl_flat.errors import MatrixFormatError
from cl_flat.matrix_csv import read_acc_matrix, write_acc_matrix
from cl_flat.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    compute_metrics,
    forgetting,
    forward_transfer,
    online_performance,
)

approx = pytest.approx

# Three tasks. Task 1 peaks at an intermediate row (70 -> 80 -> 60), so forgetting
# (measured from the peak) differs from -BWT (measured from the diagonal).
#               task1 task2 task3
R3 = [
    [70.0, 25.0, 35.0],  # after task 1
    [80.0, 90.0, 40.0],  # after task 2
    [60.0, 85.0, 75.0],  # after task 3
]
B3 = [10.0, 20.0, 30.0]  # zero-shot row b_i

# AA  = (60 + 85 + 75) / 3 = 220/3 = 73.333...
AA3 = 220 / 3
# OP1 = 70/1 = 70; OP2 = (80 + 90)/2 = 85; OP3 = 220/3
OP3 = [70.0, 85.0, 220 / 3]
# AIA = (70 + 85 + 220/3)/3 = (465/3 + 220/3)/3 = 685/9 = 76.111...
AIA3 = 685 / 9
# BWT = ((R31 - R11) + (R32 - R22))/2 = ((60-70) + (85-90))/2 = (-10 - 5)/2 = -7.5
BWT3 = -7.5
# F: i=1: max(R11, R21) = max(70, 80) = 80 -> 80 - 60 = 20
#    i=2: max(R22)      = 90            -> 90 - 85 = 5
#    F = (20 + 5)/2 = 12.5   (while -BWT = 7.5)
F3 = 12.5
# FWT = ((R12 - b2) + (R23 - b3))/2 = ((25-20) + (40-30))/2 = 15/2 = 7.5
FWT3 = 7.5


def test_three_tasks_each_metric() -> None:
    assert average_accuracy(R3) == approx(AA3)
    assert online_performance(R3) == approx(OP3)
    assert average_incremental_accuracy(R3) == approx(AIA3)
    assert backward_transfer(R3) == approx(BWT3)
    assert forgetting(R3) == approx(F3)
    assert forward_transfer(R3, B3) == approx(FWT3)


def test_forgetting_differs_from_negative_bwt() -> None:
    # 12.5 vs 7.5: task 1 is forgotten from its peak (80), not from its diagonal (70).
    assert forgetting(R3) == approx(12.5)
    assert -backward_transfer(R3) == approx(7.5)
    assert forgetting(R3) != approx(-backward_transfer(R3))


def test_forgetting_max_excludes_last_row() -> None:
    # T=2: F = max_{l in {1}} R[l,1] - R[2,1] = 50 - 70 = -20 (a row-T max would give 0).
    R = [[50.0, None], [70.0, 60.0]]
    assert forgetting(R) == approx(-20.0)
    # BWT = R21 - R11 = 70 - 50 = 20
    assert backward_transfer(R) == approx(20.0)


def test_compute_metrics_dict_is_json_ready() -> None:
    m = compute_metrics(R3, B3)
    assert set(m) == {"AA", "BWT", "FWT", "F", "AIA", "OP"}
    assert m["AA"] == approx(AA3)
    assert m["BWT"] == approx(BWT3)
    assert m["FWT"] == approx(FWT3)
    assert m["F"] == approx(F3)
    assert m["AIA"] == approx(AIA3)
    assert m["OP"] == approx(OP3)
    assert isinstance(m["OP"], list)
    # plain Python floats (not numpy scalars), and not rounded: 220/3 keeps all its digits
    assert all(type(m[k]) is float for k in ("AA", "BWT", "FWT", "F", "AIA"))
    assert m["AA"] == 220 / 3
    assert json.loads(json.dumps(m))["F"] == 12.5


def test_single_task_transfer_metrics_are_none() -> None:
    R = [[55.0]]
    m = compute_metrics(R, [40.0])
    # AA = 55/1; OP = [55/1]; AIA = 55/1
    assert m["AA"] == approx(55.0)
    assert m["OP"] == approx([55.0])
    assert m["AIA"] == approx(55.0)
    # undefined, not 0
    assert m["BWT"] is None
    assert m["F"] is None
    assert m["FWT"] is None


def test_empty_upper_triangle_fwt_none_others_computed() -> None:
    R = [
        [70.0, None, None],
        [80.0, 90.0, None],
        [60.0, 85.0, 75.0],
    ]
    m = compute_metrics(R, B3)
    assert m["FWT"] is None  # R12 and R23 were never measured
    # the rest only use the lower triangle: same hand values as R3
    assert m["AA"] == approx(AA3)
    assert m["BWT"] == approx(BWT3)
    assert m["F"] == approx(F3)
    assert m["AIA"] == approx(AIA3)
    assert m["OP"] == approx(OP3)


def test_numpy_input_with_nan_upper_triangle() -> None:
    nan = float("nan")
    R = np.array([[70.0, nan, nan], [80.0, 90.0, nan], [60.0, 85.0, 75.0]])
    m = compute_metrics(R, np.array(B3))
    assert m["FWT"] is None
    assert m["AA"] == approx(AA3)
    assert m["F"] == approx(F3)
    assert type(m["AA"]) is float


def test_fwt_needs_only_its_entries() -> None:
    # R13 and b1 are not used by FWT = ((R12 - b2) + (R23 - b3))/2, so missing them is fine:
    R = [row[:] for row in R3]
    R[0][2] = None
    assert forward_transfer(R, [None, 20.0, 30.0]) == approx(7.5)  # ((25-20)+(40-30))/2
    # ... but a missing b2 or R23 makes FWT undefined
    assert forward_transfer(R3, [10.0, None, 30.0]) is None
    R[1][2] = None
    assert forward_transfer(R, B3) is None
    # and no zero-shot row at all
    assert forward_transfer(R3, None) is None
    assert compute_metrics(R3)["FWT"] is None


def test_per_task_mean_not_per_sample_mean() -> None:
    # Task "big" has 1000 test samples, task "small" has 10. Scores are per-task means.
    R = [
        [90.0, None],  # after big
        [80.0, 20.0],  # after small
    ]
    # Per-task (what the contract says): AA = (80 + 20)/2 = 50
    # Per-sample (the trap): (0.80*1000 + 0.20*10) / (1000 + 10) * 100 = 802/1010*100 = 79.40594...
    per_sample = (0.80 * 1000 + 0.20 * 10) / (1000 + 10) * 100
    assert per_sample == approx(79.40594, abs=1e-4)
    aa = average_accuracy(R)
    assert aa == approx(50.0)
    assert abs(aa - per_sample) > 1.0
    # OP2 = (80 + 20)/2 = 50 too; AIA = (90 + 50)/2 = 70; BWT = 80 - 90 = -10
    assert online_performance(R) == approx([90.0, 50.0])
    assert average_incremental_accuracy(R) == approx(70.0)
    assert backward_transfer(R) == approx(-10.0)


def test_missing_required_entry_is_an_error() -> None:
    R = [row[:] for row in R3]
    R[2][0] = None  # R[3,1]: needed by AA, BWT, F
    with pytest.raises(ValueError, match=r"R\[3,1\]"):
        average_accuracy(R)
    with pytest.raises(ValueError, match=r"R\[3,1\]"):
        forgetting(R)


def test_non_square_matrix_is_an_error() -> None:
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="zero-shot"):
        forward_transfer(R3, [1.0, 2.0])


# ---------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------

GOOD_CSV = """after_task,task1,task2,task3
zero_shot,10,20,30
task1,70,25,35
task2,80,90,40
task3,60,85,75
"""


def test_read_handwritten_csv_and_metrics(tmp_path: Path) -> None:
    p = tmp_path / "acc_matrix.csv"
    p.write_text(GOOD_CSV)
    tasks, R, b = read_acc_matrix(p)
    assert tasks == ["task1", "task2", "task3"]
    assert R == R3
    assert b == B3
    m = compute_metrics(R, b)
    assert (m["AA"], m["BWT"], m["F"], m["FWT"]) == approx((AA3, -7.5, 12.5, 7.5))


def test_read_without_zero_shot_and_empty_cells(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("after_task,a,b\na,70,\nb,80,90\n\n")
    tasks, R, b = read_acc_matrix(p)
    assert tasks == ["a", "b"]
    assert R == [[70.0, None], [80.0, 90.0]]
    assert b is None


def test_csv_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "acc_matrix.csv"
    tasks = ["sentiment", "topics", "agnews"]
    zero = [10.0, 20.0, None]
    rows = [[70.0, 1 / 3, None], [80.0, 90.0, 0.1 + 0.2], [60.0, 85.0, 75.25]]
    write_acc_matrix(p, tasks, [("zero_shot", zero)] + list(zip(tasks, rows)))
    assert p.read_text().splitlines()[:2] == ["after_task,sentiment,topics,agnews",
                                              "zero_shot,10.0,20.0,"]
    got_tasks, got_rows, got_zero = read_acc_matrix(p)
    assert got_tasks == tasks
    assert got_zero == zero
    assert got_rows == rows  # exact: floats are written with full precision
    assert sorted(x.name for x in tmp_path.iterdir()) == ["acc_matrix.csv"]  # no temp left


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    p = tmp_path / "acc_matrix.csv"
    write_acc_matrix(p, ["a"], [("a", [50.0])])
    before = p.read_text()
    with pytest.raises(ValueError):
        write_acc_matrix(p, ["a", "b"], [("a", [50.0, 1.0]), ("b", [1.0])])  # wrong length
    with pytest.raises(ValueError):
        write_acc_matrix(p, ["a"], [("a", [math.inf])])
    assert p.read_text() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["acc_matrix.csv"]


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        # wrong column count on line 3
        ("after_task,a,b\nzero_shot,1,2\na,70,10,5\nb,1,2\n", 3, "expected 3 columns"),
        # non-number on line 3
        ("after_task,a,b\nzero_shot,1,2\na,70,abc\nb,1,2\n", 3, "'abc'"),
        # row name not in task order on line 2
        ("after_task,a,b\nb,70,10\na,1,2\n", 2, "expected row for task 'a'"),
        # missing rows: only one of two trained rows; reported at the last line
        ("after_task,a,b\na,70,10\n", 2, "expected 2 trained rows"),
        # bad header
        ("task,a,b\na,70,10\nb,1,2\n", 1, "after_task"),
        # zero_shot row not first
        ("after_task,a,b\na,70,10\nzero_shot,1,2\nb,1,2\n", 3, "zero_shot"),
        # extra row
        ("after_task,a\na,70\nb,1\n", 3, "extra row"),
        # duplicate task names
        ("after_task,a,a\na,1,2\na,1,2\n", 1, "duplicate"),
        # empty file
        ("", 1, "empty file"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, content: str, line: int,
                                           fragment: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(MatrixFormatError) as exc:
        read_acc_matrix(p)
    msg = str(exc.value)
    assert f"{p}:{line}:" in msg
    assert fragment in msg
    assert isinstance(exc.value, ValueError)


def test_forward_transfer_against_learning_alone_and_the_gap_to_joint_by_hand():
    from cl_flat.metrics import forward_transfer_vs_alone, gap_to_joint

    R = [[80.0, None, None], [60.0, 70.0, None], [50.0, 65.0, 90.0]]
    # FWT_alone = ((70 − 75) + (90 − 84)) / 2 = 0.5 (task 1 is left out)
    assert forward_transfer_vs_alone(R, [80.0, 75.0, 84.0]) == pytest.approx(0.5)
    # gap = mean(J) − AA = (85 + 80 + 90)/3 − (50 + 65 + 90)/3 = 85 − 68.333…
    assert gap_to_joint(R, [85.0, 80.0, 90.0]) == pytest.approx(85.0 - 205.0 / 3)
    assert forward_transfer_vs_alone([[80.0]], [80.0]) is None and gap_to_joint(R, [85.0, None, 90.0]) is None
