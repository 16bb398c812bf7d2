"""`probes:` end to end on a tiny model: a probe is scored at zero-shot and after every task but never trained,
its scores land in probe_matrix.csv and metrics.json's "probes", the run's other results equal those of the
same run without the probe, and a run killed between the two matrix writes resumes to the same files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, write_jsonl_task

pytestmark = pytest.mark.integration


def _train(tmp_path: Path, config: dict, name: str, *extra: str) -> tuple[Path, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config | {"run": config["run"] | {"name": name}}))
    proc = run_cli(["train", str(path), *extra], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "results" / name, proc.stdout


def test_a_probe_is_scored_never_trained_and_resumes(tmp_path, tiny_config):
    tiny_config["evaluation"]["sharpness"] = False  # not what this test is about; saves time
    plain, _ = _train(tmp_path, tiny_config, "plain")
    probe = write_jsonl_task(tmp_path / "data", "p", ["up", "down"], n_train=2, n_test=8)
    config = tiny_config | {"probes": [probe]}
    run_dir, shown = _train(tmp_path, config, "probed")

    rows = list(csv.reader((run_dir / "probe_matrix.csv").open()))
    assert rows[0] == ["after_task", "p"] and [r[0] for r in rows[1:]] == ["zero_shot", "t1", "t2"]
    scores = [float(r[1]) for r in rows[1:]]
    assert all(0 <= s <= 100 for s in scores)
    # 8 test examples: every score is a multiple of 12.5 points
    assert all(s / 12.5 == round(s / 12.5) for s in scores)

    # never trained: no adapter, checkpoint or update of its own; as many updates as the tasks had
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["t1", "t2"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in log] == [(t, s) for t in ("t1", "t2") for s in (1, 2, 3)]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics["probes"]["p"]
    assert entry["zero_shot"] == scores[0] and entry["after_each_task"] == scores[1:]
    assert entry["drift"] == [scores[1] - scores[0], scores[2] - scores[0]]
    assert entry["final_drift"] == scores[2] - scores[0] == metrics["mean_final_drift"]
    assert f"p={scores[2] - scores[0]:+.2f}" in shown.split("final drift")[1], shown  # the console's drift line

    # probes change nothing else: the matrix, the log's losses and every other metric equal the plain run's
    assert (run_dir / "acc_matrix.csv").read_text() == (plain / "acc_matrix.csv").read_text()
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k not in ("probes", "mean_final_drift")} == plain_metrics
    plain_log = [json.loads(line) for line in (plain / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in plain_log]
    assert not (plain / "probe_matrix.csv").exists()

    # killed during task 2 right after probe_matrix.csv got t2's row but before acc_matrix.csv did
    full = {name: (run_dir / name).read_text() for name in ("acc_matrix.csv", "probe_matrix.csv", "metrics.json")}
    (run_dir / "metrics.json").unlink()
    (run_dir / "acc_matrix.csv").write_text("".join(full["acc_matrix.csv"].splitlines(keepends=True)[:3]))
    # the row ahead is dropped and measured again: a stale value there must not survive the resume
    stale = "t2,0.0" if scores[2] != 0.0 else "t2,100.0"
    (run_dir / "probe_matrix.csv").write_text("".join(full["probe_matrix.csv"].splitlines(keepends=True)[:3])
                                              + stale + "\n")
    shutil.rmtree(run_dir / "adapters" / "t2")
    (run_dir / "train_log.jsonl").write_text("".join((run_dir / "train_log.jsonl").read_text()
                                                     .splitlines(keepends=True)[:3]))
    _train(tmp_path, config, "probed", "--resume")
    assert {name: (run_dir / name).read_text() for name in full} == full

    # cl-flat eval: the reproduction check covers the probe; re-scoring scores a probe when --tasks names it
    proc = run_cli(["eval", str(run_dir)], cwd=tmp_path)
    assert "reproduced exactly" in proc.stdout and " p " in proc.stdout, proc.stdout + proc.stderr[-2000:]
    proc = run_cli(["eval", str(run_dir), "--tasks", "p,t2", "--after", "t2", "--name", "probe"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    t2_score = full["acc_matrix.csv"].splitlines()[-1].split(",")[2]  # its t2 column after t2, as saved
    assert (run_dir / "eval" / "probe.csv").read_text().splitlines() == ["after_task,t2,p",
                                                                        f"t2,{t2_score},{scores[2]!r}"]
