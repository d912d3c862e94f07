"""`OrtSeamEngine`: the engine seam over an ONNX Runtime CPU session. This is NOT TensorRT.

It exists so `TensorRTBackend`'s whole step logic (profile choice, shape setting, KV ping-pong
through caller-owned buffers, reading back only the last position's logits) runs on a machine
without a GPU and produces real text from the real model. It behaves like a TensorRT execution
context where that matters to the backend:

- it has the same two optimization profiles `edge-build compile` gives an engine
  (`profiles.llm_profiles`), and refuses an input shape outside the active one, as TensorRT's
  `set_input_shape` does;
- tensors are bound to the caller's memory by address (ONNX Runtime IO binding with
  `buffer_ptr`), so the graph reads the past from, and writes the present into, the backend's
  own KV buffers, exactly as with `set_tensor_address`;
- memory is host memory (`HostBuffer`), and there is no stream: `execute` runs to completion.

Its BackendInfo name is "onnxruntime-seam", never "tensorrt".
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.backends.tensorrt.profiles import (
    PREFILL_PROFILE,
    ProfileLimits,
    llm_profiles,
)
from agent.backends.tensorrt.seam import ProfileShape, Shape, TensorBuffer
from agent.errors import BundleError, EngineError

_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}
_ALIGN = 64
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class HostBuffer:
    """Host memory the CPU adapter binds tensors to (64-byte aligned, at least one byte)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        raw = np.zeros(max(nbytes, 1) + _ALIGN, np.uint8)
        start = (-raw.ctypes.data) % _ALIGN
        self._raw: np.ndarray[Any, np.dtype[np.uint8]] | None = raw
        self._data = raw[start : start + max(nbytes, 1)]

    @property
    def address(self) -> int:
        self._check()
        return int(self._data.ctypes.data)

    def write(self, array: np.ndarray[Any, Any]) -> None:
        self._check()
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if flat.size > self.nbytes:
            raise EngineError(f"{flat.size} bytes do not fit a buffer of {self.nbytes}")
        self._data[: flat.size] = flat

    def read_rows(self, out: np.ndarray[Any, Any], *, offset: int, pitch: int) -> None:
        self._check()
        if not out.flags.c_contiguous:
            raise EngineError("read_rows needs a C-contiguous destination")
        rows = out.shape[0]
        row_bytes = out[0].nbytes if rows else 0
        if rows and offset + (rows - 1) * pitch + row_bytes > self.nbytes:
            raise EngineError("strided read outside the buffer")
        source = np.lib.stride_tricks.as_strided(
            self._data[offset:], shape=(rows, row_bytes), strides=(pitch, 1), writeable=False
        )
        out.reshape(rows, -1).view(np.uint8)[:] = source

    def lines(self, offset: int, pitch: int, width: int, height: int) -> np.ndarray[Any, Any]:
        """A writable [height, width] byte view of lines `pitch` bytes apart from `offset`."""
        self._check()
        if height and offset + (height - 1) * pitch + width > self.nbytes:
            raise EngineError("2D access outside the buffer")
        return np.lib.stride_tricks.as_strided(
            self._data[offset:], shape=(height, width), strides=(pitch, 1)
        )

    def close(self) -> None:
        self._raw = None
        self._data = np.zeros(0, np.uint8)

    def _check(self) -> None:
        if self._raw is None:
            raise EngineError("use of a closed buffer")


