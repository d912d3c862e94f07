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
    """One IOBinding for every decode step of a batch: the KV buffers and a preallocated logits
    buffer are bound once; a step rebinds only the token ids and the lengths."""

    binding: ort.IOBinding
    logits: np.ndarray  # [B, 1, vocab], written by each step
    logits_value: ort.OrtValue  # keeps the binding's output alive
    capacity: int


@dataclass
class SharedKvState:
    """One batch: each row's length and the per-layer buffers holding its cache."""

    lengths: np.ndarray  # [B] int64: tokens in each row's cache
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

    def new_state(self, batch_size: int) -> SharedKvState:
        return SharedKvState(np.zeros(batch_size, np.int64))

    def longest(self, state: SharedKvState) -> int:
        return state.length

    def bind(self, binding: ort.IOBinding, state: SharedKvState, new: int) -> None:
        self._reserve(state, int(state.lengths.max()) + new)
        self._bind_lengths(binding, state, new)
        self._bind_buffers(binding, state)

    def decode_binding(
        self, session: ort.InferenceSession, state: SharedKvState, vocab: int
    ) -> DecodeBinding:
        """The batch's reusable decode binding, lengths bound for the next token (rebuilt only
        when the buffers grow): per step, ~120 bind calls and the output wrappers disappear."""
        self._reserve(state, int(state.lengths.max()) + 1)
        cached = state.decode
        if cached is None or cached.capacity != state.capacity:
            binding = session.io_binding()
            self._bind_buffers(binding, state)
            logits = np.empty((state.batch_size, 1, vocab), np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(logits)
            binding.bind_ortvalue_output("logits", value)
            cached = state.decode = DecodeBinding(binding, logits, value, state.capacity)
        self._bind_lengths(cached.binding, state, 1)
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
        joined = SharedKvState(lengths)
        self._allocate(joined, self._capacity_for(int(lengths.max())))
        row = 0
        for st in states:
            used = st.length
            for name, buffer in joined.buffers.items() if used else ():
                buffer[row : row + st.batch_size, :, :used] = st.buffers[name][:, :, :used]
            row += st.batch_size
        return joined

    def select(self, state: SharedKvState, rows: list[int]) -> SharedKvState:
        kept = SharedKvState(state.lengths[rows])
        used = kept.length
        self._allocate(kept, self._capacity_for(used) if rows else 0)
        for name, buffer in kept.buffers.items():
            buffer[:, :, :used] = state.buffers[name][rows, :, :used]
        return kept

    def _reserve(self, state: SharedKvState, needed: int) -> None:
        """Make room for `needed` tokens per row, keeping what the buffers hold."""
        if needed <= state.capacity:
            return
        old, used = state.buffers, state.length
        self._allocate(state, self._capacity_for(needed, grow_from=state.capacity))
        for name, buffer in old.items():
            state.buffers[name][:, :, :used] = buffer[:, :, :used]

    def _capacity_for(self, needed: int, grow_from: int = 0) -> int:
        wanted = max(needed, 2 * grow_from)
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
