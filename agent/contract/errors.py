"""The contract's error codes, and the one exception its parsers raise.

The contract is a leaf: the standard library and the tools' shared error root (agent/errors.py,
itself stdlib-only) only. `ContractError` is a `CodedError`, so every tool's top level reports it
as it reports its own errors; where a caller promises its own exception type (`InvalidPayload`,
`OtaError`, `BundleError`, `UpdateError`) it translates at the boundary, keeping code and message.
"""

from __future__ import annotations

from typing import Final, get_args

from agent.errors import CodedError, JobErrorCode

__all__ = [
    "BAD_COMMAND",
    "BAD_MANIFEST",
    "DOWNGRADE",
    "DUPLICATE",
    "ENGINE_ERROR",
    "INVALID_JSON",
    "INVALID_REQUEST",
    "JOB_ERROR_CODES",
    "PROMPT_TOO_LONG",
    "QUEUE_FULL",
    "RETRY_CODES",
    "SHUTTING_DOWN",
    "VERSION_MISMATCH",
    "ContractError",
    "JobErrorCode",  # `error.code` of a job's `error` event, defined with the error root
]

JOB_ERROR_CODES: Final[frozenset[str]] = frozenset(get_args(JobErrorCode))
INVALID_JSON: Final = "invalid_json"
INVALID_REQUEST: Final = "invalid_request"
PROMPT_TOO_LONG: Final = "prompt_too_long"
QUEUE_FULL: Final = "queue_full"
DUPLICATE: Final = "duplicate"
ENGINE_ERROR: Final = "engine_error"
SHUTTING_DOWN: Final = "shutting_down"
# Codes that mean "not an answer: send the job to another device".
RETRY_CODES: Final[frozenset[str]] = frozenset({QUEUE_FULL, SHUTTING_DOWN})

# `error.code` of an `ota/status` message: the ones the contract itself decides.
BAD_COMMAND: Final = "bad_command"
VERSION_MISMATCH: Final = "version_mismatch"  # command `version` != the manifest's `version`
DOWNGRADE: Final = "downgrade"  # not newer than the device's high-water mark, no allow_downgrade

# A bundle's manifest that does not follow the contract.
BAD_MANIFEST: Final = "bad_manifest"


class ContractError(CodedError):
    """A payload or manifest that breaks the contract. `job_id` is set when a job payload had a
    usable id (so the refusal can go to its results topic, not `_invalid`)."""

    def __init__(self, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(code, message)
        self.job_id = job_id