class OrtSeamEngine:
    """ONNX Runtime on the CPU behind the engine seam, with TensorRT-like profiles. NOT TensorRT."""

    kind = "onnxruntime-seam"
    device = "cpu"

    def __init__(self, model_path: Path, limits: ProfileLimits, *, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError("bad_model", f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._outputs = {o.name: o for o in self._session.get_outputs()}
        static = {name: _static_shape(i.shape) for name, i in self._inputs.items()}
        try:
            self._profiles = llm_profiles(static, limits)
        except ValueError as exc:
            raise BundleError("bad_model", f"{model_path}: {exc}") from exc
        self._active = PREFILL_PROFILE
        self._shapes: dict[str, Shape] = {}
        self._addresses: dict[str, tuple[TensorBuffer, int]] = {}

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self._inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self._outputs)

    @property
    def num_profiles(self) -> int:
        return len(self._profiles)

    def dtype(self, name: str) -> np.dtype[Any]:
        node = self._inputs.get(name) or self._outputs[name]
        return _ORT_DTYPES[node.type]

    def tensor_shape(self, name: str) -> Shape:
        node = self._inputs.get(name) or self._outputs[name]
        return _static_shape(node.shape)

    def profile_shapes(self, name: str, profile: int) -> ProfileShape:
        return self._profiles[profile][name]

    def allocate(self, nbytes: int) -> HostBuffer:
        return HostBuffer(nbytes)

    def set_optimization_profile(self, index: int) -> None:
        if not 0 <= index < len(self._profiles):
            raise EngineError(f"no optimization profile {index}")
        if index != self._active:
            self._active = index
            self._shapes.clear()  # as in TensorRT, a profile switch invalidates input shapes

    def set_input_shape(self, name: str, shape: Shape) -> None:
        low, _, high = self._profiles[self._active][name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(low) or any(
            not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)
        ):
            raise EngineError(
                f"{name} shape {list(shape)} is outside optimization profile {self._active} "
                f"({list(low)}..{list(high)})"
            )
        self._shapes[name] = shape

    def output_shape(self, name: str) -> Shape:
        symbols: dict[str, int] = {}
        for input_name, node in self._inputs.items():
            if input_name in self._shapes:
                for dim, value in zip(node.shape, self._shapes[input_name], strict=True):
                    if isinstance(dim, str) and _SYMBOL.match(dim):
                        symbols[dim] = value
        return tuple(_evaluate(dim, symbols) for dim in self._outputs[name].shape)

    def set_tensor_address(self, name: str, buffer: TensorBuffer, offset: int = 0) -> None:
        self._addresses[name] = (buffer, offset)

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
        _host(dst).lines(dst_offset, dst_pitch, width, height)[:] = _host(src).lines(
            src_offset, src_pitch, width, height
        )

    def zero_2d(
        self, dst: TensorBuffer, *, offset: int, pitch: int, width: int, height: int
    ) -> None:
        _host(dst).lines(offset, pitch, width, height)[:] = 0

    def execute(self) -> None:
        session = self._session
        if session is None:
            raise EngineError("the engine was closed")
        unset = [n for n in self._inputs if n not in self._shapes or n not in self._addresses]
        unbound = [n for n in self._outputs if n not in self._addresses]
        if unset or unbound:
            missing = ", ".join(unset + unbound)
            raise EngineError(f"tensors without a shape or an address: {missing}")
        binding = session.io_binding()
        for name in self._inputs:
            self._bind(binding.bind_input, name, self._shapes[name])
        for name in self._outputs:
            self._bind(binding.bind_output, name, self.output_shape(name))
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed: {exc}") from exc

    def _bind(self, bind: Any, name: str, shape: Shape) -> None:
        buffer, offset = self._addresses[name]
        needed = int(np.prod(shape)) * self.dtype(name).itemsize
        if offset + needed > buffer.nbytes:
            raise EngineError(
                f"{name} {list(shape)} needs {needed} bytes at offset {offset}, its buffer has "
                f"{buffer.nbytes}"
            )
        bind(name, "cpu", 0, self.dtype(name).type, list(shape), buffer.address + offset)

    def device_scope(self) -> AbstractContextManager[None]:
        return nullcontext()

    def close(self) -> None:
        self._session = None
        self._addresses.clear()


def _host(buffer: TensorBuffer) -> HostBuffer:
    if not isinstance(buffer, HostBuffer):
        raise EngineError("the CPU adapter works on its own host buffers only")
    return buffer


def _static_shape(dims: list[Any]) -> Shape:
    return tuple(d if isinstance(d, int) else -1 for d in dims)


def _evaluate(dim: Any, symbols: dict[str, int]) -> int:
    """An output dimension for the current inputs: a number, a symbol, or a sum of them
    (optimum names the present's length `past_sequence_length + sequence_length`)."""
    if isinstance(dim, int):
        return dim
    total = 0
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in symbols:
            total += symbols[term]
        else:
            raise EngineError(f"cannot work out the output dimension {dim!r} from the inputs set")
    return total
