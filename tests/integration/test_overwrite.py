"""`cl-flat train CONFIG --overwrite`: a fresh start where a run of that name exists, whose files go only once
the new config and data are accepted; never together with --resume."""

from __future__ import annotations

import json

import pytest

from helpers import assert_clean_failure, one_task_config, run_cli, unchanged

pytestmark = pytest.mark.integration


def test_overwrite_replaces_a_finished_run_and_a_refused_one_leaves_it(tmp_path):
    config = one_task_config(tmp_path, "again")
    assert run_cli(["train", str(config)], cwd=tmp_path).returncode == 0
    run = tmp_path / "results" / "again"
    assert_clean_failure(run_cli(["train", str(config)], cwd=tmp_path), "replace it with --overwrite")
    (run / "notes-of-the-old-run.txt").write_text("old")
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["train", str(config), "--overwrite", "--set", "training.learning_rate=-1"],
                                     cwd=tmp_path), "training.learning_rate", code=2)
        assert_clean_failure(run_cli(["train", str(config), "--overwrite", "--resume"], cwd=tmp_path),
                             "--resume and --overwrite: choose one")
    proc = run_cli(["train", str(config), "--overwrite", "--set", "training.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "notes-of-the-old-run.txt").exists()
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "step" in r] == [1, 2]  # the new run's updates only
    assert (run / "metrics.json").is_file() and (run / ".lock").is_file()
