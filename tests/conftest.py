"""Shared fixtures; the helpers they use live in helpers.py (pytest would collect test_* functions here).
Every test is marked by where it lives, that is by what it starts: `unit` (tests/unit: no subprocess, no
process group, no DeepSpeed engine) or `integration` (tests/integration: the rest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_jsonl_task

TESTS = Path(__file__).resolve().parent
MARK_OF_FOLDER = {"unit": pytest.mark.unit, "integration": pytest.mark.integration}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.resolve()
        parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()  # examples/ has its own
        if len(parts) > 1 and parts[0] in MARK_OF_FOLDER:
            item.add_marker(MARK_OF_FOLDER[parts[0]])


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


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict]:
    """A small valid one-task config in tmp_path (relative data paths, output under tmp_path): (tmp_path, raw)."""
    task = write_jsonl_task(tmp_path, "senti", ["pos", "neg"], n_train=4, n_test=2)
    task.update(train="senti_train.jsonl", test="senti_test.jsonl")
    raw = {
        "run": {"name": "clitest", "output_dir": str(tmp_path / "results"), "seed": 3},
        "model": {"name_or_path": "tiny-random:llama"},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "tasks": [task],
        "training": {"max_steps": 1, "micro_batch_size": 2},
        "evaluation": {"max_samples_per_task": 2, "batch_size": 4},
        "logging": {"progress": False},
    }
    return tmp_path, raw


@pytest.fixture
def cli_here(capfd, monkeypatch):
    """`cl-flat ARGS` through cl_flat.cli.main in this process, run in `cwd` (a traceback escapes as an
    exception): what helpers.run_cli gives, without a Python start, for commands that start nothing."""
    from cl_flat.cli import main

    for name in ("TOKENIZERS_PARALLELISM", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):  # main() sets them
        monkeypatch.setenv(name, "false" if name == "TOKENIZERS_PARALLELISM" else "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["cl-flat", *args])
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capfd.readouterr()
        code = exit_info.value.code
        return subprocess.CompletedProcess(["cl-flat", *args], code if isinstance(code, int) else
                                           (0 if code is None else 1), out, err)

    return run
