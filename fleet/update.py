"""`edge-fleet update`: send one device an update command and follow it to its end.

The command goes to `P/D/ota` (QoS 1): `{"id", "url", "sha256", "size", "version"}`, plus
`"allow_downgrade": true` for a deliberate rollback to an older version (only sent when set, so
agents from before the second contract revision still accept the others). The device
reports on `P/D/ota/status`, retained, so whoever subscribes (now, or after a reconnect) sees the
latest state at once. That retained message may belong to an OLDER update: statuses are matched
on `id`, and those of other ids are ignored. Because final states are retained too, a status we
missed in flight is never fatal: the last one always arrives.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections.abc import Callable

from agent.config import MqttConfig
from agent.contract.errors import ContractError
from agent.contract.ota import (
    FINAL_STATES,
    OTA_STATES,
    OtaState,
    OtaStatus,
    UpdateCommand,
    parse_ota_status,
)
from agent.contract.payload import JOB_ID_RE, SHA256_RE
from agent.errors import AgentError
from agent.mqtt_link import Incoming, MqttLink, Subscription
from agent.topics import Topics

__all__ = [
    "CONNECT_TIMEOUT_S",
    "FINAL_STATES",
    "OTA_STATES",
    "SHA256_RE",
    "OtaState",
    "OtaStatus",
    "UpdateCommand",
    "UpdateError",
    "UpdateTimeout",
    "format_status",
    "make_command",
    "new_update_id",
    "parse_status",
    "send_command",
    "send_update",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class UpdateError(AgentError):
    """An update could not be sent or followed (bad arguments, no broker)."""


class UpdateTimeout(UpdateError):
    """No final status within the timeout; `last` is the last status seen, if any."""

    def __init__(self, message: str, last: OtaStatus | None) -> None:
        super().__init__("timeout", message)
        self.last = last


def make_command(
    update_id: str, url: str, sha256: str, size: int, version: str, allow_downgrade: bool = False
) -> UpdateCommand:
    """The contract's update command, validated before it is sent (a device would refuse it).
    Raises UpdateError (`bad_command`) naming the flag to fix."""
    try:
        return UpdateCommand(update_id, url, sha256.lower(), size, version, allow_downgrade)
    except ContractError as exc:
        hint = " (`edge-fleet pack` prints the archive's sha256 and size)"
        raise UpdateError("bad_command", f"update command: {exc.message}{hint}") from None


def parse_status(payload: bytes) -> OtaStatus | None:
    """An `ota/status` payload, or None if it is not one (logged and skipped, never fatal)."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        log.warning("skipping an ota/status message that is not JSON")
        return None
    try:
        return parse_ota_status(data)
    except ContractError as exc:
        if isinstance(data, dict):
            log.warning("skipping an %s", exc.message)
        return None


def new_update_id() -> str:
    return f"upd-{uuid.uuid4().hex[:12]}"


def send_update(
    broker: MqttConfig,
    device: str,
    url: str,
    sha256: str,
    size: int,
    version: str,
    update_id: str | None = None,
    *,
    timeout_s: float = 1800.0,
    on_status: Callable[[OtaStatus], None] | None = None,
    allow_downgrade: bool = False,
) -> OtaStatus:
    """Publish the update command to `device` and return its final status (active,
    rolled_back or failed). Every status of this update is passed to `on_status` as it arrives.
    `allow_downgrade` lets the device install a version that is not newer than its highest.

    Raises UpdateError (`bad_command`, `no_broker`) or UpdateTimeout (`timeout`)."""
    command = make_command(
        update_id or new_update_id(), url, sha256, size, version, allow_downgrade
    )
    return send_command(broker, device, command, timeout_s=timeout_s, on_status=on_status)


def send_command(
    broker: MqttConfig,
    device: str,
    command: UpdateCommand,
    *,
    timeout_s: float = 1800.0,
    on_status: Callable[[OtaStatus], None] | None = None,
) -> OtaStatus:
    """`send_update` with the command already made (`make_command`): what a rollout sends to
    every device. Raises UpdateError (`bad_command`, `no_broker`) or UpdateTimeout."""
    if not JOB_ID_RE.match(device):
        raise UpdateError("bad_command", f"device id {device!r}: 1-128 characters of A-Za-z0-9._:-")
    topics = Topics(broker.prefix, device)
    statuses: queue.Queue[OtaStatus] = queue.Queue()

    def on_message(message: Incoming) -> None:
        status = parse_status(message.payload)
        if status is not None and status.id == command.id:
            statuses.put(status)

    link = MqttLink(
        broker,
        client_id=f"edge-fleet-ota-{uuid.uuid4().hex[:8]}",
        subscriptions=[Subscription(topics.ota_status)],
        on_message=on_message,
    )
    link.start()
    try:
        if not link.wait_connected(min(CONNECT_TIMEOUT_S, timeout_s)):
            raise UpdateError(
                "no_broker",
                f"cannot reach the MQTT broker at {broker.host}:{broker.port}; check --broker",
            )
        link.publish(topics.ota, command.to_payload(), qos=1)
        return _follow(statuses, command, topics, timeout_s, on_status)
    finally:
        link.stop()


def _follow(
    statuses: queue.Queue[OtaStatus],
    command: UpdateCommand,
    topics: Topics,
    timeout_s: float,
    on_status: Callable[[OtaStatus], None] | None,
) -> OtaStatus:
    deadline = time.monotonic() + timeout_s
    last: OtaStatus | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = f"its last status was {last.state}" if last else "it sent no status"
            raise UpdateTimeout(
                f"update {command.id} of {topics.device} did not finish within {timeout_s:.0f} s "
                f"({seen}); is the agent online and subscribed? Its progress stays "
                f"readable, retained, on {topics.ota_status}",
                last,
            )
        try:
            status = statuses.get(timeout=remaining)
        except queue.Empty:
            continue
        last = status
        if on_status is not None:
            on_status(status)
        if status.final:
            return status


def format_status(device: str, status: OtaStatus) -> str:
    """One human progress line: `orin-01 downloading 42%`, `orin-01 failed [code] message`."""
    line = f"{device} {status.state}"
    if status.state == "downloading" and status.progress is not None:
        line += f" {status.progress * 100:.0f}%"
    if status.state == "active" and status.version:
        line += f" (version {status.version})"
    if status.error:
        line += f" {status.error_text}"
    return line
