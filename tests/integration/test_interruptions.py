"""kill -9 at any moment, then `--resume`, gives the uninterrupted run: during a task
(checkpoints every update, so a kill often lands inside a checkpoint write), right after a task's
row, and when one of two ranks dies. The runs use RWP with Fisher noise, whose EMA is method state."""

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
    tiny_config["training"].update({"max_steps": 12, "checkpoint_every": 1})
    tiny_config["flatness"] = {"method": "rwp", "scope": "full", "noise_type": "fisher", "noise_std": 0.05}
    tiny_config["deepspeed"]["timeout_minutes"] = 0.5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


def _command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "cl_flat.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "cl_flat.cli", *args]


def _outcome(run_dir: Path) -> tuple[str, list[tuple]]:
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return (run_dir / "acc_matrix.csv").read_text(), [(r["task"], r["step"], r["loss"], r.get("noisy_loss"))
                                                      for r in log]


def _logged(run_dir: Path, task: str, step: int) -> bool:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["task"] == task and record["step"] >= step:
            return True
    return False


def _rows(run_dir: Path) -> int:
    path = run_dir / "acc_matrix.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def _run_until(args, cwd: Path, nproc, ready, kill) -> tuple[int, str]:
    """Start `cl-flat ARGS`, wait until `ready()`, then `kill(proc)`; (exit code, stderr)."""
    with (cwd / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen(_command(args, nproc), cwd=cwd, env=quiet_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, f"finished before the kill point: {(cwd / 'stderr.txt').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
        kill(proc)
    return proc.returncode, (cwd / "stderr.txt").read_text()


def _kill_all(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _worker(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_kill_9_in_a_task_and_between_tasks_resumes_to_the_uninterrupted_run(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config)
    run_dir = tmp_path / "results" / "tiny"
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _outcome(run_dir)
    assert not (run_dir / "checkpoints" / "t1").exists()  # removed once a task's row is written

    for name, ready in (("mid-task", lambda: _logged(run_dir, "t2", 5)),
                        ("after the first row", lambda: _rows(run_dir) >= 2)):
        import shutil

        shutil.rmtree(run_dir)
        _run_until(["train", str(path)], tmp_path, 1, ready, _kill_all)
        assert not (run_dir / "metrics.json").exists(), name
        proc = run_cli(["train", str(path), "--resume"], cwd=tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert _outcome(run_dir) == expected, name


def test_a_dead_rank_ends_the_run_and_resume_completes_it(tmp_path, tiny_config):
    path = _config(tmp_path, tiny_config)
    run_dir = tmp_path / "results" / "tiny"
    proc = run_cli(["train", str(path)], cwd=tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _outcome(run_dir)
    import shutil

    shutil.rmtree(run_dir)
    killed_at = []

    def kill_rank_1(proc):
        os.kill(_worker(proc.pid, 1), signal.SIGKILL)
        killed_at.append(time.monotonic())
        proc.wait(timeout=120)

    code, stderr = _run_until(["train", str(path)], tmp_path, 2, lambda: _logged(run_dir, "t2", 4), kill_rank_1)
    assert code != 0
    assert time.monotonic() - killed_at[0] < 60  # well within deepspeed.timeout_minutes = 0.5 plus start-up
    print(stderr[-3000:])
    assert "rank" in stderr.lower()
    proc = run_cli(["train", str(path), "--resume"], cwd=tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outcome(run_dir) == expected


def test_without_a_launcher_the_survivor_exits_with_one_message(tmp_path, tiny_config):
    """Two processes started by hand (as on nodes without a supervising agent): rank 1 is killed,
    rank 0 ends within deepspeed.timeout_minutes with one message and no traceback."""
    path = _config(tmp_path, tiny_config)
    run_dir = tmp_path / "results" / "tiny"
    port = str(free_port())
    procs, files = [], []
    for rank in (0, 1):
        env = quiet_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        files.append((tmp_path / f"rank{rank}.err").open("w"))
        procs.append(subprocess.Popen(_command(["train", str(path)], 1), cwd=tmp_path, env=env,
                                      stdout=subprocess.DEVNULL, stderr=files[-1]))
    deadline = time.monotonic() + 300
    while not _logged(run_dir, "t2", 4):
        assert procs[0].poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].kill()
    killed = time.monotonic()
    code = procs[0].wait(timeout=120)
    elapsed = time.monotonic() - killed
    for handle in files:
        handle.close()
    stderr = (tmp_path / "rank0.err").read_text()
    assert code == 1 and elapsed < 0.5 * 60 + 30, (code, elapsed, stderr[-2000:])
    assert "rank 0 of 2: a collective failed" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert (run_dir / "acc_matrix.csv").read_text().count("\n") == 3  # header, zero_shot, t1: kept
