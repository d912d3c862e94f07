"""The engine seam: the little the TensorRT backend needs from whatever runs the compiled graph.

TensorRT 10's runtime is a named-tensor API: ask the engine for its I/O tensors, their dtypes and
per-profile shape ranges, choose an optimization profile, set each input's shape, point every
tensor at memory, launch on a stream, read the outputs back. This Protocol is exactly that and no
more, so the step logic in `backend.py` is written once and runs over two adapters:

- `trt_engine.TensorRTEngine`: TensorRT and device memory, on the Jetson;
- `ort_engine.OrtSeamEngine`: ONNX Runtime on the CPU with host memory, which is NOT TensorRT
  but lets the whole backend run, and be tested, where there is no GPU.

Both take the caller's buffers by address (TensorRT's `set_tensor_address`, ONNX Runtime's
IO binding with `buffer_ptr`), so the KV cache is really reused in place on both.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

Shape = tuple[int, ...]
ProfileShape = tuple[Shape, Shape, Shape]  # (min, opt, max), as get_tensor_profile_shape returns


class TensorBuffer(Protocol):
    """Memory one tensor is bound to: device memory on the GPU, a host array in the CPU adapter."""

    @property
    def nbytes(self) -> int: ...

    @property
    def address(self) -> int:
        """What `set_tensor_address` binds (a device pointer, or a host pointer on the CPU)."""
        ...

    def write(self, array: np.ndarray[Any, Any]) -> None:
        """Copy a C-contiguous host array to the start of the buffer, ordered before the next
        `execute` of the engine that allocated it."""
        ...

    def read_rows(self, out: np.ndarray[Any, Any], *, offset: int, pitch: int) -> None:
        """Fill `out[r]` for every row r from the bytes at `offset + r * pitch`; returns once `out`
        holds them (so it also waits for the engine's work before it)."""
        ...

    def close(self) -> None: ...


class InferenceEngine(Protocol):
    """A compiled graph with named I/O tensors and optimization profiles."""

    kind: str  # what runs the graph, shown in BackendInfo.name: "tensorrt" | "onnxruntime-seam"
    device: str  # e.g. "cuda:0", "cpu"

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def output_names(self) -> tuple[str, ...]: ...

    @property
    def num_profiles(self) -> int: ...

    def dtype(self, name: str) -> np.dtype[Any]: ...

    def tensor_shape(self, name: str) -> Shape:
        """The tensor's shape as built, -1 for each dynamic dimension."""
        ...

    def profile_shapes(self, name: str, profile: int) -> ProfileShape:
        """(min, opt, max) of an input tensor in one optimization profile."""
        ...

    def allocate(self, nbytes: int) -> TensorBuffer:
        """Memory the engine can bind a tensor to (caller closes it)."""
        ...

    def set_optimization_profile(self, index: int) -> None: ...

    def set_input_shape(self, name: str, shape: Shape) -> None:
        """Raises EngineError when the shape is outside the active profile."""
        ...

    def output_shape(self, name: str) -> Shape:
        """An output's shape for the input shapes set now."""
        ...

    def set_tensor_address(self, name: str, buffer: TensorBuffer, offset: int = 0) -> None:
        """Bind a tensor to `buffer` at byte `offset` (TensorRT wants 256-byte alignment)."""
        ...

    def copy_2d(
        self,
        dst: TensorBuffer,
        src: TensorBuffer,
        *,
        dst_offset: int,
        dst_pitch: int,
        src_offset: int,
        src_pitch: int,
        width: int,
        height: int,
    ) -> None:
        """Copy `height` lines of `width` bytes between two buffers, ordered on the engine's
        stream (how the KV cache is regrouped when batches join or rows leave)."""
        ...

    def zero_2d(
        self, dst: TensorBuffer, *, offset: int, pitch: int, width: int, height: int
    ) -> None:
        """Zero `height` lines of `width` bytes, `pitch` bytes apart, on the engine's stream."""
        ...

    def execute(self) -> None:
        """Launch the graph on the engine's stream (may return before it finishes)."""
        ...

    def device_scope(self) -> AbstractContextManager[None]:
        """Make the engine's device current on the calling thread for the `with` block."""
        ...

    def close(self) -> None: ...
