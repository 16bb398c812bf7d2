"""The CLI's refusals that need its real entry point in a subprocess (what a user's shell sees): `train`
on bad input fails with one clear message, a non-zero exit and no traceback, and leaves no completed run
behind; a malformed YAML file is named with its line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_clean_failure, run_cli, write_yaml

pytestmark = pytest.mark.integration


def no_complete_run(tmp_path: Path, raw: dict) -> None:
    run_dir = tmp_path / "results" / raw["run"]["name"]
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "acc_matrix.csv").exists()


def test_validate_malformed_yaml_names_file_and_line(project):
    tmp_path, _ = project
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: a\n bad: 1\n")  # line 3 breaks the block mapping
    result = run_cli(["validate", str(path)], tmp_path, timeout=300)
    assert_clean_failure(result, f"{path}:3", code=2)


# ---------------------------------------------------------------- train: fails before any result


def test_train_missing_data_file(project):
    tmp_path, raw = project
    raw["tasks"][0]["train"] = "absent.jsonl"
    result = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path, timeout=300)
    assert_clean_failure(result, "absent.jsonl")
    no_complete_run(tmp_path, raw)


def test_train_bad_target_module(project):
    tmp_path, raw = project
    raw["lora"]["target_modules"] = ["not_a_module"]
    result = run_cli(["train", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path, timeout=300)
    assert_clean_failure(result, "lora.target_modules", "not_a_module")
    no_complete_run(tmp_path, raw)
