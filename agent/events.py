"""Builders for the JSON payloads the agent publishes (DESIGN.md: job events and status).

Thin wrappers over the contract's types (`agent.contract.events`), in the shape the agent calls
them; the payloads are the types' `to_payload()`.
"""

from __future__ import annotations

from typing import Any

from agent.contract.events import (
    Accepted,
    Delta,
    DeviceState,
    DeviceStatus,
    Done,
    EngineInfo,
    JobFailed,
    Timing,
    Usage,
    utc_now_iso,
)
from agent.generation import FinishReason, GenerationResult

__all__ = [
    "accepted",
    "delta",
    "done",
    "done_from_result",
    "engine_of",
    "error",
    "status",
    "utc_now_iso",
]


def engine_of(engine: dict[str, str] | None) -> EngineInfo | None:
    """The contract's `EngineInfo` from the dict a manifest's `engine_info()` gives."""
    if engine is None:
        return None
    return EngineInfo(engine["name"], engine["version"], engine["precision"], engine["backend"])


def accepted(job_id: str, queue_position: int, device: str | None = None) -> dict[str, Any]:
    return Accepted(job_id, queue_position, device).to_payload()


def delta(job_id: str, seq: int, text: str) -> dict[str, Any]:
    return Delta(job_id, seq, text).to_payload()


def error(job_id: str | None, code: str, message: str) -> dict[str, Any]:
    return JobFailed(job_id, code, message).to_payload()


def done(
    job_id: str,
    *,
    text: str,
    finish_reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
    queue_ms: float,
    ttft_ms: float,
    total_ms: float,
    tokens_per_s: float,
    engine: dict[str, str] | None,
    device: str,
) -> dict[str, Any]:
    return Done(
        id=job_id,
        text=text,
        finish_reason=finish_reason,
        usage=Usage(prompt_tokens, completion_tokens),
        timing=Timing(queue_ms, ttft_ms, total_ms, tokens_per_s),
        engine=engine_of(engine),
        device=device,
    ).to_payload()


def done_from_result(
    job_id: str,
    result: GenerationResult,
    *,
    queue_ms: float,
    total_ms: float,
    engine: dict[str, str] | None,
    device: str,
) -> dict[str, Any]:
    return done(
        job_id,
        text=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        queue_ms=queue_ms,
        ttft_ms=result.ttft_s * 1000,
        total_ms=total_ms,
        tokens_per_s=result.decode_tokens_per_s,
        engine=engine,
        device=device,
    )


def status(
    state: DeviceState | str, agent_version: str, engine: dict[str, str] | None, since: str
) -> dict[str, Any]:
    """The retained status; `engine` is None while the device has no working model."""
    return DeviceStatus(state, agent_version, engine_of(engine), since).to_payload()  # type: ignore[arg-type]
