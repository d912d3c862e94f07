"""`edge-build export`: model -> fp32 ONNX with KV cache -> parity check -> (quantize -> accuracy
gate) -> golden canaries -> bundle.

The fp32 export is always built first (or taken from `--from-bundle`): it is the reference every
other build is measured against. Its graph is the portable one (standard ONNX operators, the
past/present KV contract): what `--target orin` bundles and TensorRT start from. Every `--target
cpu` bundle, fp32 included, is derived from it (ONNX Runtime's fused CPU operators, attention on
shared KV buffers) and passes the accuracy gate against it. Each step reports progress; every
failure a user can fix is a BuildError with a code. Nothing appears at `--out` until the whole
bundle is complete.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.bundle import Arch, Manifest, open_bundle
from agent.canary import DEFAULT_CANARIES, CanaryResult, golden_document, run_canaries
from agent.contract.bundle import GOLDEN_FILE, ONNX_MODEL_FILE
from agent.text import TextCodec
from build_engine import __version__
from build_engine.bundle_writer import (
    TOKENIZER_FILES,
    eos_token_ids,
    publish_bundle,
    write_json,
    write_manifest,
    write_tokenizer,
)
from build_engine.disk import MARGIN, SIZE_VS_FP32, disk_full_error, export_need, require_free_space
from build_engine.errors import BuildError
from build_engine.progress import Progress, Steps

PARITY_CANARIES = 3  # canaries whose PyTorch and ONNX logits are compared step by step


@dataclass(frozen=True)
class ExportOptions:
    model: str | None  # None when building from an existing fp32 bundle
    out: Path
    precision: str = "fp32"
    target: str = "cpu"
    from_bundle: Path | None = None
    calibration: Path | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # overrides of the gate defaults
    name: str | None = None
    version: str | None = None
    max_seq_len: int = 0  # 0 = the model's own context length
    force: bool = False


def export_bundle(options: ExportOptions, progress: Progress) -> dict[str, Any]:
    """Run the whole export; returns the written manifest."""
    out = options.out.resolve()
    if out.exists() and not options.force:
        raise BuildError("out_exists", f"{out} already exists; pass --force to replace it")
    if (options.model is None) == (options.from_bundle is None):
        raise BuildError("bad_arguments", "give exactly one of --model or --from-bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    derived = _derives(options)
    steps = Steps(progress, total=(1 if options.from_bundle else 6) + (4 if derived else 1))

    try:
        manifest = _build_in_scratch(options, derived, out, steps, progress, started)
    except OSError as exc:
        error = disk_full_error(exc, out.parent)
        if error is None:
            raise
        raise error from exc
    progress(f"bundle written to {out} in {time.monotonic() - started:.0f} s")
    return manifest


def _build_in_scratch(
    options: ExportOptions,
    derived: bool,
    out: Path,
    steps: Steps,
    progress: Progress,
    started: float,
) -> dict[str, Any]:
    """Every step, in a scratch folder next to `out` that is removed whatever happens.
    `derived`: the bundle is made from the reference (`_derives`), not the reference itself."""
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        if options.from_bundle is not None:
            steps("verifying the fp32 reference bundle")
            reference = _open_reference(options.from_bundle)
            _check_reference_for(reference, options.target)
            reference_bytes = sum(f.stat().st_size for f in reference.iterdir() if f.is_file())
            require_free_space(
                Path(tmp),
                int(reference_bytes * SIZE_VS_FP32.get(options.precision, 1.0)) + MARGIN,
                f"writing a {options.precision} bundle from {reference}",
            )
        else:
            assert options.model is not None
            reference_dir = Path(tmp) / "fp32"
            _build_reference(options, options.model, reference_dir, Path(tmp), steps, progress)
            reference = open_bundle(reference_dir).path
        if derived:
            staging = Path(tmp) / "bundle"
            manifest = _build_derived(options, reference, staging, out, steps, progress, started)
        elif options.from_bundle is None:
            staging = reference
            manifest = open_bundle(staging).manifest.raw
        else:  # an fp32 bundle rebuilt from an fp32 bundle: a copy, renamed or retargeted
            staging = _copy(reference, Path(tmp))
            manifest = _finish_fp32(options, staging, steps, started)
        publish_bundle(staging, out, options.force)
    return manifest


# --- the fp32 reference --------------------------------------------------------------------------


def _build_reference(
    options: ExportOptions,
    model_spec: str,
    staging: Path,
    scratch: Path,
    steps: Steps,
    progress: Progress,
) -> None:
    # torch/transformers are imported here, not at module level: `edge-build --help` stays fast.
    from build_engine.model_source import load_model, resolve_model
    from build_engine.onnx_export import export_disk_bytes, export_onnx
    from build_engine.parity import check_parity

    source = resolve_model(model_spec)
    steps(f"hashing the source weights ({source.path.name})")
    source_sha = source.source_sha256()
    steps(f"loading {source.display_name} with transformers")
    model, tokenizer = load_model(source)
    fp32_bytes = export_disk_bytes(model)
    require_free_space(
        scratch,
        export_need(fp32_bytes, options.precision, options.target),
        f"exporting {source.display_name} ({fp32_bytes / 2**30:.1f} GiB in fp32)"
        + ("" if options.precision == "fp32" else f" and quantizing it to {options.precision}"),
    )
    staging.mkdir()
    steps("exporting to ONNX with a KV cache (optimum, text-generation-with-past)")
    exported = export_onnx(model, tokenizer, staging, progress=progress)
    write_tokenizer(tokenizer, staging, scratch / "tokenizer")
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

    steps("checking the ONNX graph against PyTorch (logits and greedy tokens)")
    parity_prompts = [
        codec.tokenizer.decode(c.encode(codec), skip_special_tokens=False)
        for c in DEFAULT_CANARIES[:PARITY_CANARIES]
    ]
    parity = check_parity(model, tokenizer, exported.onnx_path, parity_prompts)
    parity.raise_if_failed()
    del model  # free the PyTorch weights before ONNX Runtime loads its own copy

    canaries = _record_golden(staging, codec, max_seq_len, "fp32", steps)
    steps("writing manifest.json (sha256 of every file)")
    write_manifest(
        staging,
        name=options.name or _slug(source.display_name),
        version=options.version or _default_version(),
        source={"model": source.model_id, "sha256": source_sha},
        arch=arch,
        precision="fp32",
        quality={"reference": "pytorch-fp32", "parity": parity.to_dict()},
        tokenizer={"eos_token_ids": eos},
        build={
            "tool": f"edge-build {__version__}",
            "target": options.target,
            "opset": exported.opset,
            "export_s": round(exported.export_seconds, 1),
        },
    )
    progress(f"fp32 canary {canaries[0].canary.name!r}: {canaries[0].text!r}")


def _derives(options: ExportOptions) -> bool:
    """Whether the bundle is made from the fp32 reference (quantized, or the cpu graph), rather
    than being the reference itself."""
    if options.precision != "fp32":
        return True
    if options.target != "cpu":
        return False
    # An fp32 bundle built for cpu already holds the cpu graph: rebuilding it is a copy.
    return options.from_bundle is None or not _holds_cpu_graph(options.from_bundle)


def _holds_cpu_graph(bundle_dir: Path) -> bool:
    from build_engine.quantize.cpu_attention import has_cpu_attention

    graph = bundle_dir / ONNX_MODEL_FILE
    return graph.is_file() and has_cpu_attention(graph)


def _open_reference(path: Path) -> Path:
    try:
        bundle = open_bundle(path)
    except Exception as exc:
        raise BuildError("bad_reference", f"--from-bundle {path}: {exc}") from exc
    if bundle.manifest.precision != "fp32":
        raise BuildError(
            "bad_reference",
            f"--from-bundle {path} is {bundle.manifest.precision}; quantize from the fp32 bundle",
        )
    return bundle.path


def _check_reference_for(reference: Path, target: str) -> None:
    if target == "orin" and _holds_cpu_graph(reference):
        raise BuildError(
            "bad_reference",
            f"--from-bundle {reference} was built for --target cpu: its graph uses ONNX Runtime's "
            "CPU operators, which TensorRT cannot build; start from an fp32 bundle exported with "
            "--target orin, or from --model",
        )


def _copy(reference: Path, scratch: Path) -> Path:
    staging = scratch / "bundle"
    shutil.copytree(reference, staging)
    return staging


def _finish_fp32(
    options: ExportOptions, staging: Path, steps: Steps, started: float
) -> dict[str, Any]:
    """The fp32 bundle is the reference itself; restamp its manifest with this build's facts."""
    steps("writing manifest.json (sha256 of every file)")
    manifest = open_bundle(staging).manifest
    return _rewrite_manifest(
        staging,
        manifest,
        options,
        precision="fp32",
        quality=manifest.quality,
        build={**manifest.raw.get("build", {}), "target": options.target},
        started=started,
    )


