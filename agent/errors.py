"""The error root of the three tools, the agent's exceptions and the codes a job is answered with.

Every error a person can act on carries a short machine code (the contract's `error.code`) and a
message that says what to do: `CodedError`, the one root `edge-agent`, `edge-build` and
`edge-fleet` share (`AgentError` here, `BuildError` in build_engine/errors.py). Third-party
exceptions are translated at the boundary; bugs stay ordinary exceptions with a traceback. This
module is stdlib-only and imports no other module of the project, so every layer may import it.

Exit codes, the same for the three tools (the constants below):
  0  ok: the command did what was asked (`edge-fleet prompt`: the job ended `done`).
  1  the command ran but the outcome is a failure: a job answered with an error, an update that
     did not end `active`, a rollout with failed devices, a bench row that could not be measured,
     a fleet command refused by a device or by the bundle checks.
  2  bad input: a usage error (argparse), a config file or flag that does not hold (`bad_config`,
     `bad_state_dir`, `bad_command`), a build the user must fix (every `BuildError`).
  3  `edge-fleet`: no answer (the broker is unreachable or the device did not answer in time).
  130 interrupted (SIGINT/SIGTERM during `edge-agent bench`).
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


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_ANSWER = 3
EXIT_INTERRUPTED = 130


class CodedError(Exception):
    """Root of every error the three tools raise on purpose: a stable machine `code` and a
    `message` for humans that says what to do. Printed as `[code] message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class AgentError(CodedError):
    """Root of every error the agent (and the fleet tool, which shares its modules) raises on
    purpose."""


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
