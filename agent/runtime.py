"""Open a verified bundle and build what runs it: the backend and the text codec.

Which backend: a bundle holds either an ONNX graph (manifest backend "onnxruntime") or a compiled
TensorRT engine ("tensorrt"). With `[runtime] backend = "auto"` the bundle decides; naming a
backend only adds a check that the bundle is of that kind. An engine is checked against this
device's target (GPU, TensorRT, CUDA) before anything deserializes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends.base import Backend
from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.bundle import Bundle, Manifest, open_bundle
from agent.config import RuntimeConfig
from agent.contract.bundle import ENGINE_FILE, ONNX_MODEL_FILE
from agent.errors import BundleError
from agent.text import TextCodec


@dataclass
class LoadedModel:
    bundle: Bundle
    backend: Backend[Any]
    codec: TextCodec

    @property
    def engine_info(self) -> dict[str, str]:
        return self.bundle.manifest.engine_info()


def load_model(bundle_dir: Path, runtime: RuntimeConfig | None = None) -> LoadedModel:
    """Verify the bundle (every file's hash) and open it with the backend it calls for."""
    runtime = runtime or RuntimeConfig()
    bundle = open_bundle(bundle_dir)
    manifest = bundle.manifest
    kind = choose_backend(manifest, runtime.backend, bundle.path)
    max_seq_len = manifest.arch.max_seq_len
    if runtime.max_seq_len:
        max_seq_len = min(max_seq_len, runtime.max_seq_len)
    eos = [int(t) for t in manifest.tokenizer.get("eos_token_ids", [])]
    codec = TextCodec(bundle.path, eos_token_ids=eos)
    backend: Backend[Any]
    if kind == "tensorrt":
        backend = _open_tensorrt(bundle, max_seq_len)
    else:
        backend = OnnxRuntimeBackend(
            bundle.file(ONNX_MODEL_FILE), max_seq_len=max_seq_len, threads=runtime.threads
        )
    return LoadedModel(bundle=bundle, backend=backend, codec=codec)


def choose_backend(manifest: Manifest, configured: str, where: Path) -> str:
    """The backend for this bundle: the bundle's own kind, if the configuration allows it."""
    if configured in ("auto", manifest.backend):
        return manifest.backend
    if manifest.backend == "tensorrt":
        advice = 'set [runtime] backend = "auto" or use an ONNX bundle (edge-build export)'
    else:
        advice = (
            "compile it into an engine on this device (edge-build compile) or set "
            '[runtime] backend = "auto"'
        )
    raise BundleError(
        "unsupported_backend",
        f"bundle {where} is a {manifest.backend} bundle but the agent is configured for "
        f"{configured}: {advice}",
    )


def _open_tensorrt(bundle: Bundle, max_seq_len: int) -> Backend[Any]:
    # The target is compared before TensorRT or CUDA touch the engine: a wrong engine is refused
    # with what differs instead of failing inside deserialization.
    from agent.target import check_target, detect_target

    check_target(bundle.manifest.target, detect_target(), bundle.path)
    from agent.backends.tensorrt.backend import TensorRTBackend
    from agent.backends.tensorrt.trt_engine import TensorRTEngine

    engine = TensorRTEngine.from_file(bundle.file(ENGINE_FILE))
    try:
        return TensorRTBackend(engine, max_seq_len=max_seq_len)
    except BaseException:
        engine.close()
        raise
