"""The bundle (DESIGN.md, "Bundle"): its file names, and `manifest.json` as one type with one
writer (`edge-build export` and `edge-build compile`) and one reader (the agent, the fleet).

Writer and reader are the same code, so a manifest the build writes is by construction one the
device reads: `write_manifest` parses what it is about to write and refuses to write otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, get_args

from agent.contract.errors import BAD_MANIFEST, ContractError

# --- layout -------------------------------------------------------------------------------------

MANIFEST_FILE: Final = "manifest.json"
SIGNATURE_FILE: Final = "manifest.sig"  # Ed25519 over the exact bytes of manifest.json, base64
ONNX_MODEL_FILE: Final = "model.onnx"  # backend "onnxruntime"
ONNX_DATA_FILE: Final = "model.onnx.data"  # its external weights
ENGINE_FILE: Final = "engine.plan"  # backend "tensorrt"
TOKENIZER_FILE: Final = "tokenizer.json"
TOKENIZER_CONFIG_FILE: Final = "tokenizer_config.json"  # may hold the chat template
CHAT_TEMPLATE_FILE: Final = "chat_template.jinja"
GOLDEN_FILE: Final = "golden.json"  # canary prompts and the token ids the build produced
TOKENIZER_FILES: Final = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)
UNLISTED_FILES: Final = frozenset({MANIFEST_FILE, SIGNATURE_FILE})  # not in `files`

MANIFEST_FORMAT: Final = 1
Backend = Literal["onnxruntime", "tensorrt"]
BACKENDS: Final = get_args(Backend)
Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: Final = get_args(Precision)
_CHUNK: Final = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(bundle_dir: Path) -> list[str]:
    """Relative names of every file in the bundle but the manifest and its signature."""
    names = (p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
    return [n for n in names if n not in UNLISTED_FILES]


def file_table(bundle_dir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files` table: every file in the bundle but the manifest and signature."""
    return {
        rel: {"sha256": sha256_file(bundle_dir / rel), "size": (bundle_dir / rel).stat().st_size}
        for rel in sorted(bundle_files(bundle_dir))
    }


def utc_created() -> str:
    """A manifest's `created`: UTC to the second, `Z`."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- the manifest -------------------------------------------------------------------------------


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

    def to_payload(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden": self.hidden,
            "vocab": self.vocab,
            "max_seq_len": self.max_seq_len,
        }


@dataclass(frozen=True)
class Manifest:
    """A validated `manifest.json`. `raw` is the object as read (what `manifest.sig` signs);
    empty for a manifest made in memory that was not written yet."""

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
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    build: dict[str, Any] = field(default_factory=dict)

    def engine_info(self) -> dict[str, str]:
        """The `engine` object of `done` events and status messages."""
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.precision,
            "backend": self.backend,
        }

    @property
    def total_bytes(self) -> int:
        """The bytes of every listed file (what the bundle needs on disk, and roughly in RAM)."""
        return sum(int(entry["size"]) for entry in self.files.values())

    def to_payload(self) -> dict[str, Any]:
        """The JSON object, keys in the order the build has always written them."""
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "source": self.source,
            "arch": self.arch.to_payload(),
            "backend": self.backend,
            "precision": self.precision,
            "target": self.target,
            "files": self.files,
            "quality": self.quality,
            "tokenizer": self.tokenizer,
            "build": self.build,
        }


def _bad(message: str) -> ContractError:
    return ContractError(BAD_MANIFEST, message)


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise _bad(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(f"{where}: {key!r} has the wrong type")
    return value


def parse_manifest(data: Any, where: str = MANIFEST_FILE) -> Manifest:
    """Validate the manifest's structure into a typed object (file hashes are checked by whoever
    holds the files). Raises ContractError (`bad_manifest`)."""
    if not isinstance(data, dict):
        raise _bad(f"{where}: not a JSON object")
    fmt = _require(data, "format", int, where)
    if fmt != MANIFEST_FORMAT:
        raise _bad(
            f"{where}: format {fmt} is not supported by this agent (it reads format "
            f"{MANIFEST_FORMAT}); upgrade the agent or rebuild the bundle"
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
        raise _bad(f"{where}: arch is incomplete ({exc})") from exc
    backend = _require(data, "backend", str, where)
    if backend not in BACKENDS:
        raise _bad(f"{where}: unknown backend {backend!r}")
    precision = _require(data, "precision", str, where)
    if precision not in PRECISIONS:
        raise _bad(f"{where}: unknown precision {precision!r}")
    target = data.get("target")
    if target is not None and not isinstance(target, dict):
        raise _bad(f"{where}: target must be null or an object")
    files = _require(data, "files", dict, where)
    for rel, entry in files.items():
        check_relative_path(rel, where)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise _bad(f"{where}: files[{rel!r}] needs a sha256")
        if not isinstance(entry.get("size"), int):
            raise _bad(f"{where}: files[{rel!r}] needs a size")
    build = data.get("build") or {}
    if not isinstance(build, dict):
        raise _bad(f"{where}: build must be an object")
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
        build=build,
    )


def check_relative_path(rel: str, where: str) -> None:
    """A `files` name must stay inside the bundle."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not rel or "\\" in rel:
        raise _bad(f"{where}: file name {rel!r} leaves the bundle")


def manifest_bytes(manifest: Manifest) -> bytes:
    """The bytes of manifest.json (what `manifest.sig` signs): indented, UTF-8, one newline."""
    payload = manifest.to_payload()
    parse_manifest(payload, "the manifest being written")  # the writer only writes what reads
    return (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def new_manifest(
    bundle_dir: Path,
    *,
    name: str,
    version: str,
    source: dict[str, Any],
    arch: Arch,
    backend: Backend,
    precision: str,
    target: dict[str, Any] | None,
    quality: dict[str, Any],
    tokenizer: dict[str, Any],
    build: dict[str, Any],
    created: str | None = None,
) -> Manifest:
    """The manifest of the files now in `bundle_dir` (each one hashed)."""
    return Manifest(
        name=name,
        version=version,
        created=created or utc_created(),
        source=source,
        arch=arch,
        backend=backend,
        precision=precision,
        target=target,
        files=file_table(bundle_dir),
        quality=quality,
        tokenizer=tokenizer,
        build=build,
    )


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Write manifest.json last (after every file it lists); returns it as the reader sees it."""
    data = manifest_bytes(manifest)
    (bundle_dir / MANIFEST_FILE).write_bytes(data)
    return parse_manifest(json.loads(data), str(bundle_dir / MANIFEST_FILE))


def read_manifest_file(path: Path) -> Manifest:
    """Parse one manifest.json. Raises ContractError (`bad_manifest`); OSError if unreadable."""
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"{path} is not valid JSON: {exc}") from exc
    return parse_manifest(data, str(path))
