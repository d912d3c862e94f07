"""The benchmark's workload, the same for every runtime measured: a chat-style prompt cut to
exactly `prompt_tokens` tokens and `new_tokens` greedy tokens (end-of-sequence ignored, so every
run does the same work)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Varied English prose, repeated as needed and cut to the requested number of tokens.
PROMPT_TEXT = (
    "The maintenance log for line 4 shows that the conveyor motor overheated twice last week. "
    "Technicians replaced a worn bearing, checked the belt tension and cleaned the cooling fins, "
    "but the temperature alarm returned on Friday afternoon during the second shift. "
    "Summarise what happened, list the most likely remaining causes in order of probability, "
    "and propose a short inspection plan that the night crew can follow without stopping "
    "production for more than twenty minutes. Mention which sensor readings to record, which "
    "spare parts to bring, and when to escalate to the electrical engineer on call. "
)


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 156
    new_tokens: int = 128
    runs: int = 5
    threads: int = 0
    concurrency: int = 0  # > 1: also measure N jobs decoded together (continuous batching)
    mqtt: bool = False  # also measure a job over MQTT against the same job called directly
    broker: str | None = None  # HOST:PORT for --mqtt; None = a private Mosquitto


def bench_prompt_ids(codec: Any, prompt_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += codec.tokenizer.encode(PROMPT_TEXT, add_special_tokens=False).ids
    return ids[:prompt_tokens]


def rate_after_first(tokens: int, ttft_s: float, total_s: float) -> float:
    """Decode tokens/s after the first token, as `GenerationResult.decode_tokens_per_s`."""
    decode_s = total_s - ttft_s
    return (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0


RunOnce = Callable[[], tuple[float, float]]  # one run of the workload -> (TTFT ms, decode tok/s)


@dataclass
class Contestant:
    """One bundle or peer, loaded and warmed up in its own process, ready for its runs."""

    info: dict[str, Any]  # what it is: bundle, name, precision, size_mb, prompt_tokens, load_s
    run_once: RunOnce
    # Figures measured after the rounds (N jobs at once, MQTT overhead): bundles only.
    extras: Callable[[], dict[str, Any]] = field(default=lambda: {})
