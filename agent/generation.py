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

from agent.backends.base import Backend, Logits, TokenIds
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


class SequenceRun:
    """One request's decoding bookkeeping, independent of the backend and of batching: sampling,
    end-of-sequence, streaming through the detokenizer, stop strings, budget and interruption.

    The caller feeds it the logits row of its next position (`accept`) until it says it is done;
    `next_token` is what the backend must append next.
    """

    def __init__(
        self,
        request: GenerationRequest,
        codec: TextCodec,
        max_seq_len: int,
        *,
        on_text: Callable[[str], None] | None = None,
        interrupt: Interrupt | None = None,
    ) -> None:
        self.request = request
        self._codec = codec
        self._on_text = on_text
        self._unread: list[str] = []  # text produced while nobody listens (`take_text`)
        self._interrupt = interrupt
        self._sampler = Sampler(request.sampling)
        self._stream = codec.stream()
        self._stops = StopStringFilter(request.stop)
        self.budget = min(request.max_tokens, max_seq_len - len(request.prompt_ids))
        self.tokens: list[int] = []
        self.next_token = -1
        self.finish: FinishReason | None = "length" if self.budget <= 0 else None
        self.start = time.perf_counter()
        self.ttft = 0.0
        self._hit_stop = False

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def expected_length(self) -> int:
        """The most tokens this sequence's cache can reach: prompt plus budget."""
        return len(self.request.prompt_ids) + max(self.budget, 0)

    def prompt_array(self) -> TokenIds:
        return np.asarray([list(self.request.prompt_ids)], dtype=np.int64)  # [1, S]

    def accept(self, logits: Logits) -> bool:
        """Choose the next token from this sequence's logits row ([vocab]); True when done."""
        token = self._sampler.choose(logits)
        if not self.tokens:
            self.ttft = time.perf_counter() - self.start
        if token in self._codec.eos_token_ids and not self.request.ignore_eos:
            self.finish = "stop"
            return True
        self.tokens.append(token)
        self.next_token = token
        safe, self._hit_stop = self._stops.feed(self._stream.push(token))
        self._emit(safe)
        if self._hit_stop:
            self.finish = "stop"
        elif (reason := self._interrupt() if self._interrupt else None) is not None:
            self.finish = reason
        elif len(self.tokens) >= self.budget:
            self.finish = "length"
        return self.finish is not None

    def stop_if_interrupted(self) -> bool:
        """Between two chunks of a long prompt: True, and finished, once the job is cancelled
        or past its deadline (the check `accept` makes after every token)."""
        reason = self._interrupt() if self._interrupt else None
        if reason is not None:
            self.finish = reason
        return reason is not None

    def result(self) -> GenerationResult:
        """Flush what is held back and describe the finished sequence."""
        if not self._hit_stop:
            # A character may still be held back by the detokenizer or the stop-string filter.
            safe, self._hit_stop = self._stops.feed(self._stream.flush())
            self._emit(safe)
            if self._hit_stop:
                self.finish = "stop"
            else:
                self._emit(self._stops.finish())
        now = time.perf_counter()
        return GenerationResult(
            text=self._stops.text,
            token_ids=self.tokens,
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.request.prompt_ids),
            ttft_s=self.ttft or now - self.start,  # nothing sampled: the prompt filled the context
            total_s=now - self.start,
        )

    def take_text(self) -> str:
        """The text produced since the last call, for a caller that reads it between steps
        instead of passing `on_text` (the batch reports it as data)."""
        text = "".join(self._unread)
        self._unread.clear()
        return text

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self._on_text is not None:
            self._on_text(text)
        else:
            self._unread.append(text)


def generate(
    backend: Backend[Any],
    codec: TextCodec,
    request: GenerationRequest,
    *,
    on_text: Callable[[str], None] | None = None,
    interrupt: Interrupt | None = None,
) -> GenerationResult:
    """Run one prompt to completion on a batch of one. Backend errors propagate (EngineError)."""
    run = SequenceRun(
        request, codec, backend.info.max_seq_len, on_text=on_text, interrupt=interrupt
    )
    if not run.done:
        state = backend.new_state(1, run.expected_length)
        logits = backend.prefill(state, run.prompt_array())  # [1, vocab]
        while not run.accept(logits[0]):
            logits = backend.decode(state, np.asarray([run.next_token], dtype=np.int64))
    return run.result()
