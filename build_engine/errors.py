"""The build step's single exception type.

Every failure a user can cause or fix (a wrong path, an unsupported model, a graph that does not
match its source) is raised as `BuildError` with a short machine code and a message that says what
to do, so the CLI can print it and exit non-zero without a traceback. Bugs stay ordinary
exceptions: they need a traceback, not a friendlier message.
"""

from __future__ import annotations


class BuildError(Exception):
    """A build failure the user can act on; `code` is stable, `message` is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"
