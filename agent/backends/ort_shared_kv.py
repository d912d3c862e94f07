"""The shared-buffer KV contract (the CPU graphs with `GroupQueryAttention`).

Per layer one buffer [B, kv_heads, capacity, head_dim] is bound as both `past_key_values.{i}.*`
and `present.{i}.*`: ONNX Runtime's kernel sees the same memory on both sides and writes the new
tokens' K/V in place, so a step copies no cache at all. The buffers are numpy arrays wrapped in
`OrtValue`s (no copy on the CPU), allocated per batch and grown by doubling when a row reaches the
end (amortised: one copy per doubling, not one per token).

Each row keeps its own length (`lengths`): rows start at position 0 and are never padded, so a
joining job costs one copy of its own cache into the batch's buffers, and the graph reads each
row's true length from `seqlens_k` (which also gives RoPE its positions).
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
    capacity: int

    def step(self, token_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Set up the next run: one new token per row on top of `lengths` cached tokens."""
        self.input_ids[:, 0] = token_ids
        self.seqlens[:] = lengths
        self.total[()] = lengths.max() + 1


@dataclass
class SharedKvState:
    """One batch: each row's length and the per-layer buffers holding its cache."""

    lengths: np.ndarray  # [B] int64: tokens in each row's cache
    planned: np.ndarray  # [B] int64: tokens each row's job expects to reach (0 = unknown)
    capacity: int = 0
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, ort.OrtValue] = field(default_factory=dict)
    decode: DecodeBinding | None = None  # reused while the buffers stay the same

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def length(self) -> int:
        """The longest row (rows are not padded to a common length)."""
        return int(self.lengths.max()) if self.lengths.size else 0


class SharedKvCache:
    """Allocates, binds and reshapes `SharedKvState`s for one session."""

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
    ) -> DecodeBinding:
        """The batch's reusable decode binding (rebuilt only when the buffers grow), `constants`
        bound as inputs once: per step, ~120 bind calls and the output wrappers disappear."""
        self._reserve(state, int(state.lengths.max()) + 1)
        cached = state.decode
        if cached is None or cached.capacity != state.capacity:
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
                state.capacity,
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
        state.lengths = state.lengths + new

    def concat(self, states: list[SharedKvState]) -> SharedKvState:
        lengths = np.concatenate([st.lengths for st in states])
        joined = SharedKvState(lengths, np.concatenate([st.planned for st in states]))
        self._allocate(joined, self._capacity_for(joined, int(lengths.max())))
        row = 0
        for st in states:
            used = st.length
            for name, buffer in joined.buffers.items() if used else ():
                buffer[row : row + st.batch_size, :, :used] = st.buffers[name][:, :, :used]
            row += st.batch_size
        return joined

    def select(self, state: SharedKvState, rows: list[int]) -> SharedKvState:
        kept = SharedKvState(state.lengths[rows], state.planned[rows])
        used = kept.length
        self._allocate(kept, self._capacity_for(kept, used) if rows else 0)
        for name, buffer in kept.buffers.items():
            buffer[:, :, :used] = state.buffers[name][rows, :, :used]
        return kept

    def _reserve(self, state: SharedKvState, needed: int) -> None:
        """Make room for `needed` tokens per row, keeping what the buffers hold."""
        if needed <= state.capacity:
            return
        old, used = state.buffers, state.length
        self._allocate(state, self._capacity_for(state, needed, grow_from=state.capacity))
        for name, buffer in old.items():
            state.buffers[name][:, :, :used] = buffer[:, :, :used]

    def _capacity_for(self, state: SharedKvState, needed: int, grow_from: int = 0) -> int:
        """Room for what the rows' jobs expect to reach (so a job's cache is not copied into a
        bigger buffer mid-answer); beyond that, or when unknown, double what there was."""
        planned = int(state.planned.max()) if state.planned.size else 0
        wanted = planned if needed <= planned else max(needed, 2 * grow_from)
        aligned = -(-wanted // _ALIGN) * _ALIGN
        return max(needed, min(aligned, self._max_seq_len))

    def _allocate(self, state: SharedKvState, capacity: int) -> None:
        # np.zeros maps fresh zero pages lazily: a large capacity costs memory only when written.
        state.capacity = capacity
        state.buffers = {
            name: self._layout.empty(state.batch_size, capacity) for name in self._layout.past_names
        }
        state.values = {
            name: ort.OrtValue.ortvalue_from_numpy(buffer) for name, buffer in state.buffers.items()
        }
