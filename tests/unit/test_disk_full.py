"""A full disk, simulated in this process (a write that raises ENOSPC): each write helper raises one DiskFull
naming its path, a finished file is never replaced by a partial one, the CLI prints one line and exits 1; wandb
that fails or hangs at finish is a warning. The same on a real full file system:
tests/integration/test_disk_full_runs.py."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from cl_flat.errors import DiskFull
from cl_flat.files import atomic_write_text, writing


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_in_a_write_block_is_disk_full_naming_the_path(tmp_path, code):
    with pytest.raises(DiskFull) as raised:
        with writing(tmp_path / "adapters" / "t1"):
            raise OSError(code, os.strerror(code), str(tmp_path / ".tmp-x"))
    assert str(raised.value) == (f"no space left on device writing {tmp_path / 'adapters' / 't1'}: free space and "
                                 "continue with cl-flat train CONFIG --resume")
    assert raised.value.exit_code == 1


def test_a_library_error_caused_by_a_full_disk_is_disk_full_and_other_errors_pass(tmp_path):
    with pytest.raises(DiskFull, match="writing .*state.pt"):
        with writing(tmp_path / "state.pt"):
            try:
                no_space()
            except OSError as exc:
                raise RuntimeError("file write failed") from exc
    with pytest.raises(PermissionError):
        with writing(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(RuntimeError, match="unrelated"):  # this disk has space: not a full disk
        with writing(tmp_path / "x"):
            raise RuntimeError("unrelated")


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "acc_matrix.csv"
    target.write_text("after_task,t1\nzero_shot,50.0\n")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFull, match=f"writing {target}:"):
        atomic_write_text(target, "after_task,t1\nzero_shot,50.0\nt1,90.0\n")
    assert target.read_text() == "after_task,t1\nzero_shot,50.0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["acc_matrix.csv"]


class FailingFile:
    def write(self, data):
        no_space()

    def flush(self):
        no_space()

    def close(self):
        no_space()


def test_train_log_on_a_full_disk_is_disk_full_naming_it(tmp_path, tiny_config, monkeypatch):
    from cl_flat.config import validate_config
    from cl_flat.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = tmp_path / "train_log.jsonl"
    with pytest.raises(DiskFull, match=f"writing {log}:"):  # the update's, not the close's in the exit
        with Tracker(validate_config(tiny_config), log, active=True) as tracker:
            tracker.log_update({"task": "t1", "task_index": 0, "step": 1, "loss": 0.5})
            tracker._handle.close()
            tracker._handle = FailingFile()
            tracker.log_update({"task": "t1", "task_index": 0, "step": 2, "loss": 0.4})
    assert log.read_text().count("\n") == 1


def test_the_rank_log_stops_at_a_full_disk_while_the_console_goes_on():
    from cl_flat.rank_log import RankLog

    log = RankLog()
    log._file = FailingFile()
    log._write_log(b"step 1\n")  # no exception: the copier thread must live on
    assert log._file is None


class FakeRun:
    def __init__(self, finish):
        self.finish = finish


def test_wandb_that_fails_or_hangs_at_finish_is_a_warning(tmp_path, tiny_config, monkeypatch, capsys):
    from cl_flat import tracking
    from cl_flat.config import validate_config

    monkeypatch.setenv("WANDB_MODE", "disabled")
    import wandb  # noqa: F401  (imported, as in a run whose wandb started: not part of the finish's time)

    monkeypatch.setattr(tracking, "FINISH_TIMEOUT", 2.0)
    release = threading.Event()
    for finish in (lambda exit_code: no_space(), lambda exit_code: release.wait(30)):
        with tracking.Tracker(validate_config(tiny_config), tmp_path / "train_log.jsonl", active=True) as tracker:
            tracker._wandb = FakeRun(finish)
    release.set()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: wandb")]
    assert len(warnings) == 2, warnings
    assert "no space left on device" in warnings[0] and "did not finish within 2 s" in warnings[1]


def test_a_wandb_call_that_fails_is_one_warning_and_no_more_wandb(tmp_path, tiny_config, monkeypatch, capsys):
    from cl_flat.config import validate_config
    from cl_flat.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls = []
    run = FakeRun(lambda exit_code: calls.append(("finish", exit_code)))
    run.log = lambda values: no_space()
    with Tracker(validate_config(tiny_config), tmp_path / "train_log.jsonl", active=True) as tracker:
        tracker._wandb = run
        tracker.log_update({"task": "t1", "task_index": 0, "step": 1, "loss": 0.5})
        tracker.log_update({"task": "t1", "task_index": 0, "step": 2, "loss": 0.4})
    assert calls == [("finish", 1)]
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: wandb")]
    assert len(warnings) == 1 and "no space left on device" in warnings[0], warnings


def test_the_cli_names_the_file_of_an_unexpected_full_disk_and_exits_1(tmp_path, cli_here, monkeypatch):
    from cl_flat import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "wandb" / "debug.log"))

    monkeypatch.setattr(cli, "app", full)
    result = cli_here(["train", "x.yaml"], tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"error: no space left on device writing {tmp_path / 'wandb' / 'debug.log'}: free space "
                             "and continue with cl-flat train CONFIG --resume\n")
