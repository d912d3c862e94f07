"""Open a verified bundle and build what runs it: the backend and the text codec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends.base import Backend
from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.bundle import Bundle, open_bundle
from agent.config import RuntimeConfig
from agent.errors import BundleError
from agent.text import TextCodec

ONNX_MODEL_FILE = "model.onnx"


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
    if manifest.backend != "onnxruntime":
        raise BundleError(
            "unsupported_backend",
            f"bundle {bundle.path} needs backend {manifest.backend!r}, which this agent cannot run "
            "yet; use an ONNX bundle (edge-build export)",
        )
    max_seq_len = manifest.arch.max_seq_len
    if runtime.max_seq_len:
        max_seq_len = min(max_seq_len, runtime.max_seq_len)
    eos = [int(t) for t in manifest.tokenizer.get("eos_token_ids", [])]
    codec = TextCodec(bundle.path, eos_token_ids=eos)
    backend = OnnxRuntimeBackend(
        bundle.file(ONNX_MODEL_FILE), max_seq_len=max_seq_len, threads=runtime.threads
    )
    return LoadedModel(bundle=bundle, backend=backend, codec=codec)
