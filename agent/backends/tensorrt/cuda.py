"""Every CUDA call the TensorRT backend makes, behind one small module.

The rest of the package never touches pycuda: moving to NVIDIA's cuda-python later changes this
file only. As with `cuda_call` in TensorRT's samples/python/common_runtime.py, every call goes
through one checker (`cuda_call`) that turns a driver error into a `CudaError` naming the call.
Memory is owned by objects with an explicit `free()` (and a context manager), never left to the
garbage collector, because a long-running agent must not leak device memory.

pycuda is imported lazily, inside the functions that need it, so the agent imports (and its CPU
tests run) on machines without CUDA.

pycuda reference: https://documen.tician.de/pycuda/driver.html (Device, Context,
retain_primary_context, mem_alloc, pagelocked_empty, Stream, memcpy_*_async, Memcpy2D).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from agent.errors import EngineError

T = TypeVar("T")

# Pitches of 2D copies above this go row by row (cuMemcpy2D's pitch limit is the device's
# MAX_PITCH, 2^31 - 1 bytes on current GPUs).
_MAX_PITCH = (1 << 31) - 1


class CudaError(EngineError):
    """A CUDA call failed (or CUDA is not usable here)."""


def _driver() -> ModuleType:
    try:
        import pycuda.driver as drv
    except ImportError as exc:
        raise CudaError(
            "pycuda is not installed: on the Jetson, `pip install pycuda` inside the agent's venv "
            "(it builds against JetPack's CUDA; needs python3-dev and /usr/local/cuda/bin on PATH)"
        ) from exc
    module: ModuleType = drv
    return module


def cuda_call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Run one CUDA call; a driver error becomes a CudaError that says which call failed."""
    drv = _driver()
    try:
        return fn(*args)
    except drv.Error as exc:
        raise CudaError(f"CUDA {what} failed: {exc}") from exc


@dataclass(frozen=True)
class GpuInfo:
    """What the target check needs to know about the GPU."""

    name: str  # e.g. "Orin"
    compute_capability: str  # e.g. "8.7"
    sm_count: int  # streaming multiprocessors: tells an AGX Orin (16) from an Orin NX (8)
    total_memory: int  # bytes
    cuda_driver: str  # CUDA version the driver supports, e.g. "12.6"


def gpu_info(index: int = 0) -> GpuInfo | None:
    """The GPU's identity, or None where there is no pycuda or no CUDA device."""
    try:
        drv = _driver()
    except CudaError:
        return None
    try:
        drv.init()
        if drv.Device.count() <= index:
            return None
        device = drv.Device(index)
        major, minor = device.compute_capability()
        version = int(drv.get_driver_version())  # 1000 * major + 10 * minor, e.g. 12060
        return GpuInfo(
            name=str(device.name()),
            compute_capability=f"{major}.{minor}",
            sm_count=int(device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)),
            total_memory=int(device.total_memory()),
            cuda_driver=f"{version // 1000}.{(version % 1000) // 10}",
        )
    except drv.Error:
        return None


class CudaDevice:
    """The device's primary context: the one the CUDA runtime API, and so TensorRT, uses.

    CUDA contexts are current per thread, and the agent loads a model on one thread and generates
    on another, so every use goes through `current()`, which pushes the context on the calling
    thread and pops it afterwards.
    """

    def __init__(self, index: int = 0) -> None:
        drv = _driver()
        cuda_call("cuInit", drv.init)
        device = cuda_call("cuDeviceGet", drv.Device, index)
        self.name = str(device.name())
        self._context: Any = cuda_call("cuDevicePrimaryCtxRetain", device.retain_primary_context)

    @contextmanager
    def current(self) -> Iterator[None]:
        if self._context is None:
            raise CudaError("the CUDA device was already released")
        cuda_call("cuCtxPushCurrent", self._context.push)
        try:
            yield
        finally:
            cuda_call("cuCtxPopCurrent", _driver().Context.pop)

    def release(self) -> None:
        if self._context is not None:
            cuda_call("cuDevicePrimaryCtxRelease", self._context.detach)
            self._context = None


class DeviceBuffer:
    """Linear device memory, freed explicitly (or when its `with` block ends)."""

    def __init__(self, nbytes: int) -> None:
        drv = _driver()
        self.nbytes = nbytes
        # At least one byte: TensorRT wants a real, distinct address even for an empty tensor
        # (developer guide, "Empty Tensors": "if an engine binding is an empty tensor, it still
        # needs a non-null memory address, and different tensors should have different
        # addresses"; see profiles.py).
        self._alloc: Any = cuda_call("cuMemAlloc", drv.mem_alloc, max(nbytes, 1))

    @property
    def ptr(self) -> int:
        if self._alloc is None:
            raise CudaError("use of freed device memory")
        return int(self._alloc)

    def free(self) -> None:
        if self._alloc is not None:
            cuda_call("cuMemFree", self._alloc.free)
            self._alloc = None

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.free()


