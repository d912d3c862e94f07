"""Continuous batching: concurrent jobs decode together in one batch.

A new job is prefilled on its own and joins the running batch at the next step (its KV cache
copied in beside the others: each row keeps its own length on the CPU graph, or is left-padded to
the batch's length on past/present graphs); a finished job leaves at once without stalling the
others, its place taken by the last row (`compacting_order`: on the CPU graph that is one row's
copy, not the whole batch's). While other jobs are decoding, a long prompt is prefilled in chunks
of `prefill_chunk` tokens, one chunk per step, so it delays their next token by one chunk's time
instead of by its whole prefill (as vLLM's chunked prefill).
Each row keeps its own sampling settings, stop strings and stream (`SequenceRun`), so batching
changes how fast jobs run, not what they answer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.backends.base import Backend
from agent.errors import AgentError, EngineError
from agent.generation import GenerationResult, SequenceRun

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step while other jobs decode. Measured (int4, this 2-core machine,
# a 1,500-token prompt joining): prefilled whole it held the running jobs' next token for 1.2 s;
# in chunks of 256 for at most 0.22 s per step, and the chunks took no longer in all (1.13 s).
# Most chat prompts fit in one chunk, so they join after one step as before.
PREFILL_CHUNK = 256

Finished = Callable[[SequenceRun, GenerationResult | None, AgentError | None], None]


@dataclass
class _Entry:
    run: SequenceRun
    on_finished: Finished
    state: Any = None  # its own KV cache while its prompt is prefilled
    prefilled: int = 0  # prompt tokens already in that cache


class BatchGenerator:
    """Owns one batched decode state; `step()` admits waiting runs and advances every row."""

    def __init__(
        self, backend: Backend[Any], max_batch: int, prefill_chunk: int = PREFILL_CHUNK
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # 0: every prompt whole, however long
        self._waiting: deque[_Entry] = deque()  # first in, first prefilled
        self._rows: list[_Entry] = []
        self._state: Any = None

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self._rows) - len(self._waiting)

    def submit(self, run: SequenceRun, on_finished: Finished) -> None:
        self._waiting.append(_Entry(run, on_finished))

    def step(self) -> None:
        """Prefill waiting prompts (while rows decode, at most `prefill_chunk` tokens of them), let
        those complete join, then one decode step for the whole batch."""
        self._admit()
        if not self._rows:
            return
        token_ids = np.asarray([e.run.next_token for e in self._rows], dtype=np.int64)  # [B]
        try:
            logits = self.backend.decode(self._state, token_ids)  # [B, vocab]
        except Exception as exc:  # the whole batch shares the failed step
            error = exc if isinstance(exc, AgentError) else EngineError(f"{exc}")
            for entry in self._rows:
                entry.on_finished(entry.run, None, error)
            self._rows, self._state = [], None
            return
        keep = []
        for index, entry in enumerate(self._rows):
            if entry.run.accept(logits[index]):
                self._finish(entry)
            else:
                keep.append(index)
        if len(keep) < len(self._rows):
            order = compacting_order(keep)
            self._rows = [self._rows[i] for i in order]
            self._state = self.backend.select(self._state, order) if order else None

    def _admit(self) -> None:
        # With no row decoding nobody waits on a prefill: every waiting prompt goes in whole.
        budget = self.prefill_chunk if self._rows and self.prefill_chunk > 0 else None
        joining: list[_Entry] = []
        while self._waiting and len(self._rows) + len(joining) < self.max_batch:
            if budget is not None and budget <= 0:
                break
            entry = self._waiting[0]
            if entry.run.done:  # nothing to generate (the prompt fills the context)
                self._waiting.popleft()
                self._finish(entry)
                continue
            prompt = entry.run.request.prompt_ids
            end = len(prompt) if budget is None else min(len(prompt), entry.prefilled + budget)
            if entry.state is None:
                entry.state = self.backend.new_state(1, entry.run.expected_length)
            chunk = np.asarray([prompt[entry.prefilled : end]], dtype=np.int64)  # [1, n]
            try:
                logits = self.backend.prefill(entry.state, chunk)  # [1, vocab]
            except Exception as exc:
                self._waiting.popleft()
                error = exc if isinstance(exc, AgentError) else EngineError(f"{exc}")
                entry.on_finished(entry.run, None, error)
                continue
            if budget is not None:
                budget -= end - entry.prefilled
            entry.prefilled = end
            if end < len(prompt):  # the rest in the next steps, unless the job is called off
                if entry.run.stop_if_interrupted():
                    self._waiting.popleft()
                    self._finish(entry)
                continue
            self._waiting.popleft()
            if entry.run.accept(logits[0]):
                self._finish(entry)
            else:
                joining.append(entry)
        if joining:
            states = ([self._state] if self._rows else []) + [entry.state for entry in joining]
            self._state = states[0] if len(states) == 1 else self.backend.concat(states)
            for entry in joining:
                entry.state = None  # used up by the batch
            self._rows.extend(joining)

    def _finish(self, entry: _Entry) -> None:
        entry.on_finished(entry.run, entry.run.result(), None)


def compacting_order(keep: list[int]) -> list[int]:
    """The surviving rows `keep` in the order that moves the fewest of them: each survivor already
    inside the smaller batch stays where it is, and the gaps take survivors from beyond it."""
    size = len(keep)
    staying = {row for row in keep if row < size}
    from_beyond = iter(row for row in keep if row >= size)
    return [row if row in staying else next(from_beyond) for row in range(size)]