# --- bundles derived from the reference: quantized, or the fp32 cpu graph ---------------------


def _build_derived(
    options: ExportOptions,
    reference: Path,
    staging: Path,
    out: Path,
    steps: Steps,
    progress: Progress,
    started: float,
) -> dict[str, Any]:
    from build_engine.calibration import load_text_samples
    from build_engine.gate import Thresholds, evaluate
    from build_engine.quantize import quantize
    from build_engine.report import write_report

    ref_manifest = open_bundle(reference).manifest
    eos = [int(t) for t in ref_manifest.tokenizer.get("eos_token_ids", [])]
    codec = TextCodec(reference, eos_token_ids=eos)
    staging.mkdir()
    calibration = load_text_samples(options.calibration, codec)
    steps(
        f"building the fp32 graph for {options.target}"
        if options.precision == "fp32"
        else f"quantizing to {options.precision} for {options.target} "
        f"({len(calibration)} calibration samples)"
    )
    result = quantize(
        reference / ONNX_MODEL_FILE,
        staging,
        precision=options.precision,  # type: ignore[arg-type]
        target=options.target,  # type: ignore[arg-type]
        calibration=calibration,
        progress=progress,
        max_positions=ref_manifest.arch.max_seq_len,
    )
    for name in TOKENIZER_FILES:
        if (reference / name).is_file():
            shutil.copy2(reference / name, staging / name)

    steps(f"accuracy gate: {options.precision} against the fp32 reference")
    thresholds = Thresholds.for_precision(options.precision, **options.thresholds)
    gate = evaluate(
        reference / ONNX_MODEL_FILE,
        result.onnx_path,
        codec,
        reference,
        precision=options.precision,
        thresholds=thresholds,
        progress=progress,
    )
    report_path = out.parent / f"{out.name}.report.md"
    sizes = {
        "fp32": sum(int(e["size"]) for e in ref_manifest.files.values()),
        options.precision: sum(p.stat().st_size for p in staging.iterdir() if p.is_file()),
    }
    write_report(
        gate,
        report_path,
        bundle_name=f"{ref_manifest.name} {options.precision} {options.target}",
        precision=options.precision,
        target=options.target,
        sizes=sizes,
    )
    progress(f"accuracy report: {report_path}")
    gate.raise_if_failed()

    _record_golden(staging, codec, ref_manifest.arch.max_seq_len, options.precision, steps)
    steps("writing manifest.json (sha256 of every file)")
    return _rewrite_manifest(
        staging,
        ref_manifest,
        options,
        precision=options.precision,
        quality={
            "reference": f"{ref_manifest.name} {ref_manifest.version} fp32",
            **_parity_of(ref_manifest),
            **gate.to_dict(),
        },
        build={
            "tool": f"edge-build {__version__}",
            "target": options.target,
            "quantization": result.method,
            "quantization_details": result.details,
            "quantize_s": round(result.seconds, 1),
            "reference_sha256": ref_manifest.files[ONNX_MODEL_FILE]["sha256"],
        },
        started=started,
    )


