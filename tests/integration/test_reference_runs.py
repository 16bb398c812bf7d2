"""`cl-flat train --reference per_task|joint`: their rows, and the measures that need them."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from helpers import run_cli

pytestmark = pytest.mark.integration


def test_reference_runs_and_the_measures_they_give(tmp_path, tiny_config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    results = tmp_path / "results"
    for args in ([], ["--reference", "per_task"], ["--reference", "joint"]):
        proc = run_cli(["train", str(path), *args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    sequence = list(csv.reader((results / "tiny/acc_matrix.csv").open()))
    alone = list(csv.reader((results / "tiny-per_task/reference.csv").open()))
    joint = list(csv.reader((results / "tiny-joint/reference.csv").open()))
    assert [r[0] for r in alone] == ["after_task", "zero_shot", "per_task"]
    assert [r[0] for r in joint] == ["after_task", "zero_shot", "joint"]
    assert alone[1] == sequence[1]  # the same zero-shot row
    # task 1 alone is the sequence's first adapter exactly: same seed, data order and settings
    assert alone[2][1] == sequence[2][1]
    for name, kind in (("tiny-per_task", "per_task"), ("tiny-joint", "joint")):
        meta = yaml.safe_load((results / name / "config.yaml").read_text())["meta"]
        assert meta["reference"] == kind
    log = [json.loads(line) for line in (results / "tiny-joint/train_log.jsonl").read_text().splitlines()]
    assert {r["task"] for r in log} == {"joint"} and len(log) == 3

    proc = run_cli(["metrics", str(results / "tiny/acc_matrix.csv"), "--json", "--per-task-reference",
                    str(results / "tiny-per_task"), "--joint-reference", str(results / "tiny-joint")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)
    R = [[float(v) for v in row[1:]] for row in sequence[2:]]
    P, J = [float(v) for v in alone[2][1:]], [float(v) for v in joint[2][1:]]
    assert measured["FWT_alone"] == pytest.approx(R[1][1] - P[1])  # T = 2: one term
    assert measured["gap_joint"] == pytest.approx((J[0] + J[1]) / 2 - (R[1][0] + R[1][1]) / 2)
    # a sequential run passed as a reference is refused, naming the folder
    proc = run_cli(["metrics", str(results / "tiny/acc_matrix.csv"), "--joint-reference", str(results / "tiny")],
                   cwd=tmp_path)
    assert proc.returncode == 2 and "not a joint reference" in proc.stderr, proc.stderr[-2000:]
    # cl-flat report places both references beside the sequence and measures the sequence against them
    proc = run_cli(["report", str(results), "--out", str(tmp_path / "report")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["kind"] + ":" + r["group"]: r for r in csv.DictReader((tmp_path / "report/report.csv").open())}
    assert float(rows["reference:reference per_task"]["AA_mean"]) == pytest.approx(sum(P) / 2)
    assert float(rows["reference:reference joint"]["AA_mean"]) == pytest.approx(sum(J) / 2)
    group = rows["group:flatness.method=none"]
    assert float(group["FWT_alone_mean"]) == pytest.approx(measured["FWT_alone"])
    assert float(group["gap_joint_mean"]) == pytest.approx(measured["gap_joint"])
