"""Continuous batching: concurrent jobs decode together in one batch.

A new job is prefilled on its own and joins the running batch at the next step (its KV cache
copied in beside the others: each row keeps its own length on the CPU graph, or is left-padded to
the batch's length on past/present graphs); a finished job leaves at once without stalling the
others, its place taken by the last row (`compacting_order`: on the CPU graph that is one row's
copy, not the whole batch's).
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

Finished = Callable[[SequenceRun, GenerationResult | None, AgentError | None], None]


@dataclass
class _Entry:
    run: SequenceRun
    on_finished: Finished


class BatchGenerator:
    """Owns one batched decode state; `step()` admits waiting runs and advances every row."""

    def __init__(self, backend: Backend[Any], max_batch: int) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self._waiting: deque[_Entry] = deque()
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
        """Admit waiting runs (prefill each), then one decode step for the whole batch."""
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
        joining: list[tuple[_Entry, Any]] = []
        while self._waiting and len(self._rows) + len(joining) < self.max_batch:
            entry = self._waiting.popleft()
            if entry.run.done:  # nothing to generate (the prompt fills the context)
                self._finish(entry)
                continue
            state = self.backend.new_state(1, entry.run.expected_length)
            try:
                logits = self.backend.prefill(state, entry.run.prompt_array())  # [1, vocab]
            except Exception as exc:
                error = exc if isinstance(exc, AgentError) else EngineError(f"{exc}")
                entry.on_finished(entry.run, None, error)
                continue
            if entry.run.accept(logits[0]):
                self._finish(entry)
            else:
                joining.append((entry, state))
        if joining:
            states = ([self._state] if self._rows else []) + [state for _, state in joining]
            self._state = states[0] if len(states) == 1 else self.backend.concat(states)
            self._rows.extend(entry for entry, _ in joining)

    def _finish(self, entry: _Entry) -> None:
        entry.on_finished(entry.run, entry.run.result(), None)


def compacting_order(keep: list[int]) -> list[int]:
    """The surviving rows `keep` in the order that moves the fewest of them: each survivor already
    inside the smaller batch stays where it is, and the gaps take survivors from beyond it."""
    size = len(keep)
    staying = {row for row in keep if row < size}
    from_beyond = iter(row for row in keep if row >= size)
    return [row if row in staying else next(from_beyond) for row in range(size)]
