"""Model bundles: read `manifest.json`, check every file against it, describe what was loaded.

A bundle is a directory (DESIGN.md, "Bundle"). The manifest lists every other file with its sha256
and size; anything that does not match, is missing, or is not listed is refused, so a bundle that
was tampered with or half-copied never reaches the inference engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.errors import BundleError

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MANIFEST_FORMAT = 1
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(bundle_dir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files` table: every file in the bundle but the manifest and signature."""
    return {
        rel: {"sha256": sha256_file(bundle_dir / rel), "size": (bundle_dir / rel).stat().st_size}
        for rel in sorted(bundle_files(bundle_dir))
    }


@dataclass(frozen=True)
class Arch:
    """Model shape facts the runtime needs before it opens the graph."""

    model_type: str
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_seq_len: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated `manifest.json`."""

    name: str
    version: str
    created: str
    source: dict[str, Any]
    arch: Arch
    backend: str
    precision: str
    target: dict[str, Any] | None
    files: dict[str, dict[str, Any]]
    quality: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def engine_info(self) -> dict[str, str]:
        """The `engine` object of `done` events and status messages."""
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.precision,
            "backend": self.backend,
        }


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BundleError("bad_manifest", f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError("bad_manifest", f"{where}: {key!r} has the wrong type")
    return value


def parse_manifest(data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Validate the manifest's structure into a typed object (hashes are checked separately)."""
    if not isinstance(data, dict):
        raise BundleError("bad_manifest", f"{where}: not a JSON object")
    fmt = _require(data, "format", int, where)
    if fmt != MANIFEST_FORMAT:
        raise BundleError(
            "bad_manifest",
            f"{where}: format {fmt} is not supported by this agent (it reads format "
            f"{MANIFEST_FORMAT}); upgrade the agent or rebuild the bundle",
        )
    arch_raw = _require(data, "arch", dict, where)
    try:
        arch = Arch(
            model_type=str(arch_raw.get("model_type", "")),
            layers=int(arch_raw["layers"]),
            kv_heads=int(arch_raw["kv_heads"]),
            head_dim=int(arch_raw["head_dim"]),
            hidden=int(arch_raw["hidden"]),
            vocab=int(arch_raw["vocab"]),
            max_seq_len=int(arch_raw["max_seq_len"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError("bad_manifest", f"{where}: arch is incomplete ({exc})") from exc
    backend = _require(data, "backend", str, where)
    if backend not in BACKENDS:
        raise BundleError("bad_manifest", f"{where}: unknown backend {backend!r}")
    precision = _require(data, "precision", str, where)
    if precision not in PRECISIONS:
        raise BundleError("bad_manifest", f"{where}: unknown precision {precision!r}")
    target = data.get("target")
    if target is not None and not isinstance(target, dict):
        raise BundleError("bad_manifest", f"{where}: target must be null or an object")
    files = _require(data, "files", dict, where)
    for rel, entry in files.items():
        _check_relative_path(rel, where)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError("bad_manifest", f"{where}: files[{rel!r}] needs a sha256")
        if not isinstance(entry.get("size"), int):
            raise BundleError("bad_manifest", f"{where}: files[{rel!r}] needs a size")
    return Manifest(
        name=_require(data, "name", str, where),
        version=_require(data, "version", str, where),
        created=_require(data, "created", str, where),
        source=_require(data, "source", dict, where),
        arch=arch,
        backend=backend,
        precision=precision,
        target=target,
        files=files,
        quality=data.get("quality") or {},
        tokenizer=data.get("tokenizer") or {},
        raw=data,
    )


def _check_relative_path(rel: str, where: str) -> None:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not rel or "\\" in rel:
        raise BundleError("bad_manifest", f"{where}: file name {rel!r} leaves the bundle")


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose every file matched its manifest when it was opened."""

    path: Path
    manifest: Manifest

    def file(self, rel: str) -> Path:
        if rel not in self.manifest.files:
            raise BundleError("missing_file", f"{self.path}: the manifest lists no {rel!r}")
        return self.path / rel


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse a bundle's manifest without hashing its files."""
    manifest_path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError("not_found", f"bundle directory {bundle_dir} does not exist")
    if not manifest_path.is_file():
        raise BundleError(
            "not_a_bundle",
            f"{bundle_dir} has no {MANIFEST_NAME}: build one with `edge-build export`",
        )
    try:
        data = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError("bad_manifest", f"{manifest_path} is not valid JSON: {exc}") from exc
    return parse_manifest(data, str(manifest_path))


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Refuse the bundle unless every listed file is present with its size and sha256, and no
    other file is there."""
    problems: list[str] = []
    for rel, entry in sorted(manifest.files.items()):
        path = bundle_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel}: size {size} != manifest {entry['size']}")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 does not match the manifest")
    extra = set(bundle_files(bundle_dir)) - set(manifest.files)
    problems.extend(f"{rel}: not listed in the manifest" for rel in sorted(extra))
    if problems:
        raise BundleError(
            "tampered",
            f"bundle {bundle_dir} does not match its manifest, refusing to load it: "
            + "; ".join(problems),
        )


def bundle_files(bundle_dir: Path) -> list[str]:
    """Relative names of every file in the bundle but the manifest and its signature."""
    names = (p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
    return [n for n in names if n not in (MANIFEST_NAME, SIGNATURE_NAME)]


def open_bundle(bundle_dir: Path) -> Bundle:
    """Read and fully verify a bundle. Raises BundleError with a message a person can act on."""
    bundle_dir = bundle_dir.resolve()
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    return Bundle(path=bundle_dir, manifest=manifest)
