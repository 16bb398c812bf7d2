"""config.yaml's meta fingerprints each local data file: a file changed after training is refused by
`cl-flat eval` and `--resume` (exit 2, naming the file), and recorded as a change under
--allow-config-change."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import assert_clean_failure, one_task_config, run_cli, unchanged

pytestmark = pytest.mark.integration


def test_changed_data_refused_by_eval_and_resume(tmp_path):
    config = one_task_config(tmp_path, "fp")
    proc = run_cli(["train", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "results" / "fp"
    test_file = tmp_path / "data" / "t1_test.jsonl"
    meta = yaml.safe_load((folder / "config.yaml").read_text())["meta"]
    assert set(meta["data_fingerprints"]) == {str(tmp_path / "data" / "t1_train.jsonl"), str(test_file)}

    test_file.write_text(test_file.read_text() + json.dumps({"input": "yes again", "output": "yes"}) + "\n")
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["eval", str(folder)], cwd=tmp_path), f"data {test_file}: sha256", code=2)
    (folder / "metrics.json").unlink()  # a started run again
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["train", str(config), "--resume"], cwd=tmp_path),
                             "--resume: a data file changed", f"data {test_file}: sha256", code=2)
    proc = run_cli(["train", str(config), "--resume", "--allow-config-change"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = yaml.safe_load((folder / "config.yaml").read_text())["meta"]
    assert any(c.startswith(f"data {test_file}: sha256") for entry in meta["config_changes"] for c in entry["changes"])
