"""systemd's notify protocol (sd_notify(3)), without a dependency: one datagram per message.

Under `Type=notify` systemd waits for `READY=1` before it calls the service started, shows the
last `STATUS=` line in `systemctl status`, and with `WatchdogSec=` kills and restarts a service
that stops sending `WATCHDOG=1`. Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op, so
the agent runs the same from a shell, in tests and under systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(*assignments: str) -> bool:
    """Send `KEY=value` lines to the service manager; False when not under systemd or it failed.

    Never raises: a lost notification must not take the agent down (systemd's own timeouts cover
    a manager that does not hear from us).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r is neither a path nor abstract; ignored", address)
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """The service is up: bundle loaded (or degraded on purpose) and the broker connected."""
    return notify("READY=1", *([f"STATUS={_one_line(status_text)}"] if status_text else []))


def status(text: str) -> bool:
    """One line for `systemctl status edge-agent`: what the agent is doing now."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={_one_line(status_text)}"] if status_text else []))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start (or stop) timeout, from a step known to be slow."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval_s() -> float | None:
    """The WatchdogSec= the manager expects pings within, or None when none is expected of us."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process (we are a child of the service's main process)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Watchdog:
    """Pings systemd's watchdog only while the worker shows progress.

    A timer thread that pings on its own proves nothing: the loop that can hang is the worker
    (a stuck decode step, a wedged GPU). The worker calls `beat()` each time round its loop and
    at every token; the main loop calls `tick()` about once a second, which sends `WATCHDOG=1` at
    half the interval as long as the last beat is younger than `stall_s`. A worker stalled
    longer than that stops the pings, and systemd restarts the service one interval later.
    """

    def __init__(
        self,
        interval_s: float | None = None,
        *,
        stall_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[[], bool] = watchdog,
    ) -> None:
        self.interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self.stall_s = stall_s if stall_s is not None else self.interval_s
        self._clock = clock
        self._send = send
        self._lock = threading.Lock()
        self._last_beat = clock()
        self._last_ping: float | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    def beat(self) -> None:
        """From the worker: still making progress."""
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def stalled_for(self) -> float:
        with self._lock:
            return self._clock() - self._last_beat

    def tick(self) -> bool:
        """From the main loop; True when a ping was sent."""
        if self.interval_s is None or self.stall_s is None:
            return False
        now = self._clock()
        with self._lock:
            last_beat, last_ping = self._last_beat, self._last_ping
        if now - last_beat > self.stall_s:
            if not self._warned:  # once per stall: systemd will restart us shortly
                log.error(
                    "the worker made no progress for %.0f s; not pinging the watchdog",
                    now - last_beat,
                )
                self._warned = True
            return False  # the worker is stuck: let systemd see it
        self._warned = False
        if last_ping is not None and now - last_ping < self.interval_s / 2:
            return False
        if self._send():
            with self._lock:
                self._last_ping = now
            return True
        return False
