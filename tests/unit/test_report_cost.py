"""`cl-flat report`'s cost: seconds_per_update, the median time of one update read from train_log.jsonl
(differences of consecutive records of a task; a resumed task restarts the clock), per group, and paired as
a ratio to the baseline (time × baseline). Expected numbers worked out by hand below."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cl_flat.report import build_report, render_markdown, write_report
from cl_flat.report.runs import ReportInputError
from report_runs import RUNS, SAM, SEQUENCE, make_run

T975_1 = 12.706205  # t_{0.975, 1} = tan(0.475 π)


def _log(*tasks: list[float]) -> list[dict]:
    """Records of consecutive updates: one list of `seconds` (time since the task's loop started) per task."""
    return [{"task": SEQUENCE[i], "task_index": i, "step": step, "loss": 0.5, "seconds": seconds}
            for i, times in enumerate(tasks) for step, seconds in enumerate(times, start=1)]


LOGS = {
    ("none", 1): _log([3.0, 5.0, 7.0], [2.5, 4.5, 6.5]),       # every update 2 s
    ("none", 2): _log([4.0, 7.0, 10.0], [3.5, 6.5, 9.5]),      # 3 s
    ("sam", 1): _log([5.0, 9.2, 13.4], [4.5, 8.7, 12.9]),      # 4.2 s
    # 5.7 s, and killed after update 2 of task 2: the resumed process's clock restarts, its first record
    # (7.0 s, with its warm-up) follows 11.7: a difference of −4.3 among five of 5.7, left out by the median
    ("sam", 2): _log([6.0, 11.7, 17.4], [6.0, 11.7, 7.0, 12.7]),
}


def _runs(root: Path, logs: dict, cut: bool = False) -> Path:
    for (method, seed), records in logs.items():
        after_1, after_2, metrics = RUNS[(method, seed)]
        folder = make_run(root, f"{method}-s{seed}", seed, SAM if method == "sam" else {"method": "none"},
                          [after_1, after_2], metrics)
        if records is not None:
            text = "".join(json.dumps(r) + "\n" for r in records)
            (folder / "train_log.jsonl").write_text(text + ('{"task": "food_sen' if cut else ""))
    return root


def test_seconds_per_update_per_group_and_time_ratio_paired(tmp_path: Path):
    report = build_report([str(_runs(tmp_path / "r", LOGS, cut=True))])  # a line a kill cut short: skipped
    assert report.measures[-1] == "seconds_per_update"
    none, sam = report.groups
    assert [run.metrics["seconds_per_update"] for run in none.runs] == [2.0, 3.0]
    assert [run.metrics["seconds_per_update"] for run in sam.runs] == [pytest.approx(4.2), pytest.approx(5.7)]
    assert none.metrics["seconds_per_update"].mean == pytest.approx(2.5)
    # time × none per seed: 4.2/2 = 2.1, 5.7/3 = 1.9: mean 2.0, s = √0.02, h = t·√0.02/√2 = t·0.1
    (paired,) = report.paired
    ratio = paired.metrics["time_ratio"]
    assert (ratio.n, ratio.mean) == (2, pytest.approx(2.0))
    assert ratio.half_width == pytest.approx(T975_1 * 0.1, rel=1e-6)
    assert "seconds_per_update" not in paired.metrics  # a ratio, never a difference of seconds
    text = render_markdown(report)
    assert "| time × baseline |" in text and "| 2.00 ± 1.27 |" in text and "Δseconds_per_update" not in text
    assert "time × baseline 2.00 ± 1.27" in text and "seconds_per_update: the median time of one" in text


def test_cost_columns_of_report_csv(tmp_path: Path):
    out = tmp_path / "out"
    write_report(build_report([str(_runs(tmp_path / "r", LOGS))]), out)
    rows = list(csv.DictReader((out / "report.csv").open()))
    run = next(r for r in rows if r["run"] == "sam-s1")
    assert float(run["seconds_per_update"]) == pytest.approx(4.2)
    group = next(r for r in rows if r["kind"] == "group" and r["method"] == "none")
    assert float(group["seconds_per_update_mean"]) == pytest.approx(2.5) and group["time_ratio_mean"] == ""
    paired = next(r for r in rows if r["kind"] == "paired")
    assert float(paired["time_ratio_mean"]) == pytest.approx(2.0) and paired["seconds_per_update_mean"] == ""


def test_runs_without_a_log_have_no_cost_and_a_malformed_log_is_named(tmp_path: Path):
    report = build_report([str(_runs(tmp_path / "none", {key: None for key in LOGS}))])
    assert "seconds_per_update" not in report.measures  # no run has a log: no column
    partial = build_report([str(_runs(tmp_path / "partial", LOGS | {("sam", 2): None}))])
    none, sam = partial.groups
    assert sam.metrics["seconds_per_update"] is None  # undefined in one run: undefined for the group
    assert partial.paired[0].metrics["time_ratio"] is None  # a pair without it: never averaged away
    assert render_markdown(partial).split("## Paired")[1].splitlines()[6].endswith("| — |")  # its time × none
    bad = _runs(tmp_path / "bad", LOGS)
    (bad / "sam-s1" / "train_log.jsonl").write_text('{"task_index": 0, "step": 1, "seconds": 1}\n[1, 2]\n')
    with pytest.raises(ReportInputError, match=r"sam-s1/train_log.jsonl:2: expected an update's record"):
        build_report([str(bad)])
