"""The agent's MQTT connection: paho-mqtt 2.x, MQTT v5, kept behind a small typed surface.

paho's network thread reconnects by itself with exponential backoff (`reconnect_delay_set`);
every (re)connect re-subscribes and republishes the retained status, because the Last Will may have
replaced it while we were away. paho types stay inside this module.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.errors import ConfigError
from agent.outbox import DeltaBuilder, JobStream, OnAck, Outbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """One received message, with the MQTT v5 request/response properties it carried."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    # The broker's DUP flag: a QoS 1 message sent again because our acknowledgement did not
    # reach it (a broker restart, a dropped connection), not a new request from the sender.
    redelivered: bool = False


@dataclass(frozen=True)
class Subscription:
    topic: str
    qos: int = 1


MessageHandler = Callable[[Incoming], None]


class MqttLink:
    """One MQTT v5 client session with a Last Will, auto-reconnect and JSON publishing."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        will_topic: str | None = None,
        will_payload: dict[str, Any] | None = None,
        subscriptions: list[Subscription],
        on_message: MessageHandler,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._subscriptions = subscriptions
        self._handler = on_message
        self._on_connected = on_connected
        self._connected = threading.Event()
        self._stopping = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if config.ca_file or config.cert_file:
            _use_tls(self._client, config)
        if will_topic is not None:
            self._client.will_set(will_topic, json.dumps(will_payload), qos=1, retain=True)
        self._client.reconnect_delay_set(
            min_delay=max(1, int(config.reconnect_min_s)), max_delay=int(config.reconnect_max_s)
        )
        # Outgoing QoS 1 messages wait in the outbox (priority classes, bounded refusals) and
        # reach paho only while its in-flight window has room; paho's own queue is a safety net.
        self._outbox = Outbox(self._send)
        self._client.max_queued_messages_set(10_000)
        self._client.on_publish = self._handle_publish
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until `stop`."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self._config.session_expiry_s
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        on_ack: OnAck | None = None,
    ) -> None:
        """QoS 1: never dropped, sent before job events (status, OTA status, a fleet tool's
        requests); a retained message still waiting is replaced by a newer one on its topic.
        QoS 0 (telemetry) goes to paho at once and may be lost, as QoS 0 may."""
        if qos == 0:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            info = self._client.publish(topic, data, qos=0, retain=retain)
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return
        self._outbox.control(
            topic, payload, retain=retain, correlation=correlation_data, on_ack=on_ack
        )

    def stream(
        self, topic: str, correlation_data: bytes | None, make_delta: DeltaBuilder
    ) -> JobStream:
        """The ordered, never-dropped event stream of one accepted job (see agent/outbox.py)."""
        return self._outbox.stream(topic, correlation_data, make_delta)

    def refuse(self, topic: str, payload: dict[str, Any], correlation_data: bytes | None) -> None:
        """A reply to a request that was not accepted: bounded, dropped under a flood."""
        self._outbox.refusal(topic, payload, correlation_data)

    @property
    def refusals_dropped(self) -> int:
        return self._outbox.dropped

    def _send(self, topic: str, data: bytes, retain: bool, correlation: bytes | None) -> int | None:
        properties = None
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        info = self._client.publish(topic, data, qos=1, retain=retain, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return None
        return info.mid  # NO_CONN: paho keeps it and sends it on reconnect

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        self._outbox.acknowledged(mid)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is sent and acknowledged (False after `timeout`)."""
        return self._outbox.wait_idle(timeout)

    def publish_and_wait(self, topic: str, payload: dict[str, Any], timeout: float) -> bool:
        """Publish retained at QoS 1 and wait for the broker's acknowledgement (used at exit)."""
        data = json.dumps(payload).encode("utf-8")
        info = self._client.publish(topic, data, qos=1, retain=True)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def unsubscribe(self, topic: str) -> None:
        self._subscriptions = [s for s in self._subscriptions if s.topic != topic]
        self._client.unsubscribe(topic)

    def stop(self) -> None:
        """Disconnect cleanly (the broker then does not send the Last Will) and stop the thread."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%s", self._config.host, self._config.port)
        client.subscribe([(s.topic, s.qos) for s in self._subscriptions])
        self._connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any,
    ) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _handle_message(self, client: paho.Client, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        incoming = Incoming(
            topic=message.topic,
            payload=bytes(message.payload),
            response_topic=response_topic if isinstance(response_topic, str) else None,
            correlation_data=bytes(correlation) if correlation is not None else None,
            redelivered=bool(getattr(message, "dup", False)),
        )
        try:
            self._handler(incoming)
        except Exception:  # a bug in handling one message must not kill paho's network thread
            log.exception("failed to handle a message on %s", message.topic)


def _use_tls(client: paho.Client, config: MqttConfig) -> None:
    """TLS to the broker: trust it by `ca_file` (the system's CAs when unset), and present this
    device's certificate when `cert_file` is set (mutual TLS; with `use_identity_as_username`
    the certificate's CN is then the device's ACL identity). Files that are not PEM, or a key
    that does not match its certificate, fail here at start (the paths themselves are checked
    earlier, by `config.validate_tls`)."""
    try:
        client.tls_set(
            ca_certs=config.ca_file,
            certfile=config.cert_file,
            keyfile=config.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            "bad_config",
            f"mqtt TLS settings rejected ({exc}): ca_file must hold PEM CA certificates, "
            "cert_file/key_file this device's PEM certificate and its private key",
        ) from exc
