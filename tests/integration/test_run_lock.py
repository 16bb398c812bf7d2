"""One writer per run folder: a second `cl-flat train` on a live run exits 2 at once naming the holder,
a lock left by a dead process is taken over, a failed run releases its lock (--resume works), and a
DeepSpeed build lock left in TORCH_EXTENSIONS_DIR never hangs a run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import assert_clean_failure, free_port, quiet_env, run_cli

pytestmark = pytest.mark.integration


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _log_steps(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["task"], r["step"]) for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())]


def test_a_second_train_on_a_live_run_exits_2_naming_the_holder(tmp_path, tiny_config):
    tiny_config["training"]["max_steps"] = 30  # long enough to overlap the second start
    config = _write(tmp_path, tiny_config)
    run_dir = tmp_path / "results" / "tiny"
    lock = run_dir / ".lock"
    first = subprocess.Popen([sys.executable, "-m", "cl_flat.cli", "train", str(config)], cwd=tmp_path,
                             env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # paused while it holds the lock: the overlap does not depend on timing
        second = run_cli(["train", str(config)], cwd=tmp_path, timeout=120)
        assert_clean_failure(second, f"{run_dir} is in use by cl-flat train (pid {first.pid} on "
                             f"{socket.gethostname()}, since", "choose another run.name", code=2, max_lines=2)
        resumed = run_cli(["train", str(config), "--resume"], cwd=tmp_path, timeout=120)
        assert_clean_failure(resumed, f"pid {first.pid}", code=2)
        first.send_signal(signal.SIGCONT)
        assert first.poll() is None, "the first run ended before the second was refused"
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert _log_steps(run_dir) == [(t, s) for t in ("t1", "t2") for s in range(1, 31)]  # each update once
    assert (run_dir / "metrics.json").exists() and lock.read_text() == ""  # released: a free lock


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, tiny_config):
    run_dir = tmp_path / "results" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text(json.dumps({"command": "cl-flat train", "host": socket.gethostname(),
                                               "pid": 4_000_000, "since": 0}))  # above pid_max: never alive
    proc = run_cli(["train", str(_write(tmp_path, tiny_config))], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "taking over the lock" in line]
    assert len(notes) == 1 and "pid 4000000" in notes[0], proc.stderr
    assert (run_dir / "metrics.json").exists() and (run_dir / ".lock").read_text() == ""


def test_a_failed_run_releases_its_lock_and_resumes(tmp_path, tiny_config):
    tiny_config["flatness"] = {"method": "rwp", "noise_std": 1.0e38}  # the noisy pass overflows: a stop
    tiny_config["training"]["on_nonfinite"] = "stop"
    config = _write(tmp_path, tiny_config)
    run_dir = tmp_path / "results" / "tiny"
    proc = run_cli(["train", str(config)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "non-finite" in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / ".lock").read_text() == ""
    proc = run_cli(["train", str(config), "--resume", "--allow-config-change", "--set", "flatness.noise_std=0.001"],
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "taking over" not in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "metrics.json").exists()


def test_a_bad_input_leaves_no_folder_behind(tmp_path, tiny_config):
    tiny_config["tasks"][1]["train"] = str(tmp_path / "absent.jsonl")
    proc = run_cli(["train", str(_write(tmp_path, tiny_config))], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_stale_deepspeed_build_lock_never_hangs_a_run(tmp_path, tiny_config, nproc):
    """A process killed while DeepSpeed built its CPU op leaves deepspeed_shm_comm/lock; DeepSpeed's
    build then waited on it forever. cl-flat never builds that op: the run completes."""
    extensions = tmp_path / "torch_extensions"
    build = extensions / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    (build / "lock").touch()
    command = [sys.executable, "-m", "cl_flat.cli", "train", str(_write(tmp_path, tiny_config))]
    if nproc > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                        str(free_port()), "-m"]
    env = quiet_env() | {"TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(build) == ["lock"]  # nothing built, nothing waited on
