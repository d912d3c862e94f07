"""Write the files of a bundle around its ONNX graph: tokenizer, golden canaries, manifest.

The bundle is assembled in a staging directory next to `--out` and renamed into place at the end,
so an interrupted build never leaves a half-written bundle where the agent might load it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from agent.contract import bundle as contract
from agent.contract.bundle import TOKENIZER_FILE, TOKENIZER_FILES, Arch, Backend
from agent.contract.errors import ContractError
from build_engine.errors import BuildError

__all__ = [
    "TOKENIZER_FILES",
    "eos_token_ids",
    "publish_bundle",
    "write_json",
    "write_manifest",
    "write_tokenizer",
]


def write_tokenizer(tokenizer: Any, bundle_dir: Path, scratch: Path) -> None:
    """Save the tokenizer with transformers, keep only what the agent reads."""
    tokenizer.save_pretrained(str(scratch))
    if not (scratch / TOKENIZER_FILE).is_file():
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
    backend: Backend = "onnxruntime",
    target: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file already in the bundle and write manifest.json last, with the contract's
    one writer (`edge-build export` and `edge-build compile` both come here). Returns the
    manifest as written."""
    manifest = contract.new_manifest(
        bundle_dir,
        name=name,
        version=version,
        source=source,
        arch=arch,
        backend=backend,
        precision=precision,
        target=target,
        quality=quality,
        tokenizer=tokenizer,
        build=build,
    )
    try:
        return contract.write_manifest(bundle_dir, manifest).raw
    except ContractError as exc:  # a bug of the build, not of its input: say so plainly
        raise BuildError(exc.code, f"the build made an invalid manifest: {exc.message}") from exc


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
