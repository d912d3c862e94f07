"""The TensorRT backend: a compiled engine (`engine.plan`) run through the `Backend` interface.

The package is split so that everything except two thin adapters runs, and is tested, on a CPU:

- `seam`: the small engine interface the backend drives (named tensors, shapes, buffers);
- `profiles`: the two optimization profiles (prefill, decode), shared with `edge-build compile`;
- `plan`: buffer sizes from the profiles' maximum shapes and the tensors' dtypes;
- `kv_rows`: which decode state owns which rows of the (once-allocated) KV cache;
- `backend`: `TensorRTBackend`, the step logic (profile choice, KV ping-pong, last-position logits);
- `cuda`: every CUDA call (pycuda), imported lazily;
- `trt_engine`: the thin TensorRT adapter (needs TensorRT and an NVIDIA GPU);
- `ort_engine`: an ONNX Runtime (CPU) adapter of the same seam. It is NOT TensorRT: it exists so
  the backend's whole logic runs and produces real text on machines without a GPU.

Nothing here imports `tensorrt` or `pycuda` at module level.
"""

from __future__ import annotations


def tensorrt_version() -> str | None:
    """TensorRT's version if its Python bindings import here, else None."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the bindings exist but libnvinfer does not load
        return None
    return str(tensorrt.__version__)
