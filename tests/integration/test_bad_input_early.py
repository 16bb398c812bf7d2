"""`cl-flat train` refuses input that only fails once data is loaded (a task smaller than one global batch,
run.output_dir a file) before its results folder is written: exit 2, one message, and the fixed config then
trains (no "started run" left behind)."""

from __future__ import annotations

import pytest

from helpers import assert_clean_failure, one_task_config, run_cli, unchanged, write_jsonl_task, write_yaml

pytestmark = pytest.mark.integration


def test_train_refuses_before_writing(tmp_path):
    raw = {"run": {"name": "early", "output_dir": str(tmp_path / "results"), "seed": 1},
           "model": {"name_or_path": "tiny-random:llama"},
           "lora": {"r": 2, "target_modules": ["q_proj"]},
           "tasks": [write_jsonl_task(tmp_path / "data", "t1", ["yes", "no"], 1, 2)],
           "training": {"micro_batch_size": 2, "max_steps": 1},
           "logging": {"progress": False, "wandb": {"mode": "disabled"}}}
    config = write_yaml(tmp_path / "config.yaml", raw)
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["train", str(config)], cwd=tmp_path),
                             "tasks[t1]: 1 training examples are fewer than one global batch", code=2)
    (tmp_path / "results").write_text("a file\n")
    raw["training"]["micro_batch_size"] = 1
    write_yaml(config, raw)
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["train", str(config)], cwd=tmp_path), "is a file, not a folder", code=2)


def test_resume_refuses_a_malformed_log_before_writing(tmp_path):
    config = one_task_config(tmp_path, "log")
    proc = run_cli(["train", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "results" / "log"
    (run / "metrics.json").unlink()  # a started run again
    with (run / "train_log.jsonl").open("a") as log:
        log.write("[1, 2]\n")
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["train", str(config), "--resume"], cwd=tmp_path),
                             "train_log.jsonl:2: expected an update's record", code=2)
