"""Job requests: validate raw MQTT payloads into typed `JobRequest`s (DESIGN.md, "Job request").

Everything from the network is checked here, once; the rest of the agent trusts a `JobRequest`.
A payload that cannot be parsed far enough to find a usable `id` raises `InvalidPayload` with
`job_id=None`, and is answered on `P/D/results/_invalid`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from agent.errors import JobError, JobErrorCode
from agent.sampling import SamplingParams

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
MAX_PRIORITY = 1000
MAX_DEADLINE_MS = 24 * 3600 * 1000
MAX_SEED = 2**63 - 1
FIELDS = frozenset(
    {
        "id",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "priority",
        "deadline_ms",
    }
)


class InvalidPayload(JobError):
    """A request refused at validation; `job_id` is set when the payload had a usable id."""

    def __init__(self, code: JobErrorCode, message: str, job_id: str | None = None) -> None:
        super().__init__(code, message)
        self.job_id = job_id


@dataclass(frozen=True)
class RequestLimits:
    max_payload_bytes: int = 256 * 1024
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256


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

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


MAX_CANCEL_BYTES = 1024  # {"id": <128 characters>} with room for whitespace
MAX_OTA_COMMAND_BYTES = 64 * 1024


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys repeat is refused: JSON parsers disagree on which value wins, so a
    gateway and this device could each read a different request from the same bytes."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"payload repeats the key {key[:64]!r} in one object")
            seen.add(key)
    return data


def check_size(payload: bytes, limit: int, what: str) -> None:
    """Refuse an oversize payload before any parsing: the cost of a refusal stays bounded."""
    if len(payload) > limit:
        raise InvalidPayload(
            "invalid_request", f"{what} is {len(payload)} bytes; the limit is {limit}"
        )


def parse_job(payload: bytes, limits: RequestLimits) -> JobRequest:
    """Validate one job payload. Raises InvalidPayload with the contract's error code."""
    check_size(payload, limits.max_payload_bytes, "payload")
    data = decode_json_object(payload)
    job_id = data.get("id")
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise InvalidPayload(
            "invalid_request", "`id` is required: 1-128 characters of A-Za-z0-9._:-"
        )
    try:
        return _parse_fields(data, job_id, limits)
    except JobError as exc:
        raise InvalidPayload(exc.job_code, exc.message, job_id) from None


def decode_json_object(payload: bytes) -> dict[str, Any]:
    """UTF-8 JSON object, strictly: no NaN/Infinity, no absurd nesting or number sizes."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload("invalid_json", f"payload is not UTF-8: {exc.reason}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise InvalidPayload("invalid_json", f"{exc}: send each key once") from None
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, NaN/Infinity and integers past Python's digit limit.
        raise InvalidPayload("invalid_json", f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidPayload("invalid_request", "payload must be a JSON object")
    try:  # JSON escapes can smuggle lone UTF-16 surrogates ("\ud800") that no tokenizer takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        job_id = data.get("id")
        usable = isinstance(job_id, str) and JOB_ID_RE.match(job_id) and job_id.isascii()
        raise InvalidPayload(
            "invalid_request",
            "text holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): send valid Unicode",
            job_id if usable else None,
        ) from None
    return data


def _bad(message: str) -> JobError:
    return JobError("invalid_request", message)


def _int_field(data: dict[str, Any], key: str, lo: int, hi: int, default: int | None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"`{key}` must be an integer from {lo} to {hi}")
    return value


def _float_field(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(f"`{key}` must be a number")
    try:
        number = float(value)  # an integer beyond float's range raises OverflowError
    except OverflowError:
        raise _bad(f"`{key}` is out of range") from None
    if not math.isfinite(number):
        raise _bad(f"`{key}` must be a finite number")
    return number


def _parse_fields(data: dict[str, Any], job_id: str, limits: RequestLimits) -> JobRequest:
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(map(repr, unknown[:8]))}")
    prompt, messages = _parse_input(data)
    # An optional field sent as JSON null means "not given" (what many JSON clients send for an
    # unset value), the same for every field, rather than an error for some and a crash for none.
    data = {key: value for key, value in data.items() if value is not None}
    max_tokens = _int_field(
        data, "max_tokens", 1, limits.max_tokens_limit, limits.default_max_tokens
    )
    temperature = _float_field(data, "temperature", 0.0)
    if not 0.0 <= temperature <= 2.0:
        raise _bad("`temperature` must be from 0 to 2 (0 = greedy)")
    top_p = _float_field(data, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _bad("`top_p` must be greater than 0 and at most 1")
    top_k = _int_field(data, "top_k", 0, 2**31 - 1, 0)
    seed = _int_field(data, "seed", 0, MAX_SEED, None)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("`stream` must be true or false")
    priority = _int_field(data, "priority", -MAX_PRIORITY, MAX_PRIORITY, 0)
    deadline_ms = _int_field(data, "deadline_ms", 1, MAX_DEADLINE_MS, None)
    assert max_tokens is not None and top_k is not None and priority is not None
    return JobRequest(
        id=job_id,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=_parse_stop(data.get("stop")),
        stream=stream,
        priority=priority,
        deadline_ms=deadline_ms,
    )


def _parse_input(data: dict[str, Any]) -> tuple[str | None, tuple[tuple[str, str], ...] | None]:
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        raise _bad("give exactly one of `prompt` (a string) or `messages` (a list)")
    if has_prompt:
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise _bad("`prompt` must be a non-empty string")
        return prompt, None
    raw = data["messages"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MESSAGES:
        raise _bad(f"`messages` must be a list of 1 to {MAX_MESSAGES} messages")
    messages: list[tuple[str, str]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise _bad(f"messages[{index}] must be an object with exactly `role` and `content`")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}")
        if not isinstance(content, str):
            raise _bad(f"messages[{index}].content must be a string")
        messages.append((role, content))
    return None, tuple(messages)


def _parse_stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _bad(
            f"`stop` must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters"
        )
    return tuple(stops)


def parse_cancel(payload: bytes) -> str:
    """A cancel request: `{"id": ...}`. Returns the job id."""
    check_size(payload, MAX_CANCEL_BYTES, "a cancel request")
    data = decode_json_object(payload)
    job_id = data.get("id")
    if set(data) != {"id"} or not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise InvalidPayload("invalid_request", 'a cancel request is exactly {"id": "<job id>"}')
    return job_id
