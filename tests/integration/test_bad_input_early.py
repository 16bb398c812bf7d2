"""`cl-flat train` refuses input that only fails once data is loaded (a task smaller than one global batch,
run.output_dir a file) before its results folder is written: exit 2, one message, and the fixed config then
trains (no "started run" left behind)."""

from __future__ import annotations

import pytest

from helpers import assert_clean_failure, run_cli, unchanged, write_jsonl_task, write_yaml

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
