"""The run folder's lock (`rundir/lock.py`) and the signal handling of `stopping`, in this process."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cl_flat import stopping
from cl_flat.rundir.lock import FolderBusy, RunLock


def test_a_held_lock_refuses_a_second_taker_and_release_cleans_up(tmp_path):
    folder = tmp_path / "results" / "run"
    first = RunLock(folder, "cl-flat train").acquire()
    assert (folder / ".lock").read_text() == ""  # nothing is written until the command claims the folder
    first.claim()
    holder = json.loads((folder / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "cl-flat train"
    with pytest.raises(FolderBusy, match=rf"in use by cl-flat train \(pid {os.getpid()} on .*, since") as refusal:
        RunLock(folder, "cl-flat landscape").acquire()  # flock: a second open file conflicts, same process too
    assert refusal.value.exit_code == 2
    first.release()
    assert (folder / ".lock").read_text() == ""  # a free lock
    RunLock(folder, "cl-flat train").acquire().release()
    fresh = tmp_path / "elsewhere" / "run"
    RunLock(fresh, "cl-flat train").acquire().release()  # refused before it wrote: never claimed
    assert not (tmp_path / "elsewhere").exists()  # the lock file and the folders it created are gone


def test_a_dead_holders_lock_is_taken_over_with_a_note(tmp_path, capsys):
    (tmp_path / ".lock").write_text(json.dumps({"command": "cl-flat train", "host": "h", "pid": 4_000_000,
                                                "since": 0}))
    lock = RunLock(tmp_path, "cl-flat train").acquire()
    assert "taking over the lock of cl-flat train (pid 4000000 on h" in capsys.readouterr().err
    lock.claim()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == "" and tmp_path.exists()  # a free lock; the folder stays


def test_a_refused_command_leaves_an_existing_folder_untouched(tmp_path):
    """A command refused after taking the lock (its input is checked under it) writes nothing."""
    (tmp_path / ".lock").write_text("")
    before = {p.name: p.stat().st_mtime_ns for p in [tmp_path, *tmp_path.iterdir()]}
    RunLock(tmp_path, "cl-flat train").acquire().release()  # never claimed
    assert {p.name: p.stat().st_mtime_ns for p in [tmp_path, *tmp_path.iterdir()]} == before


@pytest.fixture
def fresh_stop_state(monkeypatch):
    monkeypatch.setitem(stopping._state, "requested", 0)
    monkeypatch.setitem(stopping._state, "agreed", False)
    before = {s: signal.getsignal(s) for s in stopping.SIGNALS}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_signal_while_training_is_recorded_not_acted_on(fresh_stop_state):
    before = signal.getsignal(signal.SIGTERM)
    with stopping.catching():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # torchrun forwards the one it got: still only recorded
        assert stopping.requested() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_acts_at_once_and_outside_training_raises_interrupted(fresh_stop_state):
    stopping.interrupt_raises()
    with pytest.raises(stopping.Interrupted):
        signal.raise_signal(signal.SIGINT)
    with pytest.raises(stopping.Interrupted), stopping.catching():
        signal.raise_signal(signal.SIGINT)
        assert stopping.requested() == signal.SIGINT
        signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_the_cli_says_what_is_kept_on_a_signal_outside_training(cli_here, tmp_path, monkeypatch, fresh_stop_state,
                                                                 signum, code, said):
    import cl_flat.cli

    def interrupted(**_options) -> None:  # app(prog_name=...): loading or evaluating when the signal comes
        signal.raise_signal(signum)

    monkeypatch.setattr(cl_flat.cli, "app", interrupted)
    result = cli_here(["train", "x.yaml"], tmp_path)
    assert result.returncode == code, result.stderr
    assert result.stderr == f"{said}; results of completed tasks are kept (a started run continues with --resume)\n"


def test_the_stop_message_names_the_update_and_the_resume_command(cli_here, tmp_path, monkeypatch, fresh_stop_state):
    import cl_flat.cli

    def stopped(**_options) -> None:  # app(prog_name=...)
        raise stopping.Stopped(signal.SIGTERM, "t2", 3, 20, checkpointed=True)

    monkeypatch.setattr(cl_flat.cli, "app", stopped)
    result = cli_here(["train", "c.yaml", "--set", "run.seed=2"], tmp_path)
    assert result.returncode == 143
    assert result.stderr.strip() == ("stopped by SIGTERM after update 3 of 20 of task 't2'; its in-task checkpoint "
                                     "is saved, completed tasks' results are kept. Continue with the same "
                                     "overrides: cl-flat train c.yaml --set run.seed=2 --resume")
