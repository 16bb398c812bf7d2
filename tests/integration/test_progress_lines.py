"""Without a terminal (nohup, SLURM, a log file) a run says what it is doing: a line before the model loads,
plain progress lines of training and of every evaluation, each ending with its total and duration, and a
line before and after each flatness measurement."""

from __future__ import annotations

import re

import pytest

from helpers import one_task_config, run_cli

pytestmark = pytest.mark.integration


def test_a_run_without_a_terminal_prints_progress_lines(tmp_path):
    config = one_task_config(tmp_path, "plain")
    proc = run_cli(["train", str(config), "--set", "logging.progress=true", "--set", "training.max_steps=2"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    expected = ["loading tiny-random:llama ...",
                "evaluate 1 task(s), zero-shot: 4 examples",
                r"evaluate 1 task\(s\), zero-shot: 4/4 examples, done in \d+s",
                "t1: 2 updates", r"t1: 2/2 updates, loss \d+\.\d{4}, done in \d+s",
                "evaluate 1 task(s), after t1: 4 examples",
                r"evaluate 1 task\(s\), after t1: 4/4 examples, done in \d+s",
                "flatness of t1 after t1: sharpness, Hessian on 4 held-out examples ...",
                r"flatness of t1 after t1: done in \d+s"]
    found = iter(lines)
    for pattern in expected:  # in this order, other lines between them allowed
        assert any(re.fullmatch(pattern if "\\" in pattern else re.escape(pattern), line) for line in found), \
            (pattern, lines)
