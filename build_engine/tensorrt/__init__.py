"""TensorRT pieces of `edge-build compile`: the ONNX parser, the engine builder, the logger.

They run only where TensorRT and an NVIDIA GPU are (a Jetson). `tensorrt` is imported through
`require_tensorrt()`, which turns its absence into a BuildError that says how to get it.
"""

from __future__ import annotations

from types import ModuleType

from build_engine.errors import BuildError

INSTALL_HINT = (
    "`edge-build compile` needs TensorRT and an NVIDIA GPU: run it on the Jetson. JetPack 6.1/6.2 "
    "ship TensorRT 10.3: `sudo apt install python3-libnvinfer`, then create the venv with "
    "`python3 -m venv --system-site-packages .venv` so TensorRT's bindings are visible, and "
    "`pip install pycuda` in it"
)


def require_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: bindings present, libnvinfer missing
        raise BuildError(
            "tensorrt_missing", f"TensorRT cannot be imported ({exc}). {INSTALL_HINT}"
        ) from None
    module: ModuleType = tensorrt
    return module
