"""Pausing a real agent's OTA installer at an exact step, from outside the production code."""

from __future__ import annotations

import os
from pathlib import Path

AGENT_SITE = Path(__file__).parent / "agent_site"  # its sitecustomize.py does the pausing


def hold_env(**seconds_in_state: float) -> dict[str, str]:
    """The environment for `start_agent(..., env=...)` that makes the agent's installer pause
    that many seconds after entering each named state, e.g. `hold_env(testing=60)`."""
    spec = ",".join(f"{state}={seconds:g}" for state, seconds in seconds_in_state.items())
    path = os.pathsep.join(filter(None, [str(AGENT_SITE), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "EDGE_TEST_OTA_HOLD": spec}
