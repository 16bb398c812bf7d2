"""A saved adapter that does not read back (weights truncated or garbage, adapter_config.json garbage, saved
with another rank than the config's) stops `cl-flat eval`, `cl-flat landscape` and `cl-flat train --resume`
with one message naming the file and what is wrong: exit 2, no traceback, nothing written."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers import assert_clean_failure, one_task_config, run_cli, unchanged

pytestmark = pytest.mark.integration


def _truncate(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def _rank_two(folder):
    """The adapter cut down to r = 2 (the config says 4), its adapter_config.json too."""
    weights = folder / "adapter_model.safetensors"
    tensors = {k: (v[:2] if ".lora_A." in k else v[:, :2]).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    config = folder / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 2'))


CORRUPTIONS = {
    "truncated weights": (_truncate, "adapters/t1/adapter_model.safetensors: not a readable safetensors file ("),
    "garbage weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage" * 9),
                        "adapters/t1/adapter_model.safetensors: not a readable safetensors file ("),
    "garbage config": (lambda f: (f / "adapter_config.json").write_text("{oops"),
                       "adapters/t1/adapter_config.json: not a readable adapter config ("),
    "another rank": (_rank_two, "adapters/t1: saved with r = 2, the config says r = 4"),
}


def test_a_corrupt_adapter_is_one_message(tmp_path):
    config = one_task_config(tmp_path, "ad", r=4)
    proc = run_cli(["train", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, keep = tmp_path / "results" / "ad", tmp_path / "keep"
    adapter = run / "adapters" / "t1"
    shutil.copytree(adapter, keep / "t1")
    for corrupt, message in CORRUPTIONS.values():
        shutil.rmtree(adapter)
        shutil.copytree(keep / "t1", adapter)
        corrupt(adapter)
        with unchanged(tmp_path):
            assert_clean_failure(run_cli(["eval", str(run)], cwd=tmp_path), message, code=2)
            assert_clean_failure(run_cli(["landscape", str(run), "--task", "t1", "--points", "3"], cwd=tmp_path),
                                 message, code=2)
        (run / "metrics.json").rename(keep / "metrics.json")  # a started run, to resume
        with unchanged(tmp_path):
            assert_clean_failure(run_cli(["train", str(config), "--resume"], cwd=tmp_path), message, code=2)
        (keep / "metrics.json").rename(run / "metrics.json")
