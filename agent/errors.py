"""The agent's exception root and the error codes a job can be answered with.

Every error a person can act on carries a short machine code (the contract's `error.code`) and a
message that says what to do. Third-party exceptions are translated at the boundary.
"""

from __future__ import annotations

from typing import Literal

JobErrorCode = Literal[
    "invalid_json",
    "invalid_request",
    "prompt_too_long",
    "queue_full",
    "duplicate",
    "engine_error",
    "shutting_down",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class BundleError(AgentError):
    """A bundle is missing, malformed or does not match its manifest."""


class ConfigError(AgentError):
    """The agent's configuration file or flags are invalid."""


class JobError(AgentError):
    """A job is refused or failed; `code` is one of the contract's job error codes."""

    def __init__(self, code: JobErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.job_code: JobErrorCode = code


class EngineError(AgentError):
    """The inference backend failed while running a job."""

    def __init__(self, message: str) -> None:
        super().__init__("engine_error", message)
