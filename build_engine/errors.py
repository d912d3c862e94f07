"""The build step's single exception type.

Every failure a user can cause or fix (a wrong path, an unsupported model, a graph that does not
match its source) is raised as `BuildError` with a short machine code and a message that says what
to do, so the CLI can print it and exit 2 (agent/errors.py: the exit codes of the three tools)
without a traceback. Bugs stay ordinary exceptions: they need a traceback, not a friendlier message.
`BuildError` derives from the tools' one root, `agent.errors.CodedError` (stdlib-only).
"""

from __future__ import annotations

from agent.errors import CodedError


class BuildError(CodedError):
    """A build failure the user can act on; `code` is stable, `message` is for humans."""
