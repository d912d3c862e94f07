"""The update command (DESIGN.md: `{"id", "url", "sha256", "size", "version"}`, plus the
optional `allow_downgrade` of the second revision), validated."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from agent.jobs import JOB_ID_RE, InvalidPayload, decode_json_object
from agent.ota.errors import OtaError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FIELDS = frozenset({"id", "url", "sha256", "size", "version", "allow_downgrade"})


@dataclass(frozen=True)
class UpdateCommand:
    id: str
    url: str
    sha256: str
    size: int
    version: str
    # An operator's deliberate rollback: install even when `version` is not newer than the
    # highest version this device ever activated (DESIGN.md, "Anti-rollback").
    allow_downgrade: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_update_command(payload: bytes, max_bytes: int) -> UpdateCommand:
    try:
        data = decode_json_object(payload)
    except InvalidPayload as exc:
        raise OtaError("bad_command", f"update command: {exc.message}") from None
    return update_command_from_dict(data, max_bytes)


def update_command_from_dict(data: dict[str, Any], max_bytes: int) -> UpdateCommand:
    def bad(message: str) -> OtaError:
        return OtaError("bad_command", f"update command: {message}")

    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}")
    update_id, url, sha256 = data.get("id"), data.get("url"), data.get("sha256")
    size, version = data.get("size"), data.get("version")
    if not isinstance(update_id, str) or not JOB_ID_RE.match(update_id):
        raise bad("`id` must be 1-128 characters of A-Za-z0-9._:-")
    if not isinstance(url, str) or urlparse(url).scheme not in ("http", "https"):
        raise bad("`url` must be an http:// or https:// URL")
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256.lower()):
        raise bad("`sha256` must be 64 hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_bytes:
        raise bad(f"`size` must be an integer from 1 to {max_bytes} bytes")
    if not isinstance(version, str) or not 0 < len(version) <= 64:
        raise bad("`version` must be a string of 1-64 characters")
    allow_downgrade = data.get("allow_downgrade", False)
    if not isinstance(allow_downgrade, bool):
        raise bad("`allow_downgrade` must be true or false")
    return UpdateCommand(update_id, url, sha256.lower(), size, version, allow_downgrade)
