"""The MQTT topic names of DESIGN.md's contract, in one place for the agent and the fleet tool."""

from __future__ import annotations

from dataclasses import dataclass

from paho.mqtt.client import topic_matches_sub

INVALID_JOB_ID = "_invalid"  # results topic for requests without a usable id
# Under the prefix: the command and report topics of every device (`P/fleet/jobs` is `P/+/jobs`).
RESERVED_LEVELS = ("+/jobs", "+/jobs/cancel", "+/ota", "+/status", "+/telemetry", "+/ota/status")


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str
    # filters a job's Response Topic must match; {prefix} and {device} are placeholders
    reply_filters: tuple[str, ...] = ("#",)

    @property
    def allowed_replies(self) -> list[str]:
        """`reply_filters` with the placeholders filled in."""
        return [f.format(prefix=self.prefix, device=self.device) for f in self.reply_filters]

    def reply_allowed(self, topic: str) -> bool:
        """Whether a job may name `topic` as its MQTT v5 Response Topic."""
        return (
            is_valid_publish_topic(topic)
            and not self.reply_reserved(topic)
            and any(topic_matches_sub(allowed, topic) for allowed in self.allowed_replies)
        )

    @property
    def reserved_replies(self) -> list[str]:
        """Topics no Response Topic may match, whatever `reply_filters` says: what devices are
        commanded on (a job's events published there would be read as jobs, cancels, updates)
        and what they report on (a device must not spoof another's status)."""
        return [f"{self.prefix}/{level}" for level in RESERVED_LEVELS]

    def reply_reserved(self, topic: str) -> bool:
        return topic.startswith("$") or any(
            topic_matches_sub(reserved, topic) for reserved in self.reserved_replies
        )

    @property
    def jobs(self) -> str:
        return f"{self.prefix}/{self.device}/jobs"

    @property
    def fleet_jobs(self) -> str:
        """Where operators publish jobs for any one device."""
        return f"{self.prefix}/fleet/jobs"

    @property
    def fleet_jobs_shared(self) -> str:
        """The shared subscription: the broker hands each fleet job to one device of the group."""
        return f"$share/{self.prefix}/{self.fleet_jobs}"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}/{self.device}/jobs/cancel"

    def results(self, job_id: str) -> str:
        return f"{self.prefix}/{self.device}/results/{job_id}"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}/{self.device}/telemetry"

    @property
    def ota(self) -> str:
        return f"{self.prefix}/{self.device}/ota"

    @property
    def ota_status(self) -> str:
        return f"{self.prefix}/{self.device}/ota/status"


def is_valid_publish_topic(topic: str) -> bool:
    """A topic a client may publish to: non-empty, no wildcards, no NUL, not `$`-reserved."""
    return (
        0 < len(topic.encode("utf-8")) <= 65535
        and not any(c in topic for c in "+#\0")
        and not topic.startswith("$")
    )


def is_valid_topic_filter(pattern: str) -> bool:
    """An MQTT subscription filter: `+` only as a whole level, `#` only as the whole last level;
    `{prefix}`/`{device}` placeholders allowed."""
    levels = pattern.split("/")
    return (
        bool(pattern)
        and "\0" not in pattern
        and all(level in ("+", "#") or not any(c in level for c in "+#") for level in levels)
        and "#" not in levels[:-1]
    )
