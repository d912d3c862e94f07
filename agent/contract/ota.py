"""The update command and the update progress (DESIGN.md, "Update command", both revisions).

`UpdateCommand` is validated when it is made, so the fleet cannot send one a device would refuse
and the device trusts the one it parsed. `allow_downgrade` (second revision) is only sent when
true, so agents from before it still accept every other command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, get_args
from urllib.parse import urlparse

from agent.contract.errors import BAD_COMMAND, ContractError
from agent.contract.payload import JOB_ID_RE, SHA256_RE, decode_json_object

OtaState = Literal["downloading", "verifying", "testing", "active", "rolled_back", "failed"]
OTA_STATES: Final[frozenset[str]] = frozenset(get_args(OtaState))
FINAL_STATES: Final[frozenset[str]] = frozenset({"active", "rolled_back", "failed"})
COMMAND_FIELDS: Final[frozenset[str]] = frozenset(
    {"id", "url", "sha256", "size", "version", "allow_downgrade"}
)
MAX_VERSION_CHARS: Final = 64
MAX_COMMAND_BYTES: Final = 64 * 1024


def _bad(message: str) -> ContractError:
    return ContractError(BAD_COMMAND, message)


@dataclass(frozen=True)
class UpdateCommand:
    id: str
    url: str
    sha256: str  # of the archive, 64 lowercase hex digits
    size: int  # of the archive, bytes
    version: str  # must equal the bundle manifest's `version`
    # An operator's deliberate rollback: install even when `version` is not newer than the
    # highest version this device ever activated (DESIGN.md, "Anti-rollback").
    allow_downgrade: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not JOB_ID_RE.match(self.id):
            raise _bad("`id` must be 1-128 characters of A-Za-z0-9._:-")
        url = urlparse(self.url) if isinstance(self.url, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.netloc:
            raise _bad("`url` must be an http:// or https:// URL")
        if not isinstance(self.sha256, str) or not SHA256_RE.match(self.sha256):
            raise _bad("`sha256` must be 64 lowercase hex digits")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise _bad("`size` must be a positive integer (the archive's bytes)")
        if not isinstance(self.version, str) or not 0 < len(self.version) <= MAX_VERSION_CHARS:
            raise _bad(f"`version` must be a string of 1-{MAX_VERSION_CHARS} characters")
        if not isinstance(self.allow_downgrade, bool):
            raise _bad("`allow_downgrade` must be true or false")

    def to_payload(self) -> dict[str, Any]:
        """What the fleet publishes on `P/D/ota`."""
        payload: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "version": self.version,
        }
        if self.allow_downgrade:
            payload["allow_downgrade"] = True
        return payload

    def to_json(self) -> dict[str, Any]:
        """Every field, `allow_downgrade` included (the agent's persisted OTA record)."""
        return asdict(self)


def update_command_from_dict(data: dict[str, Any], max_bytes: int | None = None) -> UpdateCommand:
    """A decoded update command, validated; `sha256` may come in upper case. `max_bytes` is the
    receiver's cap on `size`. Raises ContractError (`bad_command`)."""
    unknown = sorted(set(data) - COMMAND_FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(unknown)}")
    sha256, size = data.get("sha256"), data.get("size")
    if max_bytes is not None and (
        not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_bytes
    ):
        raise _bad(f"`size` must be an integer from 1 to {max_bytes} bytes")
    return UpdateCommand(
        data.get("id"),  # type: ignore[arg-type]  # checked by UpdateCommand
        data.get("url"),  # type: ignore[arg-type]
        sha256.lower() if isinstance(sha256, str) else sha256,  # type: ignore[arg-type]
        size,  # type: ignore[arg-type]
        data.get("version"),  # type: ignore[arg-type]
        data.get("allow_downgrade", False),
    )


def parse_update_command(payload: bytes, max_bytes: int | None = None) -> UpdateCommand:
    """An update command's bytes, validated. Raises ContractError (`bad_command`)."""
    try:
        data = decode_json_object(payload)
    except ContractError as exc:
        raise _bad(exc.message) from None
    return update_command_from_dict(data, max_bytes)


@dataclass(frozen=True)
class OtaStatus:
    """One `P/D/ota/status` message (retained)."""

    id: str
    state: OtaState
    version: str | None
    progress: float | None
    error: dict[str, Any] | None  # {"code", "message"} when failed or rolled back

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def error_text(self) -> str:
        if not self.error:
            return ""
        return f"[{self.error.get('code', '?')}] {self.error.get('message', '')}".strip()

    def to_payload(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "version": self.version,
            "progress": self.progress,
            "error": self.error,
        }

    to_json = to_payload


def parse_ota_status(data: Any) -> OtaStatus:
    """An `ota/status` message read back, tolerantly (a missing or odd `version`, `progress` or
    `error` becomes None). Raises ContractError when it has no valid `id` and `state`."""
    if not isinstance(data, dict):
        raise ContractError("bad_status", "ota/status: not a JSON object")
    status_id, state = data.get("id"), data.get("state")
    if not isinstance(status_id, str) or state not in OTA_STATES:
        raise ContractError("bad_status", f"ota/status without a valid id and state: {data!r}")
    progress, error, version = data.get("progress"), data.get("error"), data.get("version")
    return OtaStatus(
        id=status_id,
        state=state,
        version=version if isinstance(version, str) else None,
        progress=float(progress)
        if isinstance(progress, int | float) and not isinstance(progress, bool)
        else None,
        error=error if isinstance(error, dict) else None,
    )
