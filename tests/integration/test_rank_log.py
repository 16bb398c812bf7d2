"""RankLog copies a process's whole console output (print, warnings, logging, fd 2, child processes) into its
log, and the console keeps it; under RankLog a terminal stays a terminal. Each case runs in a process of its
own."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap

import pytest

from helpers import quiet_env

pytestmark = pytest.mark.integration


RANK_LOG_SCRIPT = """
import logging, os, subprocess, sys, warnings
from pathlib import Path
from cl_flat.rank_log import RankLog

log = RankLog().start()
print("before attach")
if sys.argv[1] == "attach":
    log.attach(Path(sys.argv[2]), 1, 2)
warnings.warn("a python warning")
logging.basicConfig(stream=sys.stderr)
logging.getLogger("DeepSpeed").warning("a logging record")
os.write(2, b"written to fd 2 directly\\n")
subprocess.run(["echo", "from a child process"], check=True)
print("terminal?", sys.stdout.isatty())
raise SystemExit("the error that ends the process")
"""


@pytest.mark.parametrize("attach", [True, False])
def test_rank_log_copies_all_console_output_and_the_console_keeps_it(tmp_path, attach):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(RANK_LOG_SCRIPT))
    log = tmp_path / "run" / "logs" / "rank1.log"
    env = quiet_env() | {"PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, str(script), "attach" if attach else "refused", str(log)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    console = proc.stdout + proc.stderr
    lines = ["before attach", "a python warning", "a logging record", "written to fd 2 directly",
             "from a child process", "terminal? False", "the error that ends the process"]
    for line in lines:
        assert line in console, (line, console)
    if not attach:  # a refused run: its folder is not touched
        assert not log.parent.parent.exists()
        return
    text = log.read_text()
    assert text.startswith("==== cl-flat ") and "rank 1 of 2" in text.splitlines()[0]
    for line in lines:
        assert line in text, (line, text)


def test_rank_log_keeps_a_terminal_a_terminal(tmp_path):
    """rich draws live progress bars only on a terminal: under RankLog, stdout still says it is one."""
    script = tmp_path / "script.py"
    script.write_text("import sys\nfrom cl_flat.rank_log import RankLog\nRankLog().start()\n"
                      "print('terminal?', sys.stdout.isatty())\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=follower, stderr=subprocess.DEVNULL,
                            env=quiet_env())
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 1024)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    assert b"terminal? True" in output, output


LAST_WORDS_SCRIPT = """
import sys
from pathlib import Path
from cl_flat.rank_log import RankLog

log = RankLog().start()
print("working", file=sys.stderr, flush=True)
if sys.argv[1] == "attach":
    log.attach(Path(sys.argv[2]), 0, 1)
RankLog.last_words("error: the one message")
print("after: straight to the console", file=sys.stderr, flush=True)
sys.exit(2)
"""


@pytest.mark.parametrize("mode", ["attach", "refused"])
def test_the_last_message_reaches_the_console_and_the_log(tmp_path, mode):
    log = tmp_path / "logs" / "rank0.log"
    proc = subprocess.run([sys.executable, "-c", LAST_WORDS_SCRIPT, mode, str(log)], capture_output=True,
                          text=True, env=quiet_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["working", "error: the one message", "after: straight to the console"]
    if mode == "attach":
        assert log.read_text().splitlines()[1:] == ["working", "error: the one message"]
    else:
        assert not log.exists()  # a refused run writes nothing


SPLIT_LINE_SCRIPT = """
import os, sys, time
from pathlib import Path
from cl_flat.rank_log import RankLog

log = RankLog().start()
log.attach(Path(sys.argv[1]), 0, 1)
os.write(1, b"a line begun ")
time.sleep(0.5)  # the copier has read the half line before the other stream writes
os.write(2, b"a whole line on stderr\\n")
time.sleep(0.5)
os.write(1, b"and ended\\n")
os.write(1, b"an unended last line")
"""


def test_the_log_keeps_each_streams_lines_whole(tmp_path):
    """A line of one stream is written in pieces while the other writes: the log has both lines whole (the
    stdout line after the stderr one, where it ended), and an unended last line is not lost."""
    log = tmp_path / "logs" / "rank0.log"
    proc = subprocess.run([sys.executable, "-c", SPLIT_LINE_SCRIPT, str(log)], capture_output=True, text=True,
                          env=quiet_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines()[1:] == ["a whole line on stderr", "a line begun and ended",
                                                "an unended last line"]
    assert proc.stdout == "a line begun and ended\nan unended last line"
