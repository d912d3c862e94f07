"""The generation loop shared by every backend: prefill, then decode one token at a time.

Streaming is a callback (`on_text`), as in gpt-fast's `decode_n_tokens(..., callback=...)`. Stop
strings are matched on the decoded text; text that might still turn out to be the start of a stop
string is held back, so the streamed pieces always concatenate to exactly the final text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.backends.base import Backend
from agent.sampling import Sampler, SamplingParams
from agent.text import TextCodec

FinishReason = Literal["stop", "length", "cancelled", "deadline"]
Interrupt = Callable[[], FinishReason | None]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    ttft_s: float  # start of prefill -> first token chosen
    total_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first token (the steady decode rate)."""
        decode_s = self.total_s - self.ttft_s
        if self.completion_tokens > 1 and decode_s > 0:
            return (self.completion_tokens - 1) / decode_s
        return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0


class StopStringFilter:
    """Finds stop strings in streamed text and decides how much text is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Append decoded text; return (text now safe to emit, whether a stop string was hit)."""
        self.text += piece
        hit = self._find_stop()
        if hit is not None:
            self.text = self.text[:hit]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def finish(self) -> str:
        """Emit everything still held back (generation ended for another reason)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def _find_stop(self) -> int | None:
        best: int | None = None
        for stop in self._stops:
            # A new match can only start in the part not yet emitted (or straddle its edge).
            index = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if index != -1 and (best is None or index < best):
                best = index
        return best

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return min(longest, len(self.text) - self.emitted)


def generate(
    backend: Backend[Any],
    codec: TextCodec,
    request: GenerationRequest,
    *,
    on_text: Callable[[str], None] | None = None,
    interrupt: Interrupt | None = None,
) -> GenerationResult:
    """Run one prompt to completion on a batch of one. Backend errors propagate (EngineError)."""
    start = time.perf_counter()
    sampler = Sampler(request.sampling)
    stream = codec.stream()
    stops = StopStringFilter(request.stop)
    budget = min(request.max_tokens, backend.info.max_seq_len - len(request.prompt_ids))
    tokens: list[int] = []
    finish: FinishReason = "length"
    ttft = 0.0

    def emit(text: str) -> None:
        if text and on_text is not None:
            on_text(text)

    state = backend.new_state(1)
    prompt = np.asarray([list(request.prompt_ids)], dtype=np.int64)  # [1, S]
    logits = backend.prefill(state, prompt)  # [1, vocab]
    hit_stop = False
    while len(tokens) < budget:
        token = sampler.choose(logits[0])
        if not tokens:
            ttft = time.perf_counter() - start
        if token in codec.eos_token_ids and not request.ignore_eos:
            finish = "stop"
            break
        tokens.append(token)
        safe, hit_stop = stops.feed(stream.push(token))
        emit(safe)
        if hit_stop:
            finish = "stop"
            break
        reason = interrupt() if interrupt is not None else None
        if reason is not None:
            finish = reason
            break
        if len(tokens) < budget:
            logits = backend.decode(state, np.asarray([token], dtype=np.int64))  # [1, vocab]
    if not hit_stop:
        # A character may still be held back by the detokenizer or the stop-string filter.
        safe, hit_stop = stops.feed(stream.flush())
        emit(safe)
        if hit_stop:
            finish = "stop"
        else:
            emit(stops.finish())
    if ttft == 0.0:  # nothing was sampled (the prompt filled the context)
        ttft = time.perf_counter() - start
    return GenerationResult(
        text=stops.text,
        token_ids=tokens,
        finish_reason=finish,
        prompt_tokens=len(request.prompt_ids),
        ttft_s=ttft,
        total_s=time.perf_counter() - start,
    )