class PinnedBuffer:
    """Page-locked host memory: the only kind an asynchronous copy may use (pycuda's
    memcpy_htod_async/memcpy_dtoh_async documentation)."""

    def __init__(self, nbytes: int) -> None:
        drv = _driver()
        self.nbytes = nbytes
        self._array: npt.NDArray[np.uint8] | None = cuda_call(
            "cuMemHostAlloc", drv.pagelocked_empty, (max(nbytes, 1),), np.uint8
        )

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        if self._array is None:
            raise CudaError("use of freed pinned memory")
        return self._array

    def free(self) -> None:
        if self._array is not None:
            allocation = self._array.base
            self._array = None
            cuda_call("cuMemFreeHost", allocation.free)  # type: ignore[union-attr]

    def __enter__(self) -> PinnedBuffer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.free()


class Stream:
    """A CUDA stream: copies and engine launches on it run in order."""

    def __init__(self) -> None:
        self._stream: Any = cuda_call("cuStreamCreate", _driver().Stream)

    @property
    def handle(self) -> int:
        """The raw cudaStream_t, what TensorRT's execute_async_v3 takes."""
        if self._stream is None:
            raise CudaError("use of a released stream")
        return int(self._stream.handle)

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        cuda_call("cuStreamSynchronize", self._stream.synchronize)

    def free(self) -> None:
        if self._stream is not None:
            self.synchronize()
            self._stream = None  # pycuda destroys the stream with its last reference


def copy_to_device_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    """Copy the first `nbytes` of `src` to the start of `dst`, ordered on `stream`."""
    if nbytes > min(dst.nbytes, src.nbytes):
        raise CudaError(f"copy of {nbytes} bytes overruns a buffer")
    if nbytes:
        drv = _driver()
        view = src.array[:nbytes]
        cuda_call("cuMemcpyHtoDAsync", drv.memcpy_htod_async, dst.ptr, view, stream.raw)


def copy_rows_to_host_async(
    dst: PinnedBuffer,
    src: DeviceBuffer,
    *,
    offset: int,
    pitch: int,
    row_bytes: int,
    rows: int,
    stream: Stream,
) -> None:
    """Copy `rows` rows of `row_bytes` bytes, starting at byte `offset` of `src` and `pitch` bytes
    apart, into `dst` packed: one 2D copy, so a strided slice (the last position of every row of
    the logits) crosses to the host without the rest."""
    if rows <= 0 or row_bytes <= 0:
        return
    if offset + (rows - 1) * pitch + row_bytes > src.nbytes or rows * row_bytes > dst.nbytes:
        raise CudaError("strided copy outside its buffers")
    drv = _driver()
    if rows == 1 or pitch == row_bytes:
        cuda_call(
            "cuMemcpyDtoHAsync",
            drv.memcpy_dtoh_async,
            dst.array[: rows * row_bytes],
            src.ptr + offset,
            stream.raw,
        )
        return
    if pitch > _MAX_PITCH:
        for row in range(rows):
            view = dst.array[row * row_bytes : (row + 1) * row_bytes]
            cuda_call(
                "cuMemcpyDtoHAsync",
                drv.memcpy_dtoh_async,
                view,
                src.ptr + offset + row * pitch,
                stream.raw,
            )
        return
    copy = drv.Memcpy2D()
    copy.set_src_device(src.ptr + offset)
    copy.src_pitch = pitch
    copy.set_dst_host(dst.array)
    copy.dst_pitch = row_bytes
    copy.width_in_bytes = row_bytes
    copy.height = rows
    cuda_call("cuMemcpy2DAsync", copy, stream.raw)


def copy_2d_async(
    dst: DeviceBuffer,
    src: DeviceBuffer,
    *,
    dst_offset: int,
    dst_pitch: int,
    src_offset: int,
    src_pitch: int,
    width: int,
    height: int,
    stream: Stream,
) -> None:
    """Device-to-device copy of `height` lines of `width` bytes (cuMemcpy2DAsync)."""
    if width <= 0 or height <= 0:
        return
    if (
        dst_offset + (height - 1) * dst_pitch + width > dst.nbytes
        or src_offset + (height - 1) * src_pitch + width > src.nbytes
    ):
        raise CudaError("2D copy outside its buffers")
    drv = _driver()
    if height == 1:
        cuda_call(
            "cuMemcpyDtoDAsync",
            drv.memcpy_dtod_async,
            dst.ptr + dst_offset,
            src.ptr + src_offset,
            width,
            stream.raw,
        )
        return
    copy = drv.Memcpy2D()
    copy.set_src_device(src.ptr + src_offset)
    copy.src_pitch = src_pitch
    copy.set_dst_device(dst.ptr + dst_offset)
    copy.dst_pitch = dst_pitch
    copy.width_in_bytes = width
    copy.height = height
    cuda_call("cuMemcpy2DAsync", copy, stream.raw)


def zero_2d_async(
    dst: DeviceBuffer, *, offset: int, pitch: int, width: int, height: int, stream: Stream
) -> None:
    """Zero `height` lines of `width` bytes, `pitch` apart (cuMemsetD2D8Async)."""
    if width <= 0 or height <= 0:
        return
    if offset + (height - 1) * pitch + width > dst.nbytes:
        raise CudaError("2D fill outside its buffer")
    drv = _driver()
    cuda_call(
        "cuMemsetD2D8Async", drv.memset_d2d8_async, dst.ptr + offset, pitch, 0, width, height,
        stream.raw,
    )  # fmt: skip
