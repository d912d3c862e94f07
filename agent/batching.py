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

`step()` returns what happened as data (`StepReport`: the text each row produced, the rows that
ended), as vLLM's scheduler returns its outputs: the caller acts on it in one place instead of
being called back from inside the step. A fault in one row (its sampler, detokenizer, stop
strings) ends that row with an error and the others go on; only a failed backend call, which the
whole batch shares, ends every row.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from agent.backends.base import Backend
from agent.config import PREFILL_CHUNK
from agent.errors import AgentError, EngineError
from agent.generation import GenerationResult, SequenceRun

log = logging.getLogger(__name__)


Key = TypeVar("Key")


@dataclass(frozen=True)
class RowEnd(Generic[Key]):
    """A row that left the batch: its result, or why it failed (then `result` is None)."""

    key: Key
    run: SequenceRun
    result: GenerationResult | None
    error: AgentError | None = None


@dataclass
class StepReport(Generic[Key]):
    """What one step did: text produced per row (in order, before that row's end) and the rows
    that ended."""

    texts: list[tuple[Key, str]] = field(default_factory=list)
    ended: list[RowEnd[Key]] = field(default_factory=list)


@dataclass
class _Entry(Generic[Key]):
    run: SequenceRun
    key: Key
    state: Any = None  # its own KV cache while its prompt is prefilled
    prefilled: int = 0  # prompt tokens already in that cache


class BatchGenerator(Generic[Key]):
    """Owns one batched decode state; `step()` admits waiting runs and advances every row.
    `Key` is the caller's name for a row (the agent's active job): reports speak of keys."""

    def __init__(
        self, backend: Backend[Any], max_batch: int, prefill_chunk: int = PREFILL_CHUNK
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # 0: every prompt whole, however long
        self._waiting: deque[_Entry[Key]] = deque()  # first in, first prefilled
        self._rows: list[_Entry[Key]] = []
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

    def submit(self, run: SequenceRun, key: Key) -> None:
        self._waiting.append(_Entry(run, key))

    def remove(self, key: Key) -> bool:
        """Take a row (or a waiting run) out between steps, without an end in any report (the
        caller has already ended its job)."""
        for entry in self._waiting:
            if entry.key == key:
                self._waiting.remove(entry)
                return True
        for index, entry in enumerate(self._rows):
            if entry.key == key:
                self._drop_rows([i for i in range(len(self._rows)) if i != index])
                return True
        return False

    def step(self) -> StepReport[Key]:
        """Prefill waiting prompts (while rows decode, at most `prefill_chunk` tokens of them), let
        those complete join, then one decode step for the whole batch."""
        report: StepReport[Key] = StepReport()
        self._admit(report)
        if not self._rows:
            return report
        token_ids = np.asarray([e.run.next_token for e in self._rows], dtype=np.int64)  # [B]
        try:
            logits = self.backend.decode(self._state, token_ids)  # [B, vocab]
        except Exception as exc:  # the whole batch shares the failed step
            error = _engine_error(exc)
            report.ended.extend(RowEnd(e.key, e.run, None, error) for e in self._rows)
            self._rows, self._state = [], None
            return report
        keep = []
        for index, entry in enumerate(self._rows):
            if self._advance(entry, logits[index], report):
                keep.append(index)
        if len(keep) < len(self._rows):
            self._drop_rows(keep)
        return report

    def _advance(self, entry: _Entry[Key], logits: Any, report: StepReport[Key]) -> bool:
        """Feed one row its logits; True while it goes on. Its own fault ends only it."""
        try:
            finished = entry.run.accept(logits)
            result = entry.run.result() if finished else None
        except Exception as exc:
            log.exception("a row of the batch failed")
            report.ended.append(RowEnd(entry.key, entry.run, None, _row_error(exc)))
            return False
        text = entry.run.take_text()
        if text:
            report.texts.append((entry.key, text))
        if result is not None:
            report.ended.append(RowEnd(entry.key, entry.run, result))
            return False
        return True

    def _drop_rows(self, keep: list[int]) -> None:
        order = compacting_order(keep)
        self._rows = [self._rows[i] for i in order]
        self._state = self.backend.select(self._state, order) if order else None

    def _admit(self, report: StepReport[Key]) -> None:
        # With no row decoding nobody waits on a prefill: every waiting prompt goes in whole.
        budget = self.prefill_chunk if self._rows and self.prefill_chunk > 0 else None
        joining: list[_Entry[Key]] = []
        while self._waiting and len(self._rows) + len(joining) < self.max_batch:
            if budget is not None and budget <= 0:
                break
            entry = self._waiting[0]
            if entry.run.done:  # nothing to generate (the prompt fills the context)
                self._waiting.popleft()
                self._end_unrun(entry, report)
                continue
            prompt = entry.run.request.prompt_ids
            end = len(prompt) if budget is None else min(len(prompt), entry.prefilled + budget)
            try:
                if entry.state is None:
                    entry.state = self.backend.new_state(1, entry.run.expected_length)
                chunk = np.asarray([prompt[entry.prefilled : end]], dtype=np.int64)  # [1, n]
                logits = self.backend.prefill(entry.state, chunk)  # [1, vocab]
            except Exception as exc:  # this prompt's own cache: only it fails
                self._waiting.popleft()
                report.ended.append(RowEnd(entry.key, entry.run, None, _engine_error(exc)))
                continue
            if budget is not None:
                budget -= end - entry.prefilled
            entry.prefilled = end
            if end < len(prompt):  # the rest in the next steps, unless the job is called off
                if self._stopped_between_chunks(entry, report):
                    self._waiting.popleft()
                continue
            self._waiting.popleft()
            if self._advance(entry, logits[0], report):
                joining.append(entry)
        if joining:
            states = ([self._state] if self._rows else []) + [entry.state for entry in joining]
            self._state = states[0] if len(states) == 1 else self.backend.concat(states)
            for entry in joining:
                entry.state = None  # used up by the batch
            self._rows.extend(joining)

    def _stopped_between_chunks(self, entry: _Entry[Key], report: StepReport[Key]) -> bool:
        try:
            stopped = entry.run.stop_if_interrupted()
        except Exception as exc:
            log.exception("a waiting prompt failed between two chunks")
            report.ended.append(RowEnd(entry.key, entry.run, None, _row_error(exc)))
            return True
        if stopped:
            self._end_unrun(entry, report)
        return stopped

    def _end_unrun(self, entry: _Entry[Key], report: StepReport[Key]) -> None:
        try:
            result = entry.run.result()
        except Exception as exc:
            report.ended.append(RowEnd(entry.key, entry.run, None, _row_error(exc)))
            return
        text = entry.run.take_text()
        if text:
            report.texts.append((entry.key, text))
        report.ended.append(RowEnd(entry.key, entry.run, result))


def _engine_error(exc: Exception) -> AgentError:
    return exc if isinstance(exc, AgentError) else EngineError(f"{exc}")


def _row_error(exc: Exception) -> AgentError:
    if isinstance(exc, AgentError):
        return exc
    return EngineError(f"this job failed while decoding ({type(exc).__name__}: {exc})")


def compacting_order(keep: list[int]) -> list[int]:
    """The surviving rows `keep` in the order that moves the fewest of them: each survivor already
    inside the smaller batch stays where it is, and the gaps take survivors from beyond it."""
    size = len(keep)
    staying = {row for row in keep if row < size}
    from_beyond = iter(row for row in keep if row >= size)
    return [row if row in staying else next(from_beyond) for row in range(size)]
