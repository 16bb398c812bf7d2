"""Shared fixtures; the helpers they use live in helpers.py (pytest would collect test_* functions here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_jsonl_task


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict:
    """A 2-task tiny-random run that takes seconds."""
    return {
        "run": {"name": "tiny", "output_dir": str(tmp_path / "results"), "seed": 1},
        "model": {"name_or_path": "tiny-random:llama"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "tasks": [write_jsonl_task(tmp_path / "data", "t1", ["yes", "no"]),
                  write_jsonl_task(tmp_path / "data", "t2", ["red", "blue"])],
        "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3,
                     "learning_rate": 0.01},
        "evaluation": {"max_samples_per_task": 12, "batch_size": 8},
        "deepspeed": {"zero_stage": 0},
        "logging": {"progress": False},
    }
