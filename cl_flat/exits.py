"""How a `cl-flat` command ends: every failure a user can act on becomes one message and an exit code.

User errors (bad config, bad data, unknown method, ...) exit non-zero without a traceback (2 for an invalid
config, 1 otherwise); a run stopped by a signal says what is kept and how to continue it; a collective that
lost a peer says so instead of a gloo/NCCL trace. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable


def _stopped(exc) -> None:
    """Where a run stopped on a signal and how to continue it; exits 128 + the signal."""
    if os.environ.get("RANK", "0") == "0":
        if exc.checkpointed:
            args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
            _last_words(f"{exc}; its in-task checkpoint is saved, completed tasks' results are kept. Continue "
                        f"with the same overrides: cl-flat {shlex.join(args)}")
        else:  # a reference run keeps no checkpoints and does not resume
            _last_words(f"{exc}; nothing of it is kept. Start it again: cl-flat {shlex.join(sys.argv[1:])}")
    from cl_flat import dist

    dist.shutdown()  # every rank stopped after the same update
    sys.exit(exc.exit_code)


def run_to_exit(command: Callable[[], None]) -> None:
    """Run `command` (the parsed command line); a failure a user can act on ends in one message on rank 0
    and an exit code, never a traceback: a user error (its exit_code), a stop by signal or by a stopping
    rule (128 + the signal, or the stop's code), a full disk (1), a collective that lost a peer (1)."""
    from cl_flat.errors import UserError
    from cl_flat.stopping import Interrupted, Stopped, interrupt_raises

    interrupt_raises()  # not KeyboardInterrupt: typer would exit before the message below
    try:
        command()
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem: say it once
            _last_words(f"error: {exc}")
        sys.exit(exc.exit_code)
    except Stopped as exc:
        _stopped(exc)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if os.environ.get("RANK", "0") == "0":
            why = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            _last_words(f"{why}; results of completed tasks are kept (a started run continues with --resume)")
        sys.exit(128 + signum)
    except OSError as exc:  # a full disk where no files.writing block names the path (DiskFull is a UserError)
        from cl_flat.errors import DiskFull
        from cl_flat.files import disk_full_error

        if disk_full_error(exc) is None:
            raise
        _last_words(f"error: {DiskFull(exc.filename or 'the results folder')}")
        sys.exit(1)
    except Exception as exc:
        if not _lost_peer(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _last_words(f"error: rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')}: a collective "
                   f"failed, another process died or did not answer within deepspeed.timeout_minutes ({first}). "
                   "Completed tasks and the newest in-task checkpoint are saved; rerun with --resume")
        sys.exit(1)


def _last_words(text: str) -> None:
    """The message a failing command ends with, on a console that is surely back (`RankLog.last_words`)."""
    from cl_flat.rank_log import RankLog

    RankLog.last_words(text)


def _lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank is gone or timed out."""
    import torch.distributed as torch_dist

    if isinstance(exc, torch_dist.DistError):
        return True
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in markers)
