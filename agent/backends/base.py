"""The one interface every inference backend implements.

A backend runs a causal LM over a KV cache with a batch dimension everywhere: the generation loop,
sampling and streaming above it are shared by ONNX Runtime and TensorRT. A `DecodeState` owns one
batch's KV cache; `prefill` appends a block of tokens per row, `decode` appends one token per row.
Both return only the logits of the last position of each row, which is all generation needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

TokenIds = npt.NDArray[np.int64]
Logits = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BackendInfo:
    """What the backend is and what it can hold."""

    name: str  # "onnxruntime" | "tensorrt"
    device: str  # e.g. "cpu", "cuda:0"
    max_seq_len: int  # tokens of context one row can hold (prompt + generated)
    vocab_size: int
    max_batch: int = 0  # rows one batch can hold; 0 = no fixed limit (ONNX Runtime)


class DecodeState(Protocol):
    """One batch's KV cache and bookkeeping, owned by the backend that made it."""

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int:
        """Tokens already in the cache per row (the past sequence length)."""
        ...


StateT = TypeVar("StateT", bound=DecodeState)


class Backend(Protocol[StateT]):
    info: BackendInfo

    def new_state(self, batch_size: int, expected_length: int = 0) -> StateT:
        """An empty KV cache for `batch_size` rows. `expected_length` is how many tokens per row
        the caller expects to reach (prompt + the most it may generate; 0 = unknown): a backend
        whose cache grows may allocate that much at once instead of growing it mid-job."""
        ...

    def prefill(self, state: StateT, input_ids: TokenIds) -> Logits:
        """input_ids: [B, S] -> logits of each row's last position: [B, vocab]."""
        ...

    def decode(self, state: StateT, token_ids: TokenIds) -> Logits:
        """token_ids: [B] (one new token per row) -> next-token logits: [B, vocab]."""
        ...

    def concat(self, states: list[StateT]) -> StateT:
        """One batch holding every row of `states`, in order: how a new job joins a running
        batch. Rows of different lengths keep their own lengths where the graph takes per-row
        lengths (ONNX Runtime's CPU graph), or are left-padded and masked (past/present graphs,
        TensorRT)."""
        ...

    def select(self, state: StateT, rows: list[int]) -> StateT:
        """A batch of only `rows` of `state` (finished jobs leave the batch)."""
        ...

    def close(self) -> None:
        """Release sessions and device memory."""
        ...
