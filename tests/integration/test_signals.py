"""SIGTERM (SLURM, Kubernetes) and SIGINT (Ctrl-C) while a task trains: the update in flight finishes, an
in-task checkpoint is written, stderr says where the run stopped and how to resume, the lock is released,
the exit is 143 / 130; `--resume` then gives the uninterrupted run's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import free_port, quiet_env, run_cli

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, tiny_config: dict) -> Path:
    tiny_config["training"]["max_steps"] = 20  # no checkpoint_every: the stop writes its own
    tiny_config["flatness"] = {"method": "rwp", "scope": "full", "noise_type": "fisher", "noise_std": 0.05}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


def _logged(log: Path, task: str, step: int) -> bool:
    lines = log.read_text().splitlines() if log.exists() else []
    return any(r["task"] == task and r["step"] >= step for r in map(json.loads, lines[:-1]))  # last: maybe cut


def _signalled(args: list[str], cwd: Path, signum: int, nproc: int = 1) -> subprocess.CompletedProcess:
    """`cl-flat ARGS`, sent `signum` once task t2 logged its 3rd update."""
    command = [sys.executable, "-m", "cl_flat.cli", *args]
    if nproc > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                        str(free_port()), "-m"]
    proc = subprocess.Popen(command, cwd=cwd, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not _logged(cwd / "results" / "tiny" / "train_log.jsonl", "t2", 3):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never reached the signal point: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signum)  # every process, as SLURM's scancel and a terminal's Ctrl-C do
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, id="torchrun")])
def test_sigterm_checkpoints_and_resume_gives_the_uninterrupted_run(tmp_path, tiny_config, nproc):
    config = _config(tmp_path, tiny_config)
    reference = tmp_path / "reference"
    reference.mkdir()
    proc = run_cli(["train", str(config)], cwd=reference, nproc=nproc, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"  # the config's output_dir is absolute: the reference moves it
    (run_dir).rename(reference / "tiny")
    stopped = _signalled(["train", str(config), "--set", "run.seed=1"], tmp_path, signal.SIGTERM, nproc)
    assert stopped.returncode == (143 if nproc == 1 else stopped.returncode) != 0, stopped.stderr[-3000:]
    # torchrun itself ends with a traceback of its SignalException; no worker may (none names cl_flat/)
    assert ("Traceback" if nproc == 1 else "cl_flat/") not in stopped.stderr, stopped.stderr[-3000:]
    message = [line for line in stopped.stderr.splitlines() if "stopped by SIGTERM" in line]
    assert len(message) == 1, stopped.stderr[-3000:]
    assert "of 20 of task 't2'; its in-task checkpoint is saved" in message[0], message
    assert message[0].endswith(f"cl-flat train {config} --set run.seed=1 --resume"), message
    assert (run_dir / ".lock").read_text() == "" and not (run_dir / "metrics.json").exists()  # released
    assert len(list((run_dir / "checkpoints" / "t2").glob("update-*"))) == 1
    resumed = run_cli(["train", str(config), "--set", "run.seed=1", "--resume"], cwd=tmp_path, nproc=nproc,
                      timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "acc_matrix.csv").read_text() == (reference / "tiny" / "acc_matrix.csv").read_text()
    steps = [(r["task"], r["step"], r["loss"]) for r in
             map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())]
    expected = [(r["task"], r["step"], r["loss"]) for r in
                map(json.loads, (reference / "tiny" / "train_log.jsonl").read_text().splitlines())]
    assert steps == expected


def test_sigint_stops_with_130(tmp_path, tiny_config):
    config = _config(tmp_path, tiny_config)
    stopped = _signalled(["train", str(config)], tmp_path, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT" in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "results" / "tiny" / ".lock").read_text() == ""  # released: a free lock
