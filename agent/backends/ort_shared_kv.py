"""The shared-buffer KV contract (the CPU graphs with `GroupQueryAttention`).

Per layer one buffer [B, kv_heads, capacity, head_dim] is bound as both `past_key_values.{i}.*`
and `present.{i}.*`: ONNX Runtime's kernel sees the same memory on both sides and writes the new
tokens' K/V in place, so a step copies no cache at all. The buffers are numpy arrays wrapped in
`OrtValue`s (no copy on the CPU): views of the first rows of an arena (`KvArena`) sized for what
the rows' jobs expect to reach, grown by doubling beyond that (one copy per doubling, not one per
token).

Each row keeps its own length (`lengths`): rows start at position 0 and are never padded, so a
joining job costs one copy of its own cache into a spare row of the arena, a leaving job at most
one row's copy (the last row takes its place), and the graph reads each row's true length from
`seqlens_k` (which also gives RoPE its positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from agent.backends.kv_layout import KvLayout

SEQLENS_INPUT = "seqlens_k"  # must match build_engine.quantize.cpu_attention
TOTAL_INPUT = "total_sequence_length"
_ALIGN = 64  # capacity granularity (tokens): small steps for short jobs, doubling beyond


@dataclass
class DecodeBinding:
    """One IOBinding for every decode step of a batch. Every tensor it binds is a numpy array
    wrapped without a copy, bound once: a step writes the new token ids and lengths into those
    arrays in place and makes no bind call at all (four re-binds cost ~40 us per token)."""

    binding: ort.IOBinding
    input_ids: np.ndarray  # [B, 1] int64: the step's tokens, written by `step`
    seqlens: np.ndarray  # [B] int32: each row's length after the step, minus one
    total: np.ndarray  # [] int32: the longest row's length after the step
    logits: np.ndarray  # [B, 1, vocab], written by each run
    values: list[ort.OrtValue]  # keep the bound wrappers alive as long as the binding

    def step(self, token_ids: np.ndarray, lengths: np.ndarray, longest: int) -> None:
        """Set up the next run: one new token per row on top of `lengths` cached tokens (the
        longest row holds `longest`)."""
        self.input_ids[:, 0] = token_ids
        self.seqlens[:] = lengths
        self.total[()] = longest + 1


@dataclass
class KvArena:
    """Per-layer buffers [rows, kv_heads, capacity, head_dim] that batches view the first rows of.
    Spare rows let a joining job be copied in beside the others without moving them, and a leaving
    job's row be filled by the last row instead of copying every row into new buffers."""

    buffers: dict[str, np.ndarray]
    rows: int
    capacity: int


@dataclass
class SharedKvState:
    """One batch: each row's length, and views of the first `batch_size` rows of an arena."""

    lengths: np.ndarray  # [B] int64: tokens in each row's cache
    planned: np.ndarray  # [B] int64: tokens each row's job expects to reach (0 = unknown)
    arena: KvArena | None = None
    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # this batch's rows
    values: dict[str, ort.OrtValue] = field(default_factory=dict)
    decode: DecodeBinding | None = None  # reused while the buffers stay the same

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def length(self) -> int:
        """The longest row (rows are not padded to a common length)."""
        return int(self.lengths.max()) if self.lengths.size else 0

    @property
    def capacity(self) -> int:
        return self.arena.capacity if self.arena is not None else 0


