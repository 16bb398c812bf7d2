"""`cl-flat train RUN_DIR --resume` (or RUN_DIR/config.yaml): the run's saved config, no overrides retyped,
from any working directory, and wandb continues the run's own id."""

from __future__ import annotations

import pytest
import yaml

from helpers import assert_clean_failure, one_task_config, run_cli

pytestmark = pytest.mark.integration


def test_resume_from_the_run_folder_continues_its_wandb_run(tmp_path):
    config = one_task_config(tmp_path, "moved")
    proc = run_cli(["train", str(config), "--set", "logging.wandb.mode=offline", "--set", "training.max_steps=2"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "results" / "moved"
    wandb_id = yaml.safe_load((run / "config.yaml").read_text())["meta"]["wandb_run_id"]
    matrix = (run / "acc_matrix.csv").read_text()
    (run / "metrics.json").unlink()  # a started run again: its last task is retrained
    (run / "acc_matrix.csv").write_text("".join(matrix.splitlines(keepends=True)[:2]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for target in (run, run / "config.yaml"):
        resumed = run_cli(["train", str(target), "--resume"], cwd=elsewhere)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (run / "acc_matrix.csv").read_text() == matrix  # overrides kept: max_steps=2 retrained alike
        assert not (elsewhere / "results").exists()
        (run / "metrics.json").unlink()
        (run / "acc_matrix.csv").write_text("".join(matrix.splitlines(keepends=True)[:2]))
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 3 and all(name.endswith(f"-{wandb_id}") for name in offline), (offline, wandb_id)


def test_a_folder_without_config_yaml_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_cli(["train", str(tmp_path / "empty"), "--resume"], cwd=tmp_path),
                         f"{tmp_path / 'empty'}: is a folder without config.yaml", code=2)
