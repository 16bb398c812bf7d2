"""The errors a user can cause. The CLI turns each into one message and an exit code, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: reported as one clear message, exit code 1."""

    exit_code = 1


class ConfigError(UserError):
    """The configuration (or a command's options) is invalid; `problems` holds one line per error."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str], kind: str = "config"):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid {kind} {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(UserError):
    """A data file is missing or malformed; the message names file:line."""


class MatrixFormatError(UserError, ValueError):
    """An accuracy-matrix csv does not follow the results-folder contract; the message names file:line."""
