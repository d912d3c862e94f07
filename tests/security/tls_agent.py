"""`python -m tests.security.tls_agent run ...`: `edge-agent run` plus the one missing line of TLS.

NOT the agent's code. agent/mqtt_link.py reads `[mqtt] ca_file/cert_file/key_file` into
MqttConfig but never calls paho's `tls_set`, so the real agent cannot reach a TLS broker
(test_agent_tls.py::test_edge_agent_answers_over_mutual_tls fails on exactly that). This wrapper
applies the proposed fix (the same call, before connecting) so the broker's ACL can be tested
against the real agent meanwhile. Delete it once MqttLink does this itself.
"""

from __future__ import annotations

import sys
from typing import Any

from agent import cli
from agent.mqtt_link import MqttLink

_original_start = MqttLink.start


def _start_with_tls(self: Any) -> None:
    config = self._config
    already = getattr(self._client, "_ssl_context", None) is not None  # fixed in the agent
    if (config.ca_file or config.cert_file) and not already:
        self._client.tls_set(
            ca_certs=config.ca_file, certfile=config.cert_file, keyfile=config.key_file
        )
    _original_start(self)


if __name__ == "__main__":
    MqttLink.start = _start_with_tls  # type: ignore[method-assign]
    sys.exit(cli.main(sys.argv[1:]))