# --- shared steps --------------------------------------------------------------------------------


def _parity_of(reference: Manifest) -> dict[str, Any]:
    """The reference's check against PyTorch, carried into bundles derived from it."""
    parity = reference.quality.get("parity") or reference.quality.get("reference_parity")
    return {"reference_parity": parity} if parity else {}


def _record_golden(
    staging: Path, codec: TextCodec, max_seq_len: int, precision: str, steps: Steps
) -> list[CanaryResult]:
    """Greedy tokens of this very graph on the canaries: what the device must reproduce."""
    steps(f"recording golden canaries ({len(DEFAULT_CANARIES)} prompts, greedy)")
    backend = OnnxRuntimeBackend(staging / ONNX_MODEL_FILE, max_seq_len=max_seq_len)
    try:
        canaries = run_canaries(backend, codec)
    finally:
        backend.close()
    write_json(staging / GOLDEN_FILE, golden_document(canaries, "onnxruntime", precision))
    return canaries


def _rewrite_manifest(
    staging: Path,
    reference: Manifest,
    options: ExportOptions,
    *,
    precision: str,
    quality: dict[str, Any],
    build: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    return write_manifest(
        staging,
        name=options.name or reference.name,
        version=options.version or reference.version,
        source=reference.source,
        arch=reference.arch,
        precision=precision,
        quality=quality,
        tokenizer=reference.tokenizer,
        build={**build, "total_s": round(time.monotonic() - started, 1)},
    )


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "-" for c in text.lower())
    return keep.strip("-") or "model"


def _default_version() -> str:
    return datetime.now(UTC).strftime("%Y.%m.%d.%H%M")
