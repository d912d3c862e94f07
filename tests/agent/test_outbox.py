"""The outbox's promises, with the broker's acknowledgements in the test's hands: final events
are never dropped and go out before refusals, a backlog of refusals is bounded and counted, a
job's waiting deltas are merged with contiguous `seq`, a retained status waiting is replaced."""

from __future__ import annotations

import json
from typing import Any

from agent.outbox import Outbox


class Broker:
    """Records what the outbox hands over; acknowledges only when the test says so."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str, dict[str, Any], bool]] = []
        self._next_mid = 0

    def send(self, topic: str, data: bytes, retain: bool, correlation: bytes | None) -> int:
        self._next_mid += 1
        self.sent.append((self._next_mid, topic, json.loads(data), retain))
        return self._next_mid

    def ack_all(self, outbox: Outbox) -> None:
        """Acknowledge everything handed over so far, and what that lets through, until idle."""
        acked = 0
        while acked < len(self.sent):
            outbox.acknowledged(self.sent[acked][0])
            acked += 1


def delta(seq: int, text: str) -> dict[str, Any]:
    return {"event": "delta", "seq": seq, "text": text}


def test_answers_go_out_before_a_backlog_of_refusals_which_is_bounded() -> None:
    broker = Broker()
    outbox = Outbox(broker.send, limit=2, refusals_kept=100)
    for n in range(1000):  # a flood of refusals while the broker acknowledges nothing
        outbox.refusal("p/d/results/_invalid", {"event": "error", "n": n}, None)
    assert len(broker.sent) == 2  # the window is full
    assert outbox.dropped == 1000 - 2 - 100  # the oldest waiting refusals went first
    acked: list[str] = []
    job = outbox.stream("p/d/results/victim", b"corr", delta)
    job.event({"event": "accepted", "id": "victim"})
    for text in ("The", " capital", " is"):
        job.delta(text)
    job.event({"event": "done", "id": "victim"}, on_ack=lambda: acked.append("done"))
    broker.ack_all(outbox)
    after_window = [payload for _, _, payload, _ in broker.sent[2:]]
    # The job's events come first, in order, its three waiting deltas merged into one.
    assert after_window[:3] == [
        {"event": "accepted", "id": "victim"},
        {"event": "delta", "seq": 0, "text": "The capital is"},
        {"event": "done", "id": "victim"},
    ]
    # Then the 100 newest refusals, nothing else; the done's acknowledgement was reported.
    assert [p["n"] for p in after_window[3:]] == list(range(900, 1000))
    assert acked == ["done"]
    assert outbox.waiting == 0 and outbox.wait_idle(1.0)


def test_deltas_merged_while_waiting_keep_seq_contiguous_and_add_up() -> None:
    broker = Broker()
    outbox = Outbox(broker.send, limit=1)
    job = outbox.stream("p/d/results/j", None, delta)
    pieces = [f"t{n} " for n in range(50)]
    for n, text in enumerate(pieces):
        job.delta(text)
        if n % 7 == 0:  # the broker acknowledges now and then: some deltas go out alone
            broker.ack_all(outbox)
    job.event({"event": "done", "text": "".join(pieces)})
    broker.ack_all(outbox)
    events = [payload for _, _, payload, _ in broker.sent]
    deltas = [e for e in events if e["event"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert 1 < len(deltas) < len(pieces)  # merged, but not all into one
    assert "".join(d["text"] for d in deltas) == events[-1]["text"]
    assert events[-1]["event"] == "done"


def test_a_waiting_retained_status_is_replaced_and_control_goes_first() -> None:
    broker = Broker()
    outbox = Outbox(broker.send, limit=1)
    outbox.refusal("p/d/results/x", {"event": "error"}, None)  # takes the window
    outbox.refusal("p/d/results/y", {"event": "error"}, None)
    outbox.control("p/d/status", {"state": "updating"}, retain=True)
    outbox.control("p/d/status", {"state": "online"}, retain=True)
    broker.ack_all(outbox)
    topics = [(topic, payload) for _, topic, payload, _ in broker.sent]
    assert topics == [
        ("p/d/results/x", {"event": "error"}),
        ("p/d/status", {"state": "online"}),  # the newer retained status only, before y
        ("p/d/results/y", {"event": "error"}),
    ]
