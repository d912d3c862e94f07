"""`TensorRTBackend`: the Backend interface over an engine with named tensors and two profiles.

Memory is planned once (`plan.py`) and allocated once, at the profiles' maximum shapes:

- KV cache: two sets A and B, each one buffer of [max_batch, kv_heads, max_context, head_dim]
  per past tensor. A state leases a run of rows (`kv_rows.py`); its cache is the tensor
  [B, H, past, D] packed at the start of those rows. A step binds `past_key_values.*` there in
  one set and `present.*` at the same place in the other set, where the graph writes
  [B, H, past + S, D]. That present is exactly the next step's past, so the two sets swap roles
  (ping-pong) and a step never copies the cache.
- input_ids / attention_mask / position_ids: written from the host each step (a few KB).
- logits: the graph returns [B, S, vocab]; only the last position of each row crosses back to
  the host, one strided copy of B * vocab values.

Joining batches (`concat`) and dropping finished rows (`select`) regroup rows with device-side
copies into the other set; that is the only time cache data moves. Long prompts are prefilled in
chunks of the prefill profile's maximum length (the prefill profile accepts a past).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from agent.backends.base import BackendInfo, Logits, TokenIds
from agent.backends.kv_layout import pad_left
from agent.backends.tensorrt.kv_rows import RowLease, RowPool
from agent.backends.tensorrt.plan import BufferPlan, plan_buffers
from agent.backends.tensorrt.profiles import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    profile_for_step,
)
from agent.backends.tensorrt.seam import InferenceEngine, TensorBuffer
from agent.errors import EngineError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TrtDecodeState:
    """A batch's rows of the backend's KV cache and its attention mask."""

    batch_size: int
    attention_mask: np.ndarray[Any, Any]  # [B, past] int64 on the host; 0 = left padding
    lease: RowLease  # the KV rows this batch owns
    front: int = 0  # the KV set holding the past: 0 (A) or 1 (B)
    _finalizer: Any = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


class TensorRTBackend:
    """Backend over an `InferenceEngine` (TensorRT on the device); owns the engine and memory."""

    def __init__(self, engine: InferenceEngine, *, max_seq_len: int | None = None) -> None:
        self._engine = engine
        self._buffers: list[TensorBuffer] = []
        self._closed = False
        with engine.device_scope():
            self.plan: BufferPlan = plan_buffers(engine, max_seq_len)
            try:
                self._allocate()
            except BaseException:
                self._free()
                raise
        self._rows = RowPool(self.plan.max_batch)
        self._host_logits = np.empty((self.plan.max_batch, self.plan.vocab), self.plan.logits_dtype)
        self.max_batch = self.plan.max_batch
        self.info = BackendInfo(
            name=engine.kind,
            device=engine.device,
            max_seq_len=self.plan.max_context,
            vocab_size=self.plan.vocab,
            max_batch=self.plan.max_batch,
        )
        log.info(
            "%s backend: batch <= %d, context %d, prefill chunks of %d, %.0f MiB of buffers",
            engine.kind,
            self.plan.max_batch,
            self.plan.max_context,
            self.plan.max_prefill,
            self.plan.total_bytes / 2**20,
        )

    def _allocate(self) -> None:
        plan = self.plan
        self._kv: tuple[dict[str, TensorBuffer], dict[str, TensorBuffer]] = (
            {name: self._new(plan.kv_tensor_bytes) for name in plan.kv.past_names},
            {name: self._new(plan.kv_tensor_bytes) for name in plan.kv.past_names},
        )
        self._ids = self._new(plan.ids_bytes)
        self._mask = self._new(plan.mask_bytes)
        self._positions = self._new(plan.positions_bytes) if plan.positions_dtype else None
        self._logits = self._new(plan.logits_bytes)

    def _new(self, nbytes: int) -> TensorBuffer:
        buffer = self._engine.allocate(nbytes)
        self._buffers.append(buffer)
        return buffer

    # --- Backend -----------------------------------------------------------------------------

    def new_state(self, batch_size: int, expected_length: int = 0) -> TrtDecodeState:
        del expected_length  # rows are leased from buffers sized by the engine's profile
        self._check_open()
        if batch_size < 1:
            raise EngineError(f"a batch needs at least one row, got {batch_size}")
        lease = self._rows.take(batch_size)
        return self._state(batch_size, np.zeros((batch_size, 0), np.int64), lease, front=0)

    def prefill(self, state: TrtDecodeState, input_ids: TokenIds) -> Logits:
        ids = np.asarray(input_ids, dtype=np.int64)  # [B, S]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise EngineError(f"prefill takes token ids [B, S] with S >= 1, got {ids.shape}")
        logits: Logits | None = None
        for start in range(0, ids.shape[1], self.plan.max_prefill):
            logits = self._step(state, ids[:, start : start + self.plan.max_prefill])
        assert logits is not None
        return logits

    def decode(self, state: TrtDecodeState, token_ids: TokenIds) -> Logits:
        return self._step(state, np.asarray(token_ids, dtype=np.int64).reshape(-1, 1))

    def concat(self, states: list[TrtDecodeState]) -> TrtDecodeState:
        """Rows of `states` in order, left-padded to the longest; the inputs are used up."""
        self._check_open()
        for state in states:
            self._check_state(state)
        if len(states) == 1:
            return states[0]
        length = max(st.length for st in states)
        batch = sum(st.batch_size for st in states)
        with self._engine.device_scope():
            front = states[0].front
            for state in states:  # every input's past in the same set, so the other set is free
                if state.front != front:
                    self._move_to_other_set(state)
            lease = self._rows.take(batch, reuse=[st.lease for st in states])
            row = 0
            for state in states:
                self._copy_rows(
                    state, list(range(state.batch_size)), lease, row, length, first_column=0
                )
                row += state.batch_size
        mask = np.concatenate([pad_left(st.attention_mask, length, axis=1) for st in states])
        for state in states:
            self._retire(state)
        return self._state(batch, mask, lease, front=1 - front)

    def select(self, state: TrtDecodeState, rows: list[int]) -> TrtDecodeState:
        """Only `rows` of `state`, dropping left columns none of them attends to; `state` is used
        up."""
        self._check_open()
        self._check_state(state)
        if not rows or any(not 0 <= r < state.batch_size for r in rows):
            raise EngineError(f"rows {rows} do not select from a batch of {state.batch_size}")
        mask = state.attention_mask[rows]
        first = int(np.argmax(mask.any(axis=0))) if mask.size else 0
        with self._engine.device_scope():
            lease = self._rows.take(len(rows), reuse=[state.lease])
            self._copy_rows(state, rows, lease, 0, state.length - first, first_column=first)
        self._retire(state)
        return self._state(len(rows), np.ascontiguousarray(mask[:, first:]), lease, 1 - state.front)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._engine.device_scope():
                self._free()
        finally:
            self._engine.close()

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- one engine step ---------------------------------------------------------------------

    def _step(self, state: TrtDecodeState, input_ids: TokenIds) -> Logits:
        self._check_open()
        self._check_state(state)
        batch, new = input_ids.shape
        past = state.length
        if batch != state.batch_size:
            raise EngineError(f"batch of {batch} rows given to a state of {state.batch_size}")
        if past + new > self.plan.max_context:
            raise EngineError(f"context full: {past} + {new} tokens > {self.plan.max_context}")
        mask = np.concatenate([state.attention_mask, np.ones((batch, new), np.int64)], axis=1)
        with self._engine.device_scope():
            self._bind_and_run(state, input_ids, mask)
            logits = self._last_position_logits(batch, new)
        state.attention_mask = mask
        state.front = 1 - state.front  # this step's present is the next step's past
        return logits

    def _bind_and_run(
        self, state: TrtDecodeState, input_ids: TokenIds, mask: np.ndarray[Any, Any]
    ) -> None:
        engine, plan = self._engine, self.plan
        batch, new = input_ids.shape
        past = state.length
        engine.set_optimization_profile(profile_for_step(past, new))
        self._bind_input(INPUT_IDS, self._ids, input_ids.astype(plan.ids_dtype, copy=False))
        self._bind_input(ATTENTION_MASK, self._mask, mask.astype(plan.mask_dtype, copy=False))
        if self._positions is not None and plan.positions_dtype is not None:
            # Positions count only real (unmasked) tokens, so left-padded rows stay correct.
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new:]
            self._bind_input(POSITION_IDS, self._positions, positions.astype(plan.positions_dtype))
        source, target = self._kv[state.front], self._kv[1 - state.front]
        offset = state.lease.start * plan.kv_row_bytes
        past_shape = (batch, plan.kv.kv_heads, past, plan.kv.head_dim)
        for past_name, present_name in zip(plan.kv.past_names, plan.kv.present_names, strict=True):
            engine.set_input_shape(past_name, past_shape)
            # Even an empty past (first prefill) is bound to its own real buffer: TensorRT wants
            # a non-null, distinct address for an empty tensor (see profiles.py).
            engine.set_tensor_address(past_name, source[past_name], offset)
            engine.set_tensor_address(present_name, target[past_name], offset)
        engine.set_tensor_address(LOGITS, self._logits)
        expected = (batch, plan.kv.kv_heads, past + new, plan.kv.head_dim)
        first_present = plan.kv.present_names[0]
        if engine.output_shape(first_present) != expected:
            raise EngineError(
                f"{first_present} would be {list(engine.output_shape(first_present))}, "
                f"expected {list(expected)}: the engine's cache layout is not [B, H, past, D]"
            )
        engine.execute()

    def _bind_input(self, name: str, buffer: TensorBuffer, values: np.ndarray[Any, Any]) -> None:
        values = np.ascontiguousarray(values)
        self._engine.set_input_shape(name, values.shape)
        buffer.write(values)
        self._engine.set_tensor_address(name, buffer)

    def _last_position_logits(self, batch: int, new: int) -> Logits:
        shape = self._engine.output_shape(LOGITS)
        if tuple(shape) != (batch, new, self.plan.vocab):
            raise EngineError(f"logits would be {list(shape)}, expected [B, S, vocab]")
        row = self.plan.vocab * self.plan.logits_dtype.itemsize
        out = self._host_logits[:batch]
        # Row b's last position starts at (b*S + S-1) * vocab: offset (S-1)*vocab, pitch S*vocab.
        self._logits.read_rows(out, offset=(new - 1) * row, pitch=new * row)
        return np.array(out, dtype=np.float32)  # a copy: the host buffer is reused next step

    # --- regrouping rows (concat, select) ------------------------------------------------------

    def _copy_rows(
        self,
        state: TrtDecodeState,
        rows: list[int],
        lease: RowLease,
        first_row: int,
        length: int,
        *,
        first_column: int,
    ) -> None:
        """Copy `rows` of `state`'s cache (from column `first_column` on) into the other set as
        rows `first_row`.. of a [*, H, length, D] tensor at `lease`, left-padding with zeros.
        Padded columns are masked out, but zeroed so stale memory (possibly NaN) never meets
        the attention arithmetic."""
        plan, kv = self.plan, self.plan.kv
        column = kv.head_dim * kv.dtype.itemsize  # bytes of one position of one head
        kept = state.length - first_column
        pad = length - kept
        src_line, dst_line = state.length * column, length * column
        src_base = state.lease.start * plan.kv_row_bytes
        dst_base = lease.start * plan.kv_row_bytes + first_row * kv.kv_heads * dst_line
        source, target = self._kv[state.front], self._kv[1 - state.front]
        for name in kv.past_names:
            for index, row in enumerate(rows):
                dst = dst_base + index * kv.kv_heads * dst_line
                src = src_base + row * kv.kv_heads * src_line + first_column * column
                if pad:
                    self._engine.zero_2d(
                        target[name], offset=dst, pitch=dst_line, width=pad * column,
                        height=kv.kv_heads,
                    )  # fmt: skip
                if kept:
                    self._engine.copy_2d(
                        target[name], source[name], dst_offset=dst + pad * column,
                        dst_pitch=dst_line, src_offset=src, src_pitch=src_line,
                        width=kept * column, height=kv.kv_heads,
                    )  # fmt: skip

    def _move_to_other_set(self, state: TrtDecodeState) -> None:
        """Copy a state's cache, in place, to the other set (its own rows in both sets)."""
        nbytes = (
            state.batch_size
            * self.plan.kv.kv_heads
            * state.length
            * (self.plan.kv.head_dim * self.plan.kv.dtype.itemsize)
        )
        offset = state.lease.start * self.plan.kv_row_bytes
        source, target = self._kv[state.front], self._kv[1 - state.front]
        if nbytes:
            for name in self.plan.kv.past_names:
                self._engine.copy_2d(
                    target[name], source[name], dst_offset=offset, dst_pitch=nbytes,
                    src_offset=offset, src_pitch=nbytes, width=nbytes, height=1,
                )  # fmt: skip
        state.front = 1 - state.front

    # --- lifetime ----------------------------------------------------------------------------

    def _state(
        self, batch: int, mask: np.ndarray[Any, Any], lease: RowLease, front: int
    ) -> TrtDecodeState:
        state = TrtDecodeState(batch, mask, lease, front)
        # A state the caller drops gives its rows back (generate() and the batcher never close
        # states explicitly).
        state._finalizer = weakref.finalize(state, self._rows.release, lease)
        return state

    def _retire(self, state: TrtDecodeState) -> None:
        """`state` handed its rows over: later use of it is an error."""
        if state._finalizer is not None:
            state._finalizer.detach()
        self._rows.release(state.lease)

    def _check_state(self, state: TrtDecodeState) -> None:
        if not state.lease.active:
            raise EngineError(
                "this decode state was used up by concat() or select(); use the state they returned"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the TensorRT backend was closed")

    def _free(self) -> None:
        while self._buffers:
            self._buffers.pop().close()
