"""The update command (DESIGN.md: `{"id", "url", "sha256", "size", "version"}`, plus the
optional `allow_downgrade` of the second revision), validated by the contract
(`agent.contract.ota`); its refusals become `OtaError("bad_command")` here."""

from __future__ import annotations

from typing import Any

from agent.contract import ota as contract
from agent.contract.errors import ContractError
from agent.contract.ota import COMMAND_FIELDS as FIELDS
from agent.contract.ota import UpdateCommand
from agent.contract.payload import SHA256_RE
from agent.ota.errors import OtaError

__all__ = [
    "FIELDS",
    "SHA256_RE",
    "UpdateCommand",
    "parse_update_command",
    "update_command_from_dict",
]


def _ota_error(exc: ContractError) -> OtaError:
    return OtaError("bad_command", f"update command: {exc.message}")


def parse_update_command(payload: bytes, max_bytes: int) -> UpdateCommand:
    try:
        return contract.parse_update_command(payload, max_bytes)
    except ContractError as exc:
        raise _ota_error(exc) from None


def update_command_from_dict(data: dict[str, Any], max_bytes: int) -> UpdateCommand:
    try:
        return contract.update_command_from_dict(data, max_bytes)
    except ContractError as exc:
        raise _ota_error(exc) from None
