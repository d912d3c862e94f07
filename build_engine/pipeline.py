"""`edge-build export`: model -> ONNX with KV cache -> parity check -> golden canaries -> bundle.

Each step reports progress; every failure a user can fix is a BuildError with a code.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.bundle import Arch
from agent.canary import DEFAULT_CANARIES, GOLDEN_FILE, golden_document, run_canaries
from agent.text import TextCodec
from build_engine import __version__
from build_engine.bundle_writer import (
    eos_token_ids,
    publish_bundle,
    write_json,
    write_manifest,
    write_tokenizer,
)
from build_engine.errors import BuildError

Progress = Callable[[str], None]
PARITY_CANARIES = 3  # canaries whose PyTorch and ONNX logits are compared step by step


@dataclass(frozen=True)
class ExportOptions:
    model: str
    out: Path
    precision: str = "fp32"
    target: str = "cpu"
    name: str | None = None
    version: str | None = None
    max_seq_len: int = 0  # 0 = the model's own context length
    force: bool = False


def export_bundle(options: ExportOptions, progress: Progress) -> dict[str, Any]:
    """Run the whole export; returns the written manifest."""
    if options.precision != "fp32" or options.target != "cpu":
        raise BuildError(
            "unsupported_precision",
            f"--precision {options.precision} --target {options.target} is not available in "
            "this version of edge-build: only fp32 for the cpu target is built so far",
        )
    out = options.out.resolve()
    if out.exists() and not options.force:
        raise BuildError("out_exists", f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)

    # torch/transformers are imported here, not at module level: `edge-build --help` stays fast.
    from build_engine.model_source import load_model, resolve_model
    from build_engine.onnx_export import export_onnx
    from build_engine.parity import check_parity

    started = time.monotonic()
    step = _Steps(progress, total=6)
    source = resolve_model(options.model)
    step(f"hashing the source weights ({source.path.name})")
    source_sha = source.source_sha256()
    step(f"loading {source.display_name} with transformers")
    model, tokenizer = load_model(source)

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        step("exporting to ONNX with a KV cache (optimum, text-generation-with-past)")
        exported = export_onnx(model, tokenizer, staging, progress=progress)
        write_tokenizer(tokenizer, staging, Path(tmp) / "tokenizer")
        max_seq_len = exported.max_position_embeddings
        if options.max_seq_len:
            max_seq_len = min(max_seq_len, options.max_seq_len)
        arch = Arch(
            model_type=str(model.config.model_type),
            layers=exported.num_layers,
            kv_heads=exported.num_kv_heads,
            head_dim=exported.head_dim,
            hidden=exported.hidden_size,
            vocab=exported.vocab_size,
            max_seq_len=max_seq_len,
        )
        eos = eos_token_ids(model, tokenizer)
        codec = TextCodec(staging, eos_token_ids=eos)

        step("checking the ONNX graph against PyTorch (logits and greedy tokens)")
        parity_prompts = [
            codec.tokenizer.decode(c.encode(codec), skip_special_tokens=False)
            for c in DEFAULT_CANARIES[:PARITY_CANARIES]
        ]
        parity = check_parity(model, tokenizer, exported.onnx_path, parity_prompts)
        parity.raise_if_failed()
        del model  # free the PyTorch weights before ONNX Runtime loads its own copy

        step(f"recording golden canaries ({len(DEFAULT_CANARIES)} prompts, greedy)")
        backend = OnnxRuntimeBackend(exported.onnx_path, max_seq_len=max_seq_len)
        canaries = run_canaries(backend, codec)
        backend.close()
        write_json(staging / GOLDEN_FILE, golden_document(canaries, "onnxruntime", "fp32"))

        step("writing manifest.json (sha256 of every file)")
        name = options.name or _slug(source.display_name)
        manifest = write_manifest(
            staging,
            name=name,
            version=options.version or datetime.now(UTC).strftime("%Y.%m.%d.%H%M"),
            source={"model": source.model_id, "sha256": source_sha},
            arch=arch,
            precision="fp32",
            quality={
                "reference": "pytorch-fp32",
                "parity": parity.to_dict(),
            },
            tokenizer={"eos_token_ids": eos},
            build={
                "tool": f"edge-build {__version__}",
                "opset": exported.opset,
                "export_s": round(exported.export_seconds, 1),
                "total_s": round(time.monotonic() - started, 1),
            },
        )
        publish_bundle(staging, out, options.force)
    progress(f"bundle written to {out} in {time.monotonic() - started:.0f} s")
    for result in canaries[:1]:
        progress(f"canary {result.canary.name!r}: {result.text!r}")
    return manifest


class _Steps:
    """Numbered progress lines with the time since the build started."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self._total = total
        self._index = 0
        self._start = time.monotonic()

    def __call__(self, message: str) -> None:
        self._index += 1
        elapsed = time.monotonic() - self._start
        self._progress(f"[{self._index}/{self._total}] {message} (+{elapsed:.0f} s)")


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "-" for c in text.lower())
    return keep.strip("-") or "model"
