"""OTA failures: each has a code reported on `ota/status` and a message a person can act on."""

from __future__ import annotations

from agent.errors import AgentError


class OtaError(AgentError):
    """An update step failed; the running bundle is untouched.

    `transient` failures (a dropped connection) are retried a bounded number of times; the others
    fail the update at once.
    """

    def __init__(self, code: str, message: str, *, transient: bool = False) -> None:
        super().__init__(code, message)
        self.transient = transient
