"""Job events (DESIGN.md, "Job events", both revisions) and the device status, as types.

Every event is a message on the job's reply topic and carries `id` and `event`. The agent builds
them with these types, the fleet reads them back with `parse_event`. Optional second-revision
fields (`accepted.device`, `delta.reasoning`, `done.reasoning`/`tool_calls`,
`usage.cached_tokens`/`reasoning_tokens`) are only sent when set, so a first-revision reader sees
exactly the first revision's payloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from agent.contract.errors import INVALID_REQUEST, ContractError
from agent.contract.jobs import ToolCall, parse_tool_call

EventKind = Literal["accepted", "delta", "done", "error"]
EVENT_KINDS: Final[frozenset[str]] = frozenset(get_args(EventKind))
FINAL_EVENTS: Final[frozenset[str]] = frozenset({"done", "error"})
FinishReason = Literal["stop", "length", "cancelled", "deadline", "tool_calls"]
FINISH_REASONS: Final[frozenset[str]] = frozenset(get_args(FinishReason))
DeviceState = Literal["online", "updating", "degraded", "offline"]
DEVICE_STATES: Final[frozenset[str]] = frozenset(get_args(DeviceState))


def utc_now_iso() -> str:
    """The contract's timestamp: UTC, milliseconds, `Z`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _mark(body: dict[str, Any], restarted: bool) -> dict[str, Any]:
    """The agent's own mark on the events of a job it runs again from its journal after a
    restart (the client saw the first run start, and will see it again)."""
    if restarted:
        body["restarted"] = True
    return body


@dataclass(frozen=True)
class EngineInfo:
    """The `engine` object of `done` events and the status: what answered."""

    name: str
    version: str
    precision: str
    backend: str

    def to_payload(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.precision,
            "backend": self.backend,
        }

    @staticmethod
    def from_payload(data: Any) -> EngineInfo | None:
        if not isinstance(data, dict):
            return None
        return EngineInfo(
            str(data.get("name", "")),
            str(data.get("version", "")),
            str(data.get("precision", "")),
            str(data.get("backend", "")),
        )


@dataclass(frozen=True)
class Accepted:
    id: str
    queue_position: int
    device: str | None = None  # second revision: who took the job
    restarted: bool = False  # run again from the journal after the agent restarted

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "event": "accepted",
            "queue_position": self.queue_position,
        }
        if self.device is not None:
            body["device"] = self.device
        return _mark(body, self.restarted)


@dataclass(frozen=True)
class Delta:
    """A piece of the answer (`text`) or of the thinking (`reasoning`), never both."""

    id: str
    seq: int
    text: str | None = None
    reasoning: str | None = None
    restarted: bool = False

    def __post_init__(self) -> None:
        if (self.text is None) == (self.reasoning is None):
            raise ContractError(INVALID_REQUEST, "a delta carries exactly one of text, reasoning")

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "event": "delta", "seq": self.seq}
        if self.text is not None:
            body["text"] = self.text
        else:
            body["reasoning"] = self.reasoning
        return _mark(body, self.restarted)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache
    reasoning_tokens: int | None = None

    def to_payload(self) -> dict[str, int]:
        body = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.cached_tokens is not None:
            body["cached_tokens"] = self.cached_tokens
        if self.reasoning_tokens is not None:
            body["reasoning_tokens"] = self.reasoning_tokens
        return body


@dataclass(frozen=True)
class Timing:
    """Milliseconds (and tokens per second), sent rounded to 2 decimals."""

    queue_ms: float
    ttft_ms: float
    total_ms: float
    tokens_per_s: float

    def to_payload(self) -> dict[str, float]:
        return {
            "queue_ms": round(self.queue_ms, 2),
            "ttft_ms": round(self.ttft_ms, 2),
            "total_ms": round(self.total_ms, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


@dataclass(frozen=True)
class Done:
    id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    engine: EngineInfo | None
    device: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    restarted: bool = False

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "event": "done",
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_payload(),
            "timing": self.timing.to_payload(),
            "engine": self.engine.to_payload() if self.engine is not None else None,
            "device": self.device,
        }
        if self.reasoning is not None:
            body["reasoning"] = self.reasoning
        if self.tool_calls is not None:
            body["tool_calls"] = [call.to_payload() for call in self.tool_calls]
        return _mark(body, self.restarted)


@dataclass(frozen=True)
class JobFailed:
    """The `error` event. `id` is None for a request without a usable id (`_invalid`)."""

    id: str | None
    code: str
    message: str
    restarted: bool = False

    def to_payload(self) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message}
        body: dict[str, Any] = {"id": self.id, "event": "error", "error": error}
        return _mark(body, self.restarted)