class SharedKvCache:
    """Allocates, binds and reshapes `SharedKvState`s for one session.

    `concat` and `select` use up the states they are given: the result may view the same arena.
    """

    def __init__(self, layout: KvLayout, max_seq_len: int) -> None:
        self._layout = layout
        self._max_seq_len = max_seq_len

    def new_state(self, batch_size: int, expected_length: int = 0) -> SharedKvState:
        return SharedKvState(
            np.zeros(batch_size, np.int64), np.full(batch_size, expected_length, np.int64)
        )

    def longest(self, state: SharedKvState) -> int:
        return state.length

    def bind(self, binding: ort.IOBinding, state: SharedKvState, new: int) -> None:
        self._reserve(state, int(state.lengths.max()) + new)
        self._bind_lengths(binding, state, new)
        self._bind_buffers(binding, state)

    def decode_binding(
        self,
        session: ort.InferenceSession,
        state: SharedKvState,
        vocab: int,
        constants: dict[str, np.ndarray],
        longest: int,
    ) -> DecodeBinding:
        """The batch's reusable decode binding (rebuilt only when the buffers grow), `constants`
        bound as inputs once: per step, ~120 bind calls and the output wrappers disappear.
        `longest` is the longest row's length now, one token short of what the step needs."""
        self._reserve(state, longest + 1)
        cached = state.decode
        if cached is None:  # a new state, or its buffers moved to a bigger arena
            batch = state.batch_size
            binding = session.io_binding()
            self._bind_buffers(binding, state)
            inputs: dict[str, np.ndarray] = {
                "input_ids": np.zeros((batch, 1), np.int64),
                SEQLENS_INPUT: np.zeros(batch, np.int32),
                TOTAL_INPUT: np.zeros((), np.int32),
                **constants,
            }
            logits = np.empty((batch, 1, vocab), np.float32)
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (*inputs.values(), logits)]
            for name, value in zip(inputs, values[:-1], strict=True):
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("logits", values[-1])
            cached = state.decode = DecodeBinding(
                binding,
                inputs["input_ids"],
                inputs[SEQLENS_INPUT],
                inputs[TOTAL_INPUT],
                logits,
                values,
            )
        return cached

    def _bind_lengths(self, binding: ort.IOBinding, state: SharedKvState, new: int) -> None:
        after = state.lengths + new
        binding.bind_cpu_input(SEQLENS_INPUT, (after - 1).astype(np.int32))
        binding.bind_cpu_input(TOTAL_INPUT, np.array(after.max(), dtype=np.int32))

    def _bind_buffers(self, binding: ort.IOBinding, state: SharedKvState) -> None:
        for past, present in zip(self._layout.past_names, self._layout.present_names, strict=True):
            binding.bind_ortvalue_input(past, state.values[past])
            binding.bind_ortvalue_output(present, state.values[past])

    def advance(self, state: SharedKvState, presents: list[ort.OrtValue], new: int) -> None:
        del presents  # written in place, into the buffers bound as both past and present
        state.lengths += new  # each state owns its lengths array (select and concat copy)

    def concat(self, states: list[SharedKvState]) -> SharedKvState:
        """The first state's arena takes the others' rows when it has room for them (a job
        joining a running batch costs a copy of its own cache only); otherwise a bigger arena
        takes every row."""
        first = states[0]
        joined = SharedKvState(
            np.concatenate([st.lengths for st in states]),
            np.concatenate([st.planned for st in states]),
        )
        arena = first.arena
        if arena is not None and self._fits(arena, joined):
            start, moving = first.batch_size, states[1:]
        else:
            rows = max(joined.batch_size, 2 * arena.rows if arena is not None else 0)
            arena = self._new_arena(rows, self._capacity_for(joined, joined.length))
            start, moving = 0, states
        for st in moving:
            _copy_rows(arena, st, start)
            start += st.batch_size
        self._view(joined, arena)
        return joined

    def select(self, state: SharedKvState, rows: list[int]) -> SharedKvState:
        """Rows that stay where they are are not touched; a row that moves into a place left by
        a finished job is copied there (the batch fills gaps from its end: `compacting_order`).
        Any other order is copied into a new arena."""
        kept = SharedKvState(state.lengths[rows], state.planned[rows])
        if not rows or state.arena is None:
            return kept
        size = len(rows)
        movers = [(place, row) for place, row in enumerate(rows) if row != place]
        if len(set(rows)) == size and all(row >= size for _, row in movers):
            arena = state.arena  # the movers' sources lie beyond every place written
            for place, row in movers:
                _copy_rows(arena, state, place, [row])
        else:
            arena = self._new_arena(size, self._capacity_for(kept, kept.length))
            _copy_rows(arena, state, 0, rows)
        self._view(kept, arena)
        return kept

    def _reserve(self, state: SharedKvState, needed: int) -> None:
        """Make room for `needed` tokens per row, keeping what the buffers hold."""
        if state.arena is not None and needed <= state.arena.capacity:
            return
        rows = state.arena.rows if state.arena is not None else state.batch_size
        grow_from = state.capacity
        arena = self._new_arena(rows, self._capacity_for(state, needed, grow_from=grow_from))
        if state.arena is not None:
            _copy_rows(arena, state, 0)
        self._view(state, arena)

    def _fits(self, arena: KvArena, state: SharedKvState) -> bool:
        wanted = self._capacity_for(state, state.length)
        return state.batch_size <= arena.rows and wanted <= arena.capacity

    def _capacity_for(self, state: SharedKvState, needed: int, grow_from: int = 0) -> int:
        """Room for what the rows' jobs expect to reach (so a job's cache is not copied into a
        bigger buffer mid-answer); beyond that, or when unknown, double what there was."""
        planned = int(state.planned.max()) if state.planned.size else 0
        wanted = planned if needed <= planned else max(needed, 2 * grow_from)
        aligned = -(-wanted // _ALIGN) * _ALIGN
        return max(needed, min(aligned, self._max_seq_len))

    def _new_arena(self, rows: int, capacity: int) -> KvArena:
        # np.zeros maps fresh zero pages lazily: capacity and spare rows cost memory only when
        # written.
        buffers = {name: self._layout.empty(rows, capacity) for name in self._layout.past_names}
        return KvArena(buffers, rows, capacity)

    def _view(self, state: SharedKvState, arena: KvArena) -> None:
        """Point `state` at the first rows of `arena` (a leading-axis slice: contiguous)."""
        state.arena = arena
        state.buffers = {name: buf[: state.batch_size] for name, buf in arena.buffers.items()}
        state.values = {
            name: ort.OrtValue.ortvalue_from_numpy(view) for name, view in state.buffers.items()
        }
        state.decode = None


def _copy_rows(
    arena: KvArena, source: SharedKvState, start: int, rows: list[int] | None = None
) -> None:
    """Copy the used part of `source`'s `rows` (all of them, in order, by default) into the
    arena's rows from `start` on."""
    picked: slice | list[int] = slice(None) if rows is None else rows
    lengths = source.lengths[picked]
    used = int(lengths.max()) if lengths.size else 0
    if not used:
        return
    end = start + len(lengths)
    for name, buffer in arena.buffers.items():
        buffer[start:end, :, :used] = source.buffers[name][picked, :, :used]
