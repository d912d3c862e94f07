"""`TensorRTEngine`: the thin TensorRT 10 adapter of the engine seam (needs TensorRT and a GPU).

Nothing but translation lives here; the step logic is in `backend.py`, CUDA in `cuda.py`. The
calls follow the TensorRT 10 Python API and the layout of NVIDIA/TensorRT's
samples/python/common_runtime.py:

- `trt.Runtime(logger).deserialize_cuda_engine(plan)`, `engine.create_execution_context()`
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html);
- tensors by name: `engine.num_io_tensors`, `get_tensor_name(i)`, `get_tensor_mode(name)`,
  `get_tensor_dtype(name)`, `get_tensor_shape(name)`, `get_tensor_profile_shape(name, profile)`
  -> [min, opt, max], `num_optimization_profiles`
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html);
- per step, on the execution context: `set_optimization_profile_async(index, stream)`,
  `set_input_shape(name, shape)`, `get_tensor_shape(name)` for an output once the inputs are set,
  `set_tensor_address(name, ptr)`, `execute_async_v3(stream)`; each returns False on failure
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html,
  and "Working with Dynamic Shapes":
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html).

With the named-tensor API the tensor names are the same in every optimization profile; switching
profiles invalidates the input shapes, which the backend sets on every step anyway.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.tensorrt.cuda import (
    CudaDevice,
    DeviceBuffer,
    PinnedBuffer,
    Stream,
    copy_2d_async,
    copy_rows_to_host_async,
    copy_to_device_async,
    zero_2d_async,
)
from agent.backends.tensorrt.seam import ProfileShape, Shape, TensorBuffer
from agent.errors import BundleError, EngineError


class TrtBuffer:
    """Device memory plus a page-locked staging area for its (asynchronous) host copies."""

    def __init__(self, nbytes: int, stream: Stream) -> None:
        self._device = DeviceBuffer(nbytes)
        self._stream = stream
        self._staging: PinnedBuffer | None = None
        self._pending_write = False

    @property
    def nbytes(self) -> int:
        return self._device.nbytes

    @property
    def device_memory(self) -> DeviceBuffer:
        return self._device

    @property
    def address(self) -> int:
        return self._device.ptr

    def write(self, array: np.ndarray[Any, Any]) -> None:
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if self._pending_write:
            # The last copy out of the staging area may still be in flight: let it land first.
            self._stream.synchronize()
        staging = self._staging_of(raw.size)
        staging.array[: raw.size] = raw
        copy_to_device_async(self._device, staging, raw.size, self._stream)
        self._pending_write = True

    def read_rows(self, out: np.ndarray[Any, Any], *, offset: int, pitch: int) -> None:
        if not out.flags.c_contiguous:
            raise EngineError("read_rows needs a C-contiguous destination")
        rows = out.shape[0]
        row_bytes = out[0].nbytes if rows else 0
        staging = self._staging_of(rows * row_bytes)
        copy_rows_to_host_async(
            staging,
            self._device,
            offset=offset,
            pitch=pitch,
            row_bytes=row_bytes,
            rows=rows,
            stream=self._stream,
        )
        self._stream.synchronize()  # also waits for the engine launch queued before the copy
        self._pending_write = False
        out.reshape(rows, -1).view(np.uint8)[:] = staging.array[: rows * row_bytes].reshape(
            rows, row_bytes
        )

    def close(self) -> None:
        self._device.free()
        if self._staging is not None:
            self._staging.free()
            self._staging = None

    def _staging_of(self, nbytes: int) -> PinnedBuffer:
        if self._staging is None or self._staging.nbytes < nbytes:
            if self._staging is not None:
                self._stream.synchronize()
                self._staging.free()
            self._staging = PinnedBuffer(nbytes)
        return self._staging


class TensorRTEngine:
    """A deserialized TensorRT engine and one execution context, on the GPU's primary context."""

    kind = "tensorrt"

    def __init__(self, plan: bytes, *, device_index: int = 0) -> None:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:
            raise BundleError(
                "tensorrt_unavailable",
                "TensorRT's Python bindings do not import here: on the Jetson, "
                "`sudo apt install python3-libnvinfer` and create the venv with "
                f"--system-site-packages ({exc})",
            ) from exc
        self._trt = trt
        self.device = f"cuda:{device_index}"
        self._cuda: CudaDevice | None = CudaDevice(device_index)
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._stream: Stream | None = None
        try:
            with self._cuda.current():
                self._load(plan)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_file(cls, path: Path, *, device_index: int = 0) -> TensorRTEngine:
        return cls(path.read_bytes(), device_index=device_index)

    def _load(self, plan: bytes) -> None:
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BundleError(
                "bad_engine",
                "TensorRT cannot deserialize engine.plan (see its log above): it was built by "
                f"another TensorRT version than this device's {trt.__version__} or for another "
                "GPU; rebuild it here with `edge-build compile`",
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError("TensorRT could not create an execution context (out of memory?)")
        self._stream = Stream()
        self._profile = 0  # a new context starts on profile 0
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = tuple(n for n in names if is_input[n])
        self._outputs = tuple(n for n in names if not is_input[n])

    # --- what the engine is --------------------------------------------------------------------

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def num_profiles(self) -> int:
        return int(self._engine.num_optimization_profiles)

    def dtype(self, name: str) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
        return dtype

    def tensor_shape(self, name: str) -> Shape:
        return tuple(int(d) for d in self._engine.get_tensor_shape(name))

    def profile_shapes(self, name: str, profile: int) -> ProfileShape:
        low, opt, high = self._engine.get_tensor_profile_shape(name, profile)
        return (
            tuple(int(d) for d in low),
            tuple(int(d) for d in opt),
            tuple(int(d) for d in high),
        )

    # --- one step --------------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> TrtBuffer:
        return TrtBuffer(nbytes, self._live_stream())

    def set_optimization_profile(self, index: int) -> None:
        if index == self._profile:
            return
        if not self._context.set_optimization_profile_async(index, self._live_stream().handle):
            raise EngineError(f"TensorRT refused optimization profile {index}")
        self._profile = index

    def set_input_shape(self, name: str, shape: Shape) -> None:
        if not self._context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise EngineError(
                f"TensorRT refused {name} shape {list(shape)} in optimization profile "
                f"{self._profile}"
            )

    def output_shape(self, name: str) -> Shape:
        return tuple(int(d) for d in self._context.get_tensor_shape(name))

    def set_tensor_address(self, name: str, buffer: TensorBuffer, offset: int = 0) -> None:
        if not self._context.set_tensor_address(name, buffer.address + offset):
            raise EngineError(f"TensorRT refused the address of {name}")

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
        copy_2d_async(
            _device(dst), _device(src), dst_offset=dst_offset, dst_pitch=dst_pitch,
            src_offset=src_offset, src_pitch=src_pitch, width=width, height=height,
            stream=self._live_stream(),
        )  # fmt: skip

    def zero_2d(
        self, dst: TensorBuffer, *, offset: int, pitch: int, width: int, height: int
    ) -> None:
        zero_2d_async(
            _device(dst), offset=offset, pitch=pitch, width=width, height=height,
            stream=self._live_stream(),
        )  # fmt: skip

    def execute(self) -> None:
        if not self._context.execute_async_v3(self._live_stream().handle):
            raise EngineError("TensorRT execute_async_v3 failed (its log says why)")

    def device_scope(self) -> AbstractContextManager[None]:
        if self._cuda is None:
            raise EngineError("the TensorRT engine was closed")
        return self._cuda.current()

    def close(self) -> None:
        cuda, self._cuda = self._cuda, None
        if cuda is None:
            return
        try:
            with cuda.current():
                if self._stream is not None:
                    self._stream.free()
                    self._stream = None
                # The context before the engine before the runtime, as TensorRT requires.
                self._context = None
                self._engine = None
                self._runtime = None
        finally:
            cuda.release()

    def _live_stream(self) -> Stream:
        if self._stream is None:
            raise EngineError("the TensorRT engine was closed")
        return self._stream


def _device(buffer: TensorBuffer) -> DeviceBuffer:
    if not isinstance(buffer, TrtBuffer):
        raise EngineError("the TensorRT adapter works on its own device buffers only")
    return buffer.device_memory
