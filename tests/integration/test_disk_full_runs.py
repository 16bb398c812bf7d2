"""A run whose results folder is on a small, nearly full file system (a 1 MiB tmpfs and a ballast file): it exits 1
within seconds with one line naming the path, the finished tasks' files intact; once the ballast is deleted,
--resume gives the matrix of an uninterrupted run. With wandb offline too; wandb failing at finish leaves exit 0.
Mounting needs root: without it the tmpfs tests are skipped, and a run whose write is made to fail with ENOSPC
(sitecustomize) stands in for them; tests/unit/test_disk_full.py simulates each write helper's full disk."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import ROOT, assert_clean_failure, quiet_env, write_yaml

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs at tmp_path/fs, unmounted afterwards."""
    folder = tmp_path / "fs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, free_kb: int) -> Path:
    """A ballast file that leaves about `free_kb` KiB free in `folder`'s file system."""
    import os

    stats = os.statvfs(folder)
    ballast = folder / "ballast"
    ballast.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - free_kb * 1024))
    return ballast


def train(config: Path, *args: str, wandb: str = "disabled", pythonpath: Path | None = None):
    env = quiet_env() | {"WANDB_MODE": wandb, "WANDB_ERROR_REPORTING": "false"}
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}:{env.get('PYTHONPATH', '')}"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cl_flat.cli", "train", str(config), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - started


def configs(tmp_path: Path, tiny_config: dict, small: Path) -> tuple[Path, Path]:
    """(the config writing to `small`, the same writing to tmp_path/results): in-task checkpoints every update."""
    tiny_config["training"]["checkpoint_every"] = 1
    reference = write_yaml(tmp_path / "reference.yaml", tiny_config)
    tiny_config["run"]["output_dir"] = str(small)
    return write_yaml(tmp_path / "small.yaml", tiny_config), reference


def matrix_rows(run: Path) -> list[str]:
    path = run / "acc_matrix.csv"
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.parametrize("wandb, free_kb", [("disabled", 40), ("offline", 40), ("disabled", 120)])
def test_a_full_disk_exits_1_naming_the_path_and_resume_gives_the_uninterrupted_matrix(tmp_path, tiny_config,
                                                                                       small_fs, wandb, free_kb):
    # 40 KiB: full at the first in-task checkpoint; 120 KiB: at the last plot, every task's row written
    small, reference = configs(tmp_path, tiny_config, small_fs)
    ballast = fill(small_fs, free_kb)
    full, seconds = train(small, wandb=wandb)
    assert_clean_failure(full, f"no space left on device writing {small_fs / 'tiny'}", "free space and continue "
                         "with cl-flat train CONFIG --resume", code=1)
    assert seconds < 120, seconds  # the run itself takes about 20 s; a hang meets the subprocess timeout
    assert "Logging error" not in full.stderr

    uninterrupted, _ = train(reference)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = matrix_rows(tmp_path / "results" / "tiny")
    assert matrix_rows(small_fs / "tiny") == expected[:len(matrix_rows(small_fs / "tiny"))]  # finished rows intact

    ballast.unlink()
    resumed, _ = train(small, "--resume", wandb=wandb)
    assert resumed.returncode == 0, resumed.stderr
    assert matrix_rows(small_fs / "tiny") == expected
    assert (small_fs / "tiny" / "metrics.json").is_file()


def test_a_simulated_full_disk_at_the_last_row_keeps_the_first_and_resumes(tmp_path, tiny_config):
    """No mount needed (CI): the third write of acc_matrix.csv (task t2's row) finds the disk full."""
    patch = site_patch(tmp_path, """\
        import errno, os

        real_fsync, writes = os.fsync, []

        def fsync(fd):
            if ".acc_matrix.csv." in os.readlink(f"/proc/self/fd/{fd}"):
                writes.append(fd)
                if len(writes) == 3:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        os.fsync = fsync
        """)
    config = write_yaml(tmp_path / "config.yaml", tiny_config)
    full, _ = train(config, pythonpath=patch)
    run = tmp_path / "results" / "tiny"
    assert_clean_failure(full, f"no space left on device writing {run / 'acc_matrix.csv'}: free space", code=1)
    rows = matrix_rows(run)
    assert [row.split(",")[0] for row in rows] == ["after_task", "zero_shot", "t1"]
    resumed, _ = train(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    tiny_config["run"]["name"] = "uninterrupted"
    uninterrupted, _ = train(write_yaml(tmp_path / "uninterrupted.yaml", tiny_config))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert matrix_rows(run)[:3] == rows and matrix_rows(run) == matrix_rows(tmp_path / "results" / "uninterrupted")


def site_patch(tmp_path: Path, source: str) -> Path:
    """A folder whose sitecustomize.py (`source`) runs first in a process that has it on PYTHONPATH."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(textwrap.dedent(source))
    return patch


def test_a_complete_run_exits_0_when_wandb_fails_at_finish(tmp_path, tiny_config):
    patch = site_patch(tmp_path, """\
        from wandb.sdk.wandb_run import Run

        def finish(self, exit_code=None, quiet=None):
            raise RuntimeError("upload failed: 500 from the server")

        Run.finish = finish
        """)
    tiny_config["logging"]["wandb"] = {"mode": "offline", "project": "cl-flat-test"}
    result, _ = train(write_yaml(tmp_path / "config.yaml", tiny_config), wandb="offline", pythonpath=patch)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "warning: wandb: upload failed: 500 from the server" in result.stderr, result.stderr
    assert (tmp_path / "results" / "tiny" / "metrics.json").is_file()
