"""The errors a user can cause. The CLI turns each into one message and an exit code, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a run folder's state, a diverged update): one clear message, exit code 1.
    Malformed input (config, options, data files, result files) exits 2."""

    exit_code = 1


class ConfigError(UserError):
    """The configuration (or a command's options) is invalid; `problems` holds one line per error."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str], kind: str = "config"):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid {kind} {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class NonFiniteUpdate(UserError):
    """An update produced a non-finite loss or gradient (`training.on_nonfinite: stop`, or too many skipped)."""


class DataError(UserError):
    """A data file is missing or malformed; the message names file:line."""

    exit_code = 2


class MatrixFormatError(UserError, ValueError):
    """An accuracy-matrix csv does not follow the results-folder contract; the message names file:line."""

    exit_code = 2


class PluginError(UserError):
    """A flatness method or CL strategy cannot be registered: a name registered twice, an installed plugin
    that fails to import or registers nothing. The message names both sources, or the package."""

    exit_code = 2


class DiskFull(UserError):
    """A write failed because the disk is full (or over quota, or read-only): the message names the path.
    Every write is atomic or an append of whole lines, so completed tasks stay intact and --resume continues."""

    def __init__(self, path: object):
        self.path = path
        super().__init__(f"no space left on device writing {path}: free space and continue with "
                         "cl-flat train CONFIG --resume")
