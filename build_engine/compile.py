"""`edge-build compile BUNDLE --out DIR`: an ONNX bundle -> a TensorRT engine bundle, on the device.

An engine runs only on the GPU and TensorRT version that built it, so this runs on the Jetson
itself (or one exactly like it): parse the bundle's model.onnx into a strongly typed network,
build an engine with a prefill and a decode optimization profile, replay the golden canaries
through the new engine with the agent's own TensorRT backend, and write a bundle whose manifest
says what the engine was built for (`target`). As with `edge-build export`, the bundle is
assembled in a staging directory and appears at `--out` only when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.backends.tensorrt.profiles import ProfileLimits, llm_profiles
from agent.bundle import Bundle, Manifest, open_bundle
from agent.canary import CanaryResult, golden_document, read_golden, run_canaries
from agent.contract.bundle import ENGINE_FILE, GOLDEN_FILE, ONNX_MODEL_FILE
from agent.target import DeviceTarget, detect_target
from agent.text import TextCodec
from build_engine import __version__
from build_engine.bundle_writer import TOKENIZER_FILES, publish_bundle, write_json, write_manifest
from build_engine.errors import BuildError
from build_engine.progress import Progress, Steps
from build_engine.quantize.cpu_attention import has_cpu_attention
from build_engine.tensorrt import require_tensorrt

TIMING_CACHE_NAME = "tensorrt-timing.cache"
DEFAULT_MAX_CONTEXT = 4096  # KV memory grows with batch x context; raise it with --max-context
STEPS = 6


@dataclass(frozen=True)
class CompileOptions:
    max_batch: int = 4  # rows decoded together (the agent's continuous batching)
    max_prefill: int = 512  # tokens one prefill step takes; longer prompts go in chunks
    max_context: int = 0  # tokens per row; 0 = the bundle's max_seq_len, at most 4096
    workspace_gb: float = 4.0  # TensorRT's workspace memory pool while building
    opt_level: int = 3  # builder optimization level, 0 (fast build) .. 5 (fast engine)
    timing_cache: Path | None = None  # None = OUT's parent directory / tensorrt-timing.cache
    name: str | None = None  # None = the ONNX bundle's name
    version: str | None = None  # None = the ONNX bundle's version
    force: bool = False
    verbose: bool = False  # TensorRT's own INFO/VERBOSE log


def compile_bundle(
    bundle_dir: Path, out: Path, options: CompileOptions, progress: Progress
) -> dict[str, Any]:
    """Compile an ONNX bundle into an engine bundle at `out`; returns the written manifest."""
    trt = require_tensorrt()  # first: without TensorRT nothing else here can work
    started = time.monotonic()
    out = out.resolve()
    if out.exists() and not options.force:
        raise BuildError("out_exists", f"{out} already exists; pass --force to replace it")
    steps = Steps(progress, STEPS)

    steps(f"verifying the ONNX bundle {bundle_dir}")
    source = open_source_bundle(bundle_dir)
    limits = resolve_limits(source.manifest, options)

    steps("reading this device (GPU, TensorRT, CUDA, JetPack)")
    target = detect_target()
    if not target.compute_capability:
        raise BuildError(
            "no_gpu",
            "no CUDA GPU is visible (or pycuda is missing: `pip install pycuda` in the venv); "
            "compile on the Jetson that will run the engine",
        )
    progress(f"target: {target.describe()}")

    out.parent.mkdir(parents=True, exist_ok=True)
    timing_cache = options.timing_cache or out.parent / TIMING_CACHE_NAME
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        build_s, profiles = _build_engine(
            trt, source, limits, options, timing_cache, staging / ENGINE_FILE, steps, progress
        )
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, staging / name)

        steps("recording golden canaries on the engine (TensorRT backend, greedy)")
        results = _record_golden(staging, source.manifest, limits)
        agreement = _golden_agreement(source.path, results)
        progress(
            f"engine canary {results[0].canary.name!r}: {results[0].text!r} "
            f"({agreement['matching']}/{agreement['canaries']} canaries match the ONNX bundle)"
        )

        steps("writing manifest.json (sha256 of every file)")
        manifest = _manifest(
            staging,
            source,
            options,
            target,
            limits,
            quality=agreement,
            build={
                "tool": f"edge-build {__version__}",
                "step": "compile",
                "from_bundle": {
                    "name": source.manifest.name,
                    "version": source.manifest.version,
                    "model_sha256": source.manifest.files[ONNX_MODEL_FILE]["sha256"],
                },
                "limits": asdict(limits),
                "profiles": [
                    {name: [list(s) for s in shapes] for name, shapes in profile.items()}
                    for profile in profiles
                ],
                "builder": {
                    "strongly_typed": True,
                    "optimization_level": options.opt_level,
                    "workspace_gb": options.workspace_gb,
                },
                "build_s": round(build_s, 1),
                "total_s": round(time.monotonic() - started, 1),
            },
        )
        open_bundle(staging)  # the bundle the agent will see: parses and every hash matches
        publish_bundle(staging, out, options.force)
    progress(f"engine bundle written to {out} in {time.monotonic() - started:.0f} s")
    return manifest


def resolve_limits(manifest: Manifest, options: CompileOptions) -> ProfileLimits:
    """The engine's limits from the flags and the model's context length."""
    model_max = manifest.arch.max_seq_len
    context = options.max_context or min(model_max, DEFAULT_MAX_CONTEXT)
    limits = ProfileLimits(
        max_batch=options.max_batch,
        max_prefill=min(options.max_prefill, context),
        max_context=context,
    )
    problems = limits.problems()
    if context > model_max:
        problems.append(f"--max-context {context} exceeds the model's context ({model_max})")
    if options.max_prefill < 1:
        problems.append("--max-prefill must be at least 1")
    if not 0 <= options.opt_level <= 5:
        problems.append(f"--opt-level {options.opt_level} must be 0..5")
    if options.workspace_gb <= 0:
        problems.append("--workspace-gb must be positive")
    if problems:
        raise BuildError("bad_limits", "; ".join(problems))
    return limits


def open_source_bundle(bundle_dir: Path) -> Bundle:
    try:
        bundle = open_bundle(bundle_dir)
    except Exception as exc:
        raise BuildError("bad_bundle", f"{bundle_dir}: {exc}") from exc
    manifest = bundle.manifest
    if manifest.backend != "onnxruntime" or ONNX_MODEL_FILE not in manifest.files:
        raise BuildError(
            "bad_bundle",
            f"{bundle_dir} is a {manifest.backend} bundle; compile an ONNX bundle "
            "(edge-build export --target orin)",
        )
    exported_for = (manifest.raw.get("build") or {}).get("target", "cpu")
    if manifest.precision == "fp32" and has_cpu_attention(bundle.path / ONNX_MODEL_FILE):
        raise BuildError(
            "wrong_target",
            f"{bundle_dir} is an fp32 bundle exported for the cpu (ONNX Runtime's CPU attention "
            "operators, which TensorRT cannot build); export it for TensorRT with `edge-build "
            "export ... --target orin`",
        )
    if manifest.precision != "fp32" and exported_for != "orin":
        raise BuildError(
            "wrong_target",
            f"{bundle_dir} is a {manifest.precision} bundle exported for the {exported_for} "
            "(ONNX Runtime's own quantized operators, which TensorRT cannot build); export it "
            f"for TensorRT with `edge-build export ... --target orin --precision "
            f"{manifest.precision}`",
        )
    return bundle


def _build_engine(
    trt: Any,
    source: Bundle,
    limits: ProfileLimits,
    options: CompileOptions,
    timing_cache: Path,
    engine_path: Path,
    steps: Steps,
    progress: Progress,
) -> tuple[float, list[dict[str, Any]]]:
    from build_engine.tensorrt.engine_builder import BuildSettings, build_serialized_engine
    from build_engine.tensorrt.logger import make_logger
    from build_engine.tensorrt.parse import network_inputs, parse_onnx

    logger = make_logger(trt, verbose=options.verbose)
    builder = trt.Builder(logger)
    steps(f"parsing {ONNX_MODEL_FILE} with TensorRT {trt.__version__} (strongly typed network)")
    network, _parser = parse_onnx(trt, builder, logger, source.file(ONNX_MODEL_FILE))
    try:
        profiles = llm_profiles(network_inputs(network), limits)
    except ValueError as exc:
        raise BuildError("unsupported_graph", f"{source.path}: {exc}") from exc
    steps(
        f"building the engine: batch <= {limits.max_batch}, prefill <= {limits.max_prefill} "
        f"tokens, context {limits.max_context}, optimization level {options.opt_level} "
        "(this takes minutes)"
    )
    began = time.monotonic()
    plan = build_serialized_engine(
        trt,
        builder,
        network,
        logger,
        profiles,
        BuildSettings(
            workspace_bytes=int(options.workspace_gb * 2**30),
            optimization_level=options.opt_level,
        ),
        timing_cache,
        progress,
    )
    engine_path.write_bytes(plan)
    build_s = time.monotonic() - began
    progress(f"engine: {len(plan) / 1e6:.0f} MB in {build_s:.0f} s; timing cache {timing_cache}")
    return build_s, profiles


def _record_golden(staging: Path, source: Manifest, limits: ProfileLimits) -> list[CanaryResult]:
    """The engine's own greedy tokens, through the agent's TensorRT backend: what a device
    running this bundle must reproduce."""
    from agent.backends.tensorrt.backend import TensorRTBackend
    from agent.backends.tensorrt.trt_engine import TensorRTEngine

    eos = [int(t) for t in source.tokenizer.get("eos_token_ids", [])]
    codec = TextCodec(staging, eos_token_ids=eos)
    backend = TensorRTBackend(
        TensorRTEngine.from_file(staging / ENGINE_FILE), max_seq_len=limits.max_context
    )
    try:
        results = run_canaries(backend, codec)
    finally:
        backend.close()
    write_json(staging / GOLDEN_FILE, golden_document(results, "tensorrt", source.precision))
    return results


def _golden_agreement(source_dir: Path, results: list[CanaryResult]) -> dict[str, Any]:
    """How the engine's greedy tokens compare with the ONNX bundle's golden tokens. Not a gate:
    fp16 kernels may round differently and pick another token after a near tie."""
    expected = {canary.name: tokens for canary, _, tokens in read_golden(source_dir)}
    canaries = [
        {"name": r.canary.name, "tokens_match": expected.get(r.canary.name) == r.token_ids}
        for r in results
    ]
    matching = sum(1 for c in canaries if c["tokens_match"])
    return {
        "reference": "the ONNX bundle's golden tokens",
        "canaries": len(canaries),
        "matching": matching,
        "golden_agreement": round(matching / len(canaries), 3) if canaries else 0.0,
        "per_canary": canaries,
    }


def _manifest(
    staging: Path,
    source: Bundle,
    options: CompileOptions,
    target: DeviceTarget,
    limits: ProfileLimits,
    *,
    quality: dict[str, Any],
    build: dict[str, Any],
) -> dict[str, Any]:
    """The same schema `edge-build export` writes, for backend "tensorrt" with a target."""
    src = source.manifest
    return write_manifest(
        staging,
        name=options.name or src.name,
        version=options.version or src.version,
        source=src.source,
        arch=replace(src.arch, max_seq_len=limits.max_context),  # the engine holds no more
        backend="tensorrt",
        precision=src.precision,
        target=target.to_manifest(),
        quality={**quality, "onnx_bundle": src.quality},
        tokenizer=src.tokenizer,
        build=build,
    )


# --- command line ---------------------------------------------------------------------------------


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `edge-build compile`."""
    defaults = CompileOptions()
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="ONNX bundle to compile")
    parser.add_argument("--out", required=True, type=Path, help="engine bundle directory to write")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help=f"rows decoded together (default {defaults.max_batch})",
    )
    parser.add_argument(
        "--max-prefill",
        type=int,
        default=defaults.max_prefill,
        help="tokens one prefill step takes; longer prompts are prefilled in chunks "
        f"(default {defaults.max_prefill})",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=0,
        help="tokens per row, prompt + answer (default: the model's context, at most "
        f"{DEFAULT_MAX_CONTEXT})",
    )
    parser.add_argument(
        "--workspace-gb",
        type=float,
        default=defaults.workspace_gb,
        help=f"TensorRT's workspace memory limit while building (default {defaults.workspace_gb})",
    )
    parser.add_argument(
        "--opt-level",
        type=int,
        choices=range(6),
        default=defaults.opt_level,
        metavar="0-5",
        help=f"builder optimization level: higher builds longer, runs faster "
        f"(default {defaults.opt_level})",
    )
    parser.add_argument(
        "--timing-cache",
        type=Path,
        metavar="FILE",
        help=f"persistent timing cache (default: {TIMING_CACHE_NAME} next to --out)",
    )
    parser.add_argument("--name", help="bundle name (default: the ONNX bundle's)")
    parser.add_argument("--bundle-version", help="bundle version (default: the ONNX bundle's)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def compile_from_args(args: argparse.Namespace, progress: Progress) -> int:
    """Run `edge-build compile` from parsed flags; prints a summary (or the manifest as JSON).
    Raises BuildError for anything the user can fix."""
    options = CompileOptions(
        max_batch=args.max_batch,
        max_prefill=args.max_prefill,
        max_context=args.max_context,
        workspace_gb=args.workspace_gb,
        opt_level=args.opt_level,
        timing_cache=args.timing_cache,
        name=args.name,
        version=args.bundle_version,
        force=args.force,
        verbose=bool(getattr(args, "verbose", False)),
    )
    manifest = compile_bundle(args.bundle, args.out, options, progress)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        target = DeviceTarget.from_manifest(manifest["target"])
        size = sum(entry["size"] for entry in manifest["files"].values())
        print(
            f"{manifest['name']} {manifest['version']} ({manifest['precision']}, tensorrt): "
            f"{size / 1e6:.0f} MB for {target.describe()}"
        )
    return 0