Event = Accepted | Delta | Done | JobFailed


def _bad(message: str) -> ContractError:
    return ContractError(INVALID_REQUEST, f"job event: {message}")


def _int(data: dict[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{where}.{key} must be an integer")
    return value


def _number(data: dict[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(f"{where}.{key} must be a number")
    return float(value)


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(f"`{key}` must be a string")
    return value


def parse_event(data: Any) -> Event:
    """A job event read back (a fleet tool, a gateway). Raises ContractError."""
    if not isinstance(data, dict):
        raise _bad("not a JSON object")
    kind, job_id = data.get("event"), data.get("id")
    if kind not in EVENT_KINDS:
        raise _bad(f"`event` must be one of {', '.join(sorted(EVENT_KINDS))}")
    restarted = data.get("restarted") is True
    if kind == "error":
        error = data.get("error")
        if not isinstance(error, dict) or not (job_id is None or isinstance(job_id, str)):
            raise _bad("an error event needs `id` (a string or null) and `error`: {code, message}")
        code, message = str(error.get("code", "")), str(error.get("message", ""))
        return JobFailed(job_id, code, message, restarted)
    if not isinstance(job_id, str):
        raise _bad("`id` must be a string")
    if kind == "accepted":
        position = _int(data, "queue_position", "accepted")
        return Accepted(job_id, position, _optional_str(data, "device"), restarted)
    if kind == "delta":
        text, reasoning = _optional_str(data, "text"), _optional_str(data, "reasoning")
        return Delta(job_id, _int(data, "seq", "delta"), text, reasoning, restarted)
    return _parse_done(job_id, data, restarted)


def _parse_done(job_id: str, data: dict[str, Any], restarted: bool) -> Done:
    usage, timing = data.get("usage"), data.get("timing")
    if not isinstance(usage, dict) or not isinstance(timing, dict):
        raise _bad("a done event needs `usage` and `timing` objects")
    finish_reason = data.get("finish_reason")
    if finish_reason not in FINISH_REASONS:
        raise _bad(f"`finish_reason` must be one of {', '.join(sorted(FINISH_REASONS))}")
    text, device = data.get("text"), data.get("device")
    if not isinstance(text, str) or not isinstance(device, str):
        raise _bad("a done event needs `text` and `device` strings")
    raw_calls = data.get("tool_calls")
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise _bad("`tool_calls` must be a list")
    cached, thinking = usage.get("cached_tokens"), usage.get("reasoning_tokens")
    return Done(
        id=job_id,
        text=text,
        finish_reason=finish_reason,  # type: ignore[arg-type]
        usage=Usage(
            _int(usage, "prompt_tokens", "usage"),
            _int(usage, "completion_tokens", "usage"),
            _int(usage, "cached_tokens", "usage") if cached is not None else None,
            _int(usage, "reasoning_tokens", "usage") if thinking is not None else None,
        ),
        timing=Timing(*(_number(timing, k, "timing") for k in Timing.__dataclass_fields__)),
        engine=EngineInfo.from_payload(data.get("engine")),
        device=device,
        reasoning=_optional_str(data, "reasoning"),
        tool_calls=tuple(parse_tool_call(c, "done.tool_calls") for c in raw_calls)
        if raw_calls is not None
        else None,
        restarted=restarted,
    )


# --- status -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceStatus:
    """`P/D/status`, retained (also the Last Will, `offline`)."""

    state: DeviceState
    agent_version: str
    engine: EngineInfo | None  # None while the device has no working model
    since: str

    def to_payload(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "agent_version": self.agent_version,
            "engine": self.engine.to_payload() if self.engine is not None else None,
            "since": self.since,
        }


def parse_status(data: Any) -> DeviceStatus:
    """A device status read back. Raises ContractError."""
    if not isinstance(data, dict) or data.get("state") not in DEVICE_STATES:
        raise ContractError(
            INVALID_REQUEST, f"status: `state` must be one of {', '.join(sorted(DEVICE_STATES))}"
        )
    return DeviceStatus(
        state=data["state"],
        agent_version=str(data.get("agent_version", "")),
        engine=EngineInfo.from_payload(data.get("engine")),
        since=str(data.get("since", "")),
    )
