"""`cl-flat report`'s final_drift column: metrics.json's mean_final_drift (probes) summarised per group and as a
paired difference like AA; — for runs without probes. Expected numbers worked out by hand below."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from cl_flat.report import build_report, render_markdown, write_report
from report_runs import RUNS, SAM, make_run

T975_1 = 12.706205  # t_{0.975, 1} = tan(0.475 π)
DRIFT = {("none", 1): -4.0, ("none", 2): -6.0, ("sam", 1): -1.0, ("sam", 2): -2.0}


def _runs(root: Path, drifts: dict) -> Path:
    for (method, seed), drift in drifts.items():
        after_1, after_2, metrics = RUNS[(method, seed)]
        extra = {} if drift is None else {"probes": {"p": {"final_drift": drift}}, "mean_final_drift": drift}
        make_run(root, f"{method}-s{seed}", seed, SAM if method == "sam" else {"method": "none"},
                 [after_1, after_2], metrics | extra)
    return root


def test_final_drift_per_group_and_paired(tmp_path: Path):
    report = build_report([str(_runs(tmp_path / "r", DRIFT))])
    assert report.measures[-1] == "final_drift"
    none, sam = report.groups
    # none [−4, −6]: mean −5, s = √2, h = t·√2/√2 = t
    assert (none.metrics["final_drift"].mean, none.metrics["final_drift"].std) == (-5.0, pytest.approx(math.sqrt(2)))
    assert none.metrics["final_drift"].half_width == pytest.approx(T975_1, rel=1e-6)
    # Δ per seed: −1 − (−4) = 3, −2 − (−6) = 4: mean 3.5, s = √0.5, h = t·√0.5/√2 = t/2
    (paired,) = report.paired
    assert paired.metrics["final_drift"].mean == pytest.approx(3.5)
    assert paired.metrics["final_drift"].half_width == pytest.approx(T975_1 / 2, rel=1e-6)
    text = render_markdown(report)
    assert "final_drift: the mean over a run's probes" in text and "-5.00 ± 12.71" in text
    out = tmp_path / "out"
    write_report(report, out)
    rows = list(csv.DictReader((out / "report.csv").open()))
    group = next(r for r in rows if r["kind"] == "group" and "none" in r["group"])
    assert float(group["final_drift_mean"]) == -5.0
    assert sorted(float(r["final_drift"]) for r in rows if r["kind"] == "run") == [-6.0, -4.0, -2.0, -1.0]


def test_runs_without_probes_show_a_dash(tmp_path: Path):
    report = build_report([str(_runs(tmp_path / "r", {**DRIFT, ("sam", 2): None}))])
    none, sam = report.groups
    assert none.metrics["final_drift"].mean == -5.0 and sam.metrics["final_drift"] is None
    line = next(line for line in render_markdown(report).splitlines() if line.startswith("| flatness.method=sam"))
    assert line.rstrip(" |").endswith("—")
    plain = build_report([str(_runs(tmp_path / "plain", dict.fromkeys(DRIFT)))])
    assert "final_drift" not in plain.measures and "final_drift" not in render_markdown(plain)


def test_a_probe_data_path_does_not_split_groups():
    from cl_flat.report.runs import comparable_settings

    settings = {"probes.0.name": "p", "probes.0.train": "/a/p.jsonl", "probes.0.test": "/a/p_test.jsonl",
                "probes.1.data_files.test": "/a/q.csv", "tasks.0.test": "/a/t.jsonl", "flatness.method": "none"}
    assert comparable_settings(settings) == {"probes.0.name": "p", "flatness.method": "none"}
