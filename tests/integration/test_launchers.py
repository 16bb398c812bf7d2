"""The launch scripts: launch/deepspeed.sh in DeepSpeed's --no_ssh multi-node mode and launch/torchrun.sh,
each running a real 2-rank tiny run on this CPU (gloo); the SLURM scripts' hostfile and commands with a
stubbed `scontrol` and DRY_RUN=1 (no SLURM here)."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, free_port, quiet_env

pytestmark = pytest.mark.integration

LAUNCH = ROOT / "launch"


def tiny_two_task_config(tmp_path: Path, tiny_config: dict) -> Path:
    """The tiny_config fixture with 2 updates per task and micro-batch 2: 2 × 2 accumulation × 2 ranks
    gives a global batch of 8."""
    tiny_config["training"].update({"max_steps": 2, "micro_batch_size": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


def run_script(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    # without the SLURM variables of a job the tests may themselves run in: only the fake ones count
    base = {k: v for k, v in quiet_env().items() if not k.startswith("SLURM")}
    return subprocess.run(["bash", *args], cwd=cwd, env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout)


def printed_commands(stdout: str) -> list[list[str]]:
    """The commands a script printed before running them (`+ ...`, shell-quoted)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def check_two_rank_results(run_dir: Path) -> None:
    tasks = ["t1", "t2"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["meta"]["world_size"] == 2
    assert saved["meta"]["global_batch"] == 2 * 2 * 2
    rows = list(csv.reader((run_dir / "acc_matrix.csv").open()))
    assert rows[0] == ["after_task", *tasks]
    assert [r[0] for r in rows[1:]] == ["zero_shot", *tasks]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"AA", "BWT", "FWT", "F", "AIA", "OP"} and len(metrics["OP"]) == 2
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in log] == [(t, s) for t in tasks for s in (1, 2)]
    for task in tasks:
        assert (run_dir / "adapters" / task / "adapter_model.safetensors").is_file()
    assert (run_dir / "plots" / "acc_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_deepspeed_launcher_no_ssh_with_a_localhost_hostfile(tmp_path, tiny_config):
    """What node 0 of a cluster without ssh runs, here with one node of 2 slots."""
    config = tiny_two_task_config(tmp_path, tiny_config)
    (tmp_path / "hostfile").write_text("# one node, two ranks\nlocalhost slots=2\n")
    port = free_port()
    env = {"PYTHON": sys.executable, "HOSTFILE": "hostfile", "NO_SSH": "1", "NODE_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = run_script([str(LAUNCH / "deepspeed.sh"), str(config)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert printed_commands(proc.stdout)[0] == [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--no_ssh", "--node_rank", "0",
        "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank", "--module", "cl_flat.cli",
        "train", str(config)]
    check_two_rank_results(tmp_path / "results" / "tiny")


def test_torchrun_script_two_processes(tmp_path, tiny_config):
    config = tiny_two_task_config(tmp_path, tiny_config)
    proc = run_script([str(LAUNCH / "torchrun.sh"), "2", str(config), "--set", "run.name=tr"], cwd=tmp_path,
                      env={"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert printed_commands(proc.stdout)[0] == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "-m", "cl_flat.cli", "train", str(config), "--set", "run.name=tr"]
    check_two_rank_results(tmp_path / "results" / "tr")


def test_deepspeed_script_refuses_an_incomplete_no_ssh_setup(tmp_path):
    proc = run_script([str(LAUNCH / "deepspeed.sh"), "c.yaml"], cwd=tmp_path, env={"NO_SSH": "1", "DRY_RUN": "1"})
    assert proc.returncode == 2 and "NO_SSH=1 needs HOSTFILE NODE_RANK MASTER_ADDR" in proc.stderr
    proc = run_script([str(LAUNCH / "deepspeed.sh"), "c.yaml"], cwd=tmp_path, env={"HOSTFILE": "absent"})
    assert proc.returncode == 2 and "HOSTFILE=absent: no such file" in proc.stderr


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """A 2-node allocation as the batch script sees it, with an `scontrol` that lists the two nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || exit 1\n'
                        "echo gpu-07\necho gpu-08\n")
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{quiet_env()['PATH']}", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NNODES": "2",
            "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "16",
            "PYTHON": "/opt/venv/bin/python", "DRY_RUN": "1"}


def test_slurm_deepspeed_builds_the_hostfile_and_runs_each_node_without_ssh(tmp_path, fake_slurm):
    hostfile = tmp_path / "hosts"
    env = {**fake_slurm, "SLURM_GPUS_PER_NODE": "h100:4", "HOSTFILE": str(hostfile)}
    proc = run_script([str(LAUNCH / "slurm_deepspeed.sbatch"), "configs/quickstart.yaml", "--set", "run.seed=3"],
                      cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert hostfile.read_text() == "gpu-07 slots=4\ngpu-08 slots=4\n"
    assert f"# hostfile {hostfile}\ngpu-07 slots=4\ngpu-08 slots=4\n" in proc.stdout
    srun, node0 = printed_commands(proc.stdout)
    assert srun == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--cpus-per-task", "16",
                    "env", "PYTHON=/opt/venv/bin/python", f"HOSTFILE={hostfile}", "MASTER_ADDR=gpu-07",
                    "MASTER_PORT=29500", "NO_SSH=1", str(LAUNCH / "deepspeed.sh"), "configs/quickstart.yaml",
                    "--set", "run.seed=3"]
    assert node0 == ["/opt/venv/bin/python", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                     "--no_ssh", "--node_rank", "0", "--master_addr", "gpu-07", "--master_port", "29500",
                     "--no_local_rank", "--module", "cl_flat.cli", "train", "configs/quickstart.yaml",
                     "--set", "run.seed=3"]
    # the second node's task finds its rank from its name's line in the hostfile
    proc = run_script([str(LAUNCH / "deepspeed.sh"), "c.yaml"], cwd=tmp_path,
                      env={"HOSTFILE": str(hostfile), "NO_SSH": "1", "SLURMD_NODENAME": "gpu-08",
                           "MASTER_ADDR": "gpu-07", "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    command = printed_commands(proc.stdout)[0]
    assert command[command.index("--node_rank") + 1] == "1"


def test_slurm_deepspeed_with_ssh_and_no_gpu_count(tmp_path, fake_slurm):
    """SSH=1: one launcher on the first node; without a GPU count (and an nvidia-smi that finds no GPU)
    one slot per node."""
    nvidia_smi = tmp_path / "bin" / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    nvidia_smi.chmod(0o755)
    hostfile = tmp_path / "hosts"
    env = {**fake_slurm, "SSH": "1", "HOSTFILE": str(hostfile)}
    proc = run_script([str(LAUNCH / "slurm_deepspeed.sbatch"), "configs/quickstart.yaml"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert hostfile.read_text() == "gpu-07 slots=1\ngpu-08 slots=1\n"
    launcher, node0 = printed_commands(proc.stdout)
    assert launcher[0] == "env" and launcher[-2:] == [str(LAUNCH / "deepspeed.sh"), "configs/quickstart.yaml"]
    assert "--no_ssh" not in node0 and node0[node0.index("--master_addr") + 1] == "gpu-07"


def test_slurm_torchrun_rendezvous_on_the_first_node(tmp_path, fake_slurm):
    env = {**fake_slurm, "SLURM_GPUS_PER_NODE": "8", "MASTER_PORT": "29611"}
    proc = run_script([str(LAUNCH / "slurm.sbatch"), "configs/quickstart.yaml"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert printed_commands(proc.stdout) == [[
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--cpus-per-task", "16",
        "/opt/venv/bin/python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-07:29611", "--rdzv_id", "4242",
        "-m", "cl_flat.cli", "train", "configs/quickstart.yaml"]]
