"""Write the files of a bundle around its ONNX graph: tokenizer, golden canaries, manifest.

The bundle is assembled in a staging directory next to `--out` and renamed into place at the end,
so an interrupted build never leaves a half-written bundle where the agent might load it.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.bundle import MANIFEST_FORMAT, MANIFEST_NAME, Arch, file_table
from build_engine.errors import BuildError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tokenizer(tokenizer: Any, bundle_dir: Path, scratch: Path) -> None:
    """Save the tokenizer with transformers, keep only what the agent reads."""
    tokenizer.save_pretrained(str(scratch))
    if not (scratch / "tokenizer.json").is_file():
        raise BuildError(
            "no_fast_tokenizer",
            "the model's tokenizer has no tokenizer.json (a 'fast' tokenizer is required on the "
            "device); convert it with transformers' AutoTokenizer(use_fast=True) first",
        )
    for name in TOKENIZER_FILES:
        if (scratch / name).is_file():
            shutil.copy2(scratch / name, bundle_dir / name)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's eos ids plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_manifest(
    bundle_dir: Path,
    *,
    name: str,
    version: str,
    source: dict[str, Any],
    arch: Arch,
    precision: str,
    quality: dict[str, Any],
    tokenizer: dict[str, Any],
    build: dict[str, Any],
) -> dict[str, Any]:
    """Hash every file already in the bundle and write manifest.json last."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "source": source,
        "arch": {
            "model_type": arch.model_type,
            "layers": arch.layers,
            "kv_heads": arch.kv_heads,
            "head_dim": arch.head_dim,
            "hidden": arch.hidden,
            "vocab": arch.vocab,
            "max_seq_len": arch.max_seq_len,
        },
        "backend": "onnxruntime",
        "precision": precision,
        "target": None,
        "files": file_table(bundle_dir),
        "quality": quality,
        "tokenizer": tokenizer,
        "build": build,
    }
    write_json(bundle_dir / MANIFEST_NAME, manifest)
    return manifest


def publish_bundle(staging: Path, out: Path, force: bool) -> None:
    """Move the finished bundle into place, replacing an old one only with --force."""
    if out.exists():
        if not force:
            raise BuildError("out_exists", f"{out} already exists; pass --force to replace it")
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
