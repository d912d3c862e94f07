"""Model bundles: read `manifest.json`, check every file against it, describe what was loaded.

A bundle is a directory (DESIGN.md, "Bundle"). The manifest lists every other file with its sha256
and size; anything that does not match, is missing, or is not listed is refused, so a bundle that
was tampered with or half-copied never reaches the inference engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract import bundle as contract
from agent.contract.bundle import (
    BACKENDS,
    MANIFEST_FORMAT,
    PRECISIONS,
    Arch,
    Manifest,
    bundle_files,
    file_table,
    sha256_file,
)
from agent.contract.errors import ContractError
from agent.errors import BundleError

__all__ = [
    "BACKENDS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "PRECISIONS",
    "SIGNATURE_NAME",
    "Arch",
    "Bundle",
    "Manifest",
    "bundle_files",
    "file_table",
    "open_bundle",
    "parse_manifest",
    "read_manifest",
    "sha256_file",
    "verify_files",
]

MANIFEST_NAME = contract.MANIFEST_FILE
SIGNATURE_NAME = contract.SIGNATURE_FILE


def parse_manifest(data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Validate the manifest's structure into a typed object (hashes are checked separately)."""
    try:
        return contract.parse_manifest(data, where)
    except ContractError as exc:
        raise BundleError(exc.code, exc.message) from None


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
        return contract.read_manifest_file(manifest_path)
    except ContractError as exc:
        raise BundleError(exc.code, exc.message) from exc


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


def open_bundle(bundle_dir: Path) -> Bundle:
    """Read and fully verify a bundle. Raises BundleError with a message a person can act on."""
    bundle_dir = bundle_dir.resolve()
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    return Bundle(path=bundle_dir, manifest=manifest)
