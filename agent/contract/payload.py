"""JSON payloads on the wire: strict decoding and the identifiers every message shares.

Every MQTT payload of the contract is a UTF-8 JSON object; one decoder reads them all, strictly, so
that the agent, the fleet and a gateway read the same request from the same bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from agent.contract.errors import INVALID_JSON, INVALID_REQUEST, ContractError

# A job, update or device id: 1-128 characters of A-Za-z0-9._:- (safe as one MQTT topic level).
JOB_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")  # lowercase hex, as `sha256sum` prints it


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys repeat is refused: JSON parsers disagree on which value wins, so a
    gateway and this device could each read a different request from the same bytes."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"payload repeats the key {key[:64]!r} in one object")
            seen.add(key)
    return data


def check_size(payload: bytes, limit: int, what: str) -> None:
    """Refuse an oversize payload before any parsing: the cost of a refusal stays bounded."""
    if len(payload) > limit:
        raise ContractError(
            INVALID_REQUEST, f"{what} is {len(payload)} bytes; the limit is {limit}"
        )


def decode_json_object(payload: bytes) -> dict[str, Any]:
    """UTF-8 JSON object, strictly: no NaN/Infinity, no repeated keys, no absurd nesting or
    number sizes, no lone UTF-16 surrogates."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError(INVALID_JSON, f"payload is not UTF-8: {exc.reason}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ContractError(INVALID_JSON, f"{exc}: send each key once") from None
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, NaN/Infinity and integers past Python's digit limit.
        raise ContractError(INVALID_JSON, f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContractError(INVALID_REQUEST, "payload must be a JSON object")
    try:  # JSON escapes can smuggle lone UTF-16 surrogates ("\ud800") that no tokenizer takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        job_id = data.get("id")
        usable = isinstance(job_id, str) and JOB_ID_RE.match(job_id) and job_id.isascii()
        raise ContractError(
            INVALID_REQUEST,
            "text holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): send valid Unicode",
            job_id if usable else None,
        ) from None
    return data


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes of a payload as the agent and the fleet publish them (UTF-8, not ASCII-escaped)."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")
