"""`cl-flat data prepare` in a process of its own, on O-LoRA's source files (tests/fixtures/olora): a
malformed source through the command (exit 2, file:line, nothing written), --tasks on a partial copy
(the selected tasks prepared; a missing one is one error naming its folder), and a preparation killed
mid-way (only a hidden partial folder is left)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import OLORA_BENCHMARK, ROOT, quiet_env, run_cli

pytestmark = pytest.mark.integration


def test_malformed_source_file_exits_2_naming_file_and_line_through_the_cli(tmp_path):
    root = Path(shutil.copytree(OLORA_BENCHMARK, tmp_path / "CL_Benchmark"))
    bad = root / "TC" / "agnews" / "train.json"
    bad.write_text('[\n  {"label": "World", "sentence": "fine"},\n  {"label": "Sports", "sentence": "cut off\n]\n')
    out = tmp_path / "data" / "olora"
    result = run_cli(["data", "prepare", "standard", "--out", str(out), "--source", str(root)], cwd=tmp_path,
                     timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"error: {bad}:3:" in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no partial folder left behind


def test_tasks_of_a_partial_copy_through_the_cli(tmp_path):
    root = Path(shutil.copytree(OLORA_BENCHMARK, tmp_path / "CL_Benchmark"))
    shutil.rmtree(root / "TC" / "dbpedia")
    out = tmp_path / "data" / "olora"
    args = ["data", "prepare", "standard", "--out", str(out), "--source", str(root)]
    missing = run_cli(args + ["--tasks", "dbpedia,amazon"], cwd=tmp_path, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error: {root / 'TC' / 'dbpedia'}: no such folder (task dbpedia)"]
    assert not out.exists()
    result = run_cli(args + ["--tasks", "agnews, amazon"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["agnews", "amazon", "prepared.json"]
    assert f"{out}: standard benchmark, 2 tasks" in result.stdout


def test_a_killed_preparation_leaves_only_a_hidden_partial_folder(tmp_path):
    out = tmp_path / "olora"
    script = ("import os, signal, sys\nfrom cl_flat.data.prepare import prepare_benchmark\n"
              "def die(task, split, rows):\n    if task == 'yahoo': os.kill(os.getpid(), signal.SIGKILL)\n"
              f"prepare_benchmark('standard', {str(out)!r}, {str(OLORA_BENCHMARK)!r}, progress=die)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=quiet_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".olora.") and leftovers[0].name.endswith(".partial")
    assert not (leftovers[0] / "prepared.json").exists()
