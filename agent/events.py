"""Builders for the JSON payloads the agent publishes (DESIGN.md: job events and status)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent.generation import FinishReason, GenerationResult


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def accepted(job_id: str, queue_position: int) -> dict[str, Any]:
    return {"id": job_id, "event": "accepted", "queue_position": queue_position}


def delta(job_id: str, seq: int, text: str) -> dict[str, Any]:
    return {"id": job_id, "event": "delta", "seq": seq, "text": text}


def error(job_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": job_id, "event": "error", "error": {"code": code, "message": message}}


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
    return {
        "id": job_id,
        "event": "done",
        "text": text,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "timing": {
            "queue_ms": round(queue_ms, 2),
            "ttft_ms": round(ttft_ms, 2),
            "total_ms": round(total_ms, 2),
            "tokens_per_s": round(tokens_per_s, 2),
        },
        "engine": engine,
        "device": device,
    }


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
    state: str, agent_version: str, engine: dict[str, str] | None, since: str
) -> dict[str, Any]:
    """The retained status; `engine` is None while the device has no working model."""
    return {"state": state, "agent_version": agent_version, "engine": engine, "since": since}
