"""Job requests: validate raw MQTT payloads into typed `JobRequest`s (DESIGN.md, "Job request").

Everything from the network is checked here, once; the rest of the agent trusts a `JobRequest`.
The contract's validator (`agent.contract.jobs`) does the checking; this module applies the
device's limits and defaults, and refuses, naming them, the second-revision features this agent
cannot honour yet (DESIGN.md: never ignore one). A payload that cannot be parsed far enough to find
a usable `id` raises `InvalidPayload` with `job_id=None`, and is answered on `P/D/results/_invalid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.contract import jobs as contract
from agent.contract.errors import JOB_ERROR_CODES, ContractError
from agent.contract.jobs import (
    DEFAULT_MAX_TOKENS,
    FIELDS,
    MAX_CANCEL_BYTES,
    MAX_DEADLINE_MS,
    MAX_MESSAGES,
    MAX_PRIORITY,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ROLES,
    JobSpec,
)
from agent.contract.ota import MAX_COMMAND_BYTES
from agent.contract.payload import JOB_ID_RE
from agent.contract.payload import check_size as _check_size
from agent.contract.payload import decode_json_object as _decode_json_object
from agent.errors import JobError, JobErrorCode
from agent.sampling import SamplingParams

__all__ = [
    "FIELDS",
    "JOB_ID_RE",
    "MAX_CANCEL_BYTES",
    "MAX_DEADLINE_MS",
    "MAX_MESSAGES",
    "MAX_OTA_COMMAND_BYTES",
    "MAX_PRIORITY",
    "MAX_SEED",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "ROLES",
    "InvalidPayload",
    "JobRequest",
    "RequestLimits",
    "check_size",
    "decode_json_object",
    "parse_cancel",
    "parse_job",
]

MAX_OTA_COMMAND_BYTES = MAX_COMMAND_BYTES


class InvalidPayload(JobError):
    """A request refused at validation; `job_id` is set when the payload had a usable id."""

    def __init__(self, code: JobErrorCode, message: str, job_id: str | None = None) -> None:
        super().__init__(code, message)
        self.job_id = job_id

    @classmethod
    def from_contract(cls, exc: ContractError) -> InvalidPayload:
        code = exc.code if exc.code in JOB_ERROR_CODES else "invalid_request"
        return cls(code, exc.message, exc.job_id)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RequestLimits:
    max_payload_bytes: int = 256 * 1024
    max_tokens_limit: int = 2048
    default_max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class JobRequest:
    id: str
    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None  # (role, content)
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    priority: int
    deadline_ms: int | None
    # The request as the contract read it (None when made in code, e.g. a test's own job).
    spec: JobSpec | None = field(default=None, compare=False, repr=False)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


def check_size(payload: bytes, limit: int, what: str) -> None:
    """Refuse an oversize payload before any parsing: the cost of a refusal stays bounded."""
    try:
        _check_size(payload, limit, what)
    except ContractError as exc:
        raise InvalidPayload.from_contract(exc) from None


def decode_json_object(payload: bytes) -> dict[str, Any]:
    """UTF-8 JSON object, strictly: no NaN/Infinity, no absurd nesting or number sizes."""
    try:
        return _decode_json_object(payload)
    except ContractError as exc:
        raise InvalidPayload.from_contract(exc) from None


def parse_job(payload: bytes, limits: RequestLimits) -> JobRequest:
    """Validate one job payload. Raises InvalidPayload with the contract's error code."""
    try:
        spec = contract.parse_job_payload(
            payload, limits.max_payload_bytes, limits.max_tokens_limit
        )
    except ContractError as exc:
        raise InvalidPayload.from_contract(exc) from None
    unsupported = _unsupported(spec)
    if unsupported:
        raise InvalidPayload(
            "invalid_request",
            f"this agent does not implement {', '.join(unsupported)} yet (DESIGN.md's second "
            "revision); send the job without it",
            spec.id,
        )
    return JobRequest(
        id=spec.id,
        prompt=spec.prompt,
        messages=tuple((m.role, m.text) for m in spec.messages)
        if spec.messages is not None
        else None,
        max_tokens=spec.max_tokens if spec.max_tokens is not None else limits.default_max_tokens,
        sampling=SamplingParams(
            temperature=spec.temperature if spec.temperature is not None else 0.0,
            top_k=spec.top_k if spec.top_k is not None else 0,
            top_p=spec.top_p if spec.top_p is not None else 1.0,
            seed=spec.seed,
        ),
        stop=spec.stop or (),
        stream=bool(spec.stream),
        priority=spec.priority or 0,
        deadline_ms=spec.deadline_ms,
        spec=spec,
    )


def _unsupported(spec: JobSpec) -> list[str]:
    """The second-revision features of `spec` this agent cannot honour yet. What it does anyway
    is accepted: text content parts (joined), `response_format` text, no tools (then any
    `tool_choice` is moot; `required` or a named function needs tools), `reasoning` inline."""
    named: list[str] = []
    if spec.response_format is not None and spec.response_format.type != "text":
        named.append(f"`response_format` {spec.response_format.type}")
    if spec.tools:
        named.append("`tools`")
    if spec.reasoning == "separate":
        named.append('`reasoning` "separate" (send "inline")')
    for index, message in enumerate(spec.messages or ()):
        if message.tool_calls:
            named.append(f"messages[{index}].tool_calls")
        if message.tool_call_id is not None:
            named.append(f"messages[{index}].tool_call_id")
    return named


def parse_cancel(payload: bytes) -> str:
    """A cancel request: `{"id": ...}`. Returns the job id."""
    try:
        return contract.parse_cancel(payload)
    except ContractError as exc:
        raise InvalidPayload.from_contract(exc) from None
