"""wandb sweeps, run: the command lines of a sweep of launch/sweep.yaml's shape, expanded exactly as wandb's
agent does (its own argument formatter, then its macro substitution: helpers.agent_command), train distinct
folders offline, with WANDB_SWEEP_ID unset and set, and reruns in other forms are refused. The overrides and
run names in process: tests/unit/test_sweep_overrides.py."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, agent_command, free_port, grid_points, quiet_env, write_yaml

pytestmark = pytest.mark.integration

SWEEP_FILE = ROOT / "launch" / "sweep.yaml"


def run_line(line: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(line, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def sweep_env(tmp_path: Path, parameters: dict | None = None, run_id: str | None = None) -> dict[str, str]:
    """The environment of the test's command lines: the venv's python and cl-flat first on PATH, wandb offline
    (its server a closed local port, no key); with `run_id`, what a sweep agent adds (WANDB_SWEEP_ID,
    WANDB_RUN_ID and the run's parameters file WANDB_SWEEP_PARAM_PATH)."""
    env = quiet_env()
    env.pop("WANDB_API_KEY", None)
    env |= {"PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}", "WANDB_ERROR_REPORTING": "false",
            "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    if run_id is not None:
        params = tmp_path / "wandb" / "sweep-sweep0001" / f"config-{run_id}.yaml"
        params.parent.mkdir(parents=True, exist_ok=True)
        params.write_text(yaml.safe_dump({k: {"value": v} for k, v in parameters.items()}))
        env |= {"WANDB_SWEEP_ID": "sweep0001", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(params)}
    return env


def assert_trained(proc: subprocess.CompletedProcess, folder: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"results: {folder}" in proc.stdout, proc.stdout[-2000:]
    assert (folder / "metrics.json").is_file()


def assert_refused(proc: subprocess.CompletedProcess, folder: Path) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"{folder} already holds a complete run" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sweep_command_lines_train_distinct_folders_and_reruns_are_refused(tmp_path, tiny_config):
    launch = yaml.safe_load(SWEEP_FILE.read_text())
    tiny_config["training"]["max_steps"] = 2
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config)
    # a sweep of launch/sweep.yaml's shape on the tiny config: its command and its templated run.name
    sweep = copy.deepcopy(launch)
    sweep["command"] = [str(config) if part == "configs/quickstart.yaml" else part for part in launch["command"]]
    sweep["parameters"]["flatness"] = {"values": [{"method": "none"}, {"method": "sam", "rho": 0.1}]}
    sweep["parameters"]["run.seed"] = {"values": [1]}
    first, second = grid_points(sweep)
    results = tmp_path / "results"
    folder_a, folder_b = results / "sweep-none-s1", results / "sweep-sam-rho0.1-s1"

    # by hand (no WANDB_SWEEP_ID): ${args} in one process, ${args_no_equals} under a launcher in 2 processes
    env = sweep_env(tmp_path)
    assert_trained(run_line(agent_command(sweep["command"], first, "args"), tmp_path, env), folder_a)
    launcher = ["${env}", "${interpreter}", "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "cl_flat.cli", "train", str(config), "${args}"]
    proc = run_line(agent_command(launcher, second, "args_no_equals"), tmp_path, env)
    assert_trained(proc, folder_b)
    (wandb_run,) = (folder_a / "wandb").glob("offline-run-*")  # offline: WANDB_MODE beats the sweep's online
    assert b"sweep0001" not in next(wandb_run.glob("run-*.wandb")).read_bytes()
    # every rank's output in its own log; rank 0's holds what it printed to the console
    logs = {rank: (folder_b / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    assert "rank 0 of 2" in logs[0].splitlines()[0] and "rank 1 of 2" in logs[1].splitlines()[0]
    assert "accuracy matrix" in logs[0] and f"results: {folder_b}" in logs[0]
    assert "accuracy matrix" not in logs[1]

    # the same parameters in the other forms name the same folders: refused as reruns
    assert_refused(run_line(agent_command(sweep["command"], first, "args_no_hyphens"), tmp_path, env), folder_a)
    assert_refused(run_line(agent_command(sweep["command"], second, "set"), tmp_path, env), folder_b)

    # under an agent: the template names every swept key, so the name is the by-hand run's: refused
    agent = sweep_env(tmp_path, first, run_id="run0000a")
    assert_refused(run_line(agent_command(sweep["command"], first), tmp_path, agent), folder_a)

    # a template that does not name the swept `flatness` block: the wandb run id makes the name unique, and the
    # run is the agent's wandb run (its id and sweep)
    partial = first | {"run.name": "tiny-{flatness.method}"}
    agent = sweep_env(tmp_path, partial, run_id="run0000a")
    folder_c = results / "tiny-none-run0000a"
    assert_trained(run_line(agent_command(sweep["command"], partial), tmp_path, agent), folder_c)
    (wandb_run,) = (folder_c / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith("-run0000a")
    assert b"sweep0001" in (wandb_run / "run-run0000a.wandb").read_bytes()
    assert_refused(run_line(agent_command(sweep["command"], partial, "args_no_equals"), tmp_path, agent), folder_c)
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in (folder_a, folder_b, folder_c))
