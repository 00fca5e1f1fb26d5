"""Credits, signals and presence: domain stages and the actors' arithmetic, no Ray."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from cluster.credits import Buckets
from cluster.dedup import Window
from stages.load import DebitCredits
from stages.model import Envelope, Verdict
from stages.ports import Debit
from stages.presence import FanoutPresence
from stages.signals import DedupSignal, ForwardSignal, ValidateSignal


def test_bucket_refills_every_interval_and_says_when_to_retry() -> None:
    b = Buckets(capacity=3, refill=2, interval_s=10.0)
    assert [b.debit("u", 1, 0.0).granted for _ in range(3)] == [True, True, True]
    refused = b.debit("u", 1, 4.0)
    assert not refused.granted and refused.remaining == 0 and refused.retry_after == pytest.approx(6.0)
    assert b.debit("u", 1, 10.0) == Debit(True, 1, 0.0)  # one refill of 2 arrived
    assert b.debit("u", 2, 11.0).retry_after == pytest.approx(9.0)
    assert b.debit("u", 3, 45.0).granted  # capped at capacity after many intervals
    assert b.debit("other", 1, 45.0).remaining == 2  # buckets are per user
    assert b.debit("u", 4, 46.0).retry_after == float("inf")  # more than capacity: never
    b.forget_idle(1000.0)
    assert len(b) == 0


def test_dedup_window_remembers_keys_until_they_expire() -> None:
    w = Window(ttl_s=5.0)
    assert w.first_seen(["a", "b", "a"], 0.0) == [True, True, False]
    assert w.first_seen(["a"], 4.9) == [False]
    assert w.first_seen(["a", "c"], 5.1) == [True, True]


class Bank:
    def __init__(self, answers: list[Debit] | None = None, fail: bool = False) -> None:
        self.answers = answers or []
        self.fail = fail
        self.calls: list[list[tuple[str, int]]] = []

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        self.calls.append(list(requests))
        if self.fail:
            raise ConnectionError("bank is gone")
        return self.answers


class Notices:
    def __init__(self) -> None:
        self.sent: list[tuple[str | None, str, dict[str, Any]]] = []

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None:
        self.sent.append((connection, event, dict(data)))


def msg(i: int, conn: str = "c1", cost: int = 1) -> Envelope:
    return Envelope(type="chat", id=str(i), sender="alice", connection=conn, meta={"cost": cost})


async def test_credits_reject_with_retry_after_and_warn_once_per_connection() -> None:
    bank = Bank([Debit(True, 3, 0), Debit(True, 2, 0), Debit(False, 0, 7.5)])
    notices = Notices()
    out = await DebitCredits(bank, notices, low_water=5).process([msg(1), msg(2, cost=2), msg(3)])
    assert bank.calls == [[("alice", 1), ("alice", 2), ("alice", 1)]]
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.CONTINUE, Verdict.REJECT]
    assert out[2].code == "credits_exhausted" and out[2].retry_after == 7.5
    assert notices.sent == [("c1", "credits_low", {"remaining": 3}),
                            ("c1", "credits_exhausted", {"retryAfter": 7.5})]


async def test_credits_exhausted_notice_and_bank_outage_lets_messages_through() -> None:
    notices = Notices()
    out = await DebitCredits(Bank([Debit(True, 1, 0), Debit(False, 0, 2.0), Debit(False, 0, 2.0)]),
                             notices).process([msg(1), msg(2), msg(3)])
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.REJECT, Verdict.REJECT]
    assert notices.sent == [("c1", "credits_low", {"remaining": 1}),
                            ("c1", "credits_exhausted", {"retryAfter": 2.0})]
    stage = DebitCredits(Bank(fail=True), Notices())
    out = await stage.process([msg(1), msg(2)])
    assert all(o.verdict is Verdict.CONTINUE for o in out) and stage.unavailable == 1
    assert out[0].envelope.meta["credits_unchecked"]


class Hub:
    def __init__(self) -> None:
        self.published: list[tuple[Sequence[str], dict[str, Any]]] = []

    async def publish(self, deliveries: Sequence[tuple[Sequence[str], dict[str, Any]]]) -> None:
        self.published.extend(deliveries)


class Dedup:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def first_seen(self, keys: Sequence[str]) -> list[bool]:
        out = []
        for k in keys:
            out.append(k not in self.seen)
            self.seen.add(k)
        return out


def signal(i: str, to: Any = "bob", payload: Any = None) -> Envelope:
    return Envelope(type="signal", id=i, sender="alice",
                    fields={"to": to, "payload": {"sdp": "x"} if payload is None else payload})


async def test_signal_route_validates_dedups_and_forwards_once() -> None:
    valid = await ValidateSignal(max_payload_bytes=50).process(
        [signal("1"), signal("2", to=""), signal("3", payload="text"),
         signal("4", payload={"x": "y" * 60})])
    assert [o.code for o in valid] == [None, "invalid", "invalid", "invalid"]
    dedup, hub = Dedup(), Hub()
    batch = [signal("1"), signal("1"), signal("2")]
    marked = [o.envelope for o in await DedupSignal(dedup).process(batch)]
    assert [e.meta["duplicate"] for e in marked] == [False, True, False]
    await ForwardSignal(hub).process(marked)
    assert hub.published == [
        (["bob"], {"type": "signal", "id": "1", "from": "alice", "payload": {"sdp": "x"}}),
        (["bob"], {"type": "signal", "id": "2", "from": "alice", "payload": {"sdp": "x"}}),
    ]


async def test_presence_goes_to_everyone_sharing_a_chat_but_the_user() -> None:
    class Contacts:
        async def contacts(self, user_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
            return {"alice": frozenset({"alice", "bob", "carol"})}

    hub = Hub()
    env = Envelope(type="presence", id="p", sender="alice",
                   fields={"online": True, "lastSeen": "2026-01-01T00:00:00Z"})
    lonely = Envelope(type="presence", id="q", sender="dave", fields={"online": False})
    out = await FanoutPresence(Contacts(), hub).process([env, lonely])
    assert all(o.verdict is Verdict.DONE for o in out)
    assert hub.published == [(["bob", "carol"], {
        "type": "system", "event": "presence",
        "data": {"userId": "alice", "online": True, "lastSeen": "2026-01-01T00:00:00Z"}})]


async def test_track_emits_accepted_and_receipt_events() -> None:
    from stages.analytics import Track
    from stages.ports import AnalyticsEvent

    class Sink:
        def __init__(self) -> None:
            self.events: list[AnalyticsEvent] = []

        def emit(self, events: Sequence[AnalyticsEvent]) -> None:
            self.events.extend(events)

    sink = Sink()
    accepted = Envelope(type="chat", id="1", sender="alice", received_at=0.0,
                        meta={"messageId": "m1"})
    duplicate = Envelope(type="chat", id="2", sender="alice", meta={"messageId": "m0",
                                                                     "duplicate": True})
    out = await Track(sink, "accepted").process([accepted, duplicate])
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.CONTINUE]
    assert [(e.kind, e.message_id) for e in sink.events] == [("accepted", "m1")]
    receipt = Envelope(type="receipt", id="", sender="bob",
                       fields={"messageIds": ["m1", "m2"], "status": "read"},
                       meta={"latencies": {"m1": 0.25}})
    await Track(sink, "receipt").process([receipt])
    assert [(e.kind, e.message_id, e.user_id, e.latency_s) for e in sink.events[1:]] == [
        ("read", "m1", "bob", 0.25), ("read", "m2", "bob", None)]
