"""The past/present KV contract (optimum's export, and every graph built for TensorRT).

The graph takes `attention_mask` (+ `position_ids`) and `past_key_values.{i}.key|value`
([B, kv_heads, past, head_dim]) and returns `present.{i}.*` one token longer. The presents stay in
ONNX Runtime's own `OrtValue`s and are bound as the next step's pasts (never copied through numpy),
but the graph itself copies the whole cache into each present every step. Rows of different
lengths share a batch by left padding, masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from agent.backends.kv_layout import KvLayout, pad_left


@dataclass
class PastPresentState:
    """KV cache of one batch, kept as OrtValues between steps."""

    batch_size: int
    attention_mask: np.ndarray  # [B, past] int64; rows may later be left-padded with zeros
    past: dict[str, ort.OrtValue] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


class PastPresentCache:
    """Binds and advances `PastPresentState`s for one session."""

    def __init__(self, layout: KvLayout, input_names: set[str]) -> None:
        self._layout = layout
        self._has_position_ids = "position_ids" in input_names

    def new_state(self, batch_size: int, expected_length: int = 0) -> PastPresentState:
        del expected_length  # the graph writes a new, one token longer cache every step
        return PastPresentState(batch_size, np.zeros((batch_size, 0), dtype=np.int64))

    def longest(self, state: PastPresentState) -> int:
        return state.length

    def bind(self, binding: ort.IOBinding, state: PastPresentState, new: int) -> None:
        batch = state.batch_size
        mask = np.concatenate([state.attention_mask, np.ones((batch, new), np.int64)], axis=1)
        binding.bind_cpu_input("attention_mask", mask)
        if self._has_position_ids:
            # Positions count only real (unmasked) tokens, so left-padded rows stay correct.
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new:]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name in self._layout.past_names:
            value = state.past.get(name)
            if value is None:
                value = ort.OrtValue.ortvalue_from_numpy(self._layout.empty(batch, 0))
            binding.bind_ortvalue_input(name, value)
        for present in self._layout.present_names:
            binding.bind_output(present, "cpu")

    def advance(self, state: PastPresentState, presents: list[ort.OrtValue], new: int) -> None:
        """After a step: the presents (in `present_names` order) are the next step's pasts."""
        state.past = dict(zip(self._layout.past_names, presents, strict=True))
        ones = np.ones((state.batch_size, new), np.int64)
        state.attention_mask = np.concatenate([state.attention_mask, ones], axis=1)

    def concat(self, states: list[PastPresentState]) -> PastPresentState:
        length = max(st.length for st in states)
        batch = sum(st.batch_size for st in states)
        mask = np.concatenate([pad_left(st.attention_mask, length, axis=1) for st in states])
        past = {
            name: ort.OrtValue.ortvalue_from_numpy(
                np.concatenate([pad_left(st.past[name].numpy(), length, axis=2) for st in states])
            )
            for name in self._layout.past_names
        }
        return PastPresentState(batch, mask, past)

    def select(self, state: PastPresentState, rows: list[int]) -> PastPresentState:
        mask = state.attention_mask[rows]
        # Columns no remaining row attends to (left padding of rows that left) are dropped.
        first = int(np.argmax(mask.any(axis=0))) if mask.size else 0
        past = {
            name: ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value.numpy()[rows][:, :, first:, :])
            )
            for name, value in state.past.items()
        }
        return PastPresentState(len(rows), np.ascontiguousarray(mask[:, first:]), past)
