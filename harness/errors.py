"""User-facing errors.

A `UserError` is bad input (spec, data, options, missing framework): the CLI prints its one-line
message (plus an optional hint line) and exits with code 2, without a traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input. `message` names the file, the field or path, what was found, what is allowed."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
