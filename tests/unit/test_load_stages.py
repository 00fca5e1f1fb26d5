"""Credits, signals and presence: domain stages and the actors' arithmetic, no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from cluster.credits import Buckets
from cluster.dedup import Window
from stages.load import DebitCredits, crossed_low_water
from stages.model import Envelope, Verdict
from stages.ports import Debit, Delivery
from stages.presence import FanoutPresence
from stages.signals import DedupSignal, ForwardSignal, ValidateSignal
from tests.fakes import FakeBank, FakeDedup, FakeHub, FakeNotices, FakeOutages


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


def msg(i: int, conn: str = "c1", cost: int = 1) -> Envelope:
    return Envelope(type="chat", id=str(i), sender="alice", connection=conn, meta={"cost": cost})


async def test_credits_reject_with_retry_after_and_warn_once_per_connection() -> None:
    # 6 → 5 → 3 (cost 2: crosses the low-water mark 5) → refused.
    bank = FakeBank([Debit(True, 5, 0), Debit(True, 3, 0), Debit(False, 3, 7.5)])
    notices = FakeNotices()
    out = await DebitCredits(bank, notices, low_water=5).process([msg(1), msg(2, cost=2), msg(3)])
    assert bank.calls == [[("alice", 1), ("alice", 2), ("alice", 1)]]
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.CONTINUE, Verdict.REJECT]
    assert out[2].code == "credits_exhausted" and out[2].retry_after == 7.5
    assert notices.sent == [("c1", "credits_low", {"remaining": 3}),
                            ("c1", "credits_exhausted", {"retryAfter": 7.5})]


async def test_credits_low_is_sent_when_the_bucket_crosses_the_mark_not_below_it() -> None:
    notices = FakeNotices()
    stage = DebitCredits(FakeBank(), notices, low_water=10)
    # Batch after batch, one message each: 11, 10 (at the mark), 9 (crossed), 8, 7.
    for remaining in (11, 10, 9, 8, 7):
        stage.bank = FakeBank([Debit(True, remaining, 0)])
        await stage.process([msg(remaining)])
    assert notices.sent == [("c1", "credits_low", {"remaining": 9})]
    # A refill brings it back above the mark; the next crossing warns again.
    stage.bank = FakeBank([Debit(True, 99, 0), Debit(True, 10, 0), Debit(True, 9, 0)])
    await stage.process([msg(1), msg(2), msg(3)])
    assert notices.sent[1:] == [("c1", "credits_low", {"remaining": 9})]
    assert crossed_low_water(3, 5, 5) and not crossed_low_water(3, 1, 5)
    assert not crossed_low_water(0, 0, 5)  # free types never cross anything


async def test_credits_exhausted_notice_and_bank_outage_lets_messages_through() -> None:
    notices = FakeNotices()
    out = await DebitCredits(FakeBank([Debit(True, 4, 0), Debit(False, 0, 2.0), Debit(False, 0, 2.0)]),
                             notices).process([msg(1), msg(2), msg(3)])
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.REJECT, Verdict.REJECT]
    assert notices.sent == [("c1", "credits_low", {"remaining": 4}),
                            ("c1", "credits_exhausted", {"retryAfter": 2.0})]
    outages = FakeOutages()
    stage = DebitCredits(FakeBank(fail=True), FakeNotices(), outages=outages)
    out = await stage.process([msg(1), msg(2)])
    assert all(o.verdict is Verdict.CONTINUE for o in out)
    assert outages.reports == [("credits", "debit_credits", 2)]


def signal(i: str, to: Any = "bob", payload: Any = None) -> Envelope:
    return Envelope(type="signal", id=i, sender="alice",
                    fields={"to": to, "payload": {"sdp": "x"} if payload is None else payload})


async def test_signal_route_validates_dedups_and_forwards_once() -> None:
    valid = await ValidateSignal(max_payload_bytes=50).process(
        [signal("1"), signal("2", to=""), signal("3", payload="text"),
         signal("4", payload={"x": "y" * 60})])
    assert [o.code for o in valid] == [None, "invalid", "invalid", "invalid"]
    dedup, hub = FakeDedup(), FakeHub()
    batch = [signal("1"), signal("1"), signal("2")]
    marked = [o.envelope for o in await DedupSignal(dedup).process(batch)]
    assert [e.meta["duplicate"] for e in marked] == [False, True, False]
    await ForwardSignal(hub).process(marked)
    assert hub.published == [
        Delivery(["bob"], {"type": "signal", "id": "1", "from": "alice", "payload": {"sdp": "x"}}),
        Delivery(["bob"], {"type": "signal", "id": "2", "from": "alice", "payload": {"sdp": "x"}}),
    ]


async def test_an_unreachable_dedup_window_lets_signals_through() -> None:
    class Gone:
        async def first_seen(self, keys: Sequence[str]) -> list[bool]:
            raise ConnectionError("dedup shard is restarting")

    outages = FakeOutages()
    stage = DedupSignal(Gone(), outages)
    out = await stage.process([signal("1"), signal("2")])
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.CONTINUE]
    assert [o.envelope.meta["duplicate"] for o in out] == [False, False]
    assert outages.reports == [("dedup", "dedup_signal", 2)]


async def test_a_dead_dedup_shard_answers_first_seen_for_its_keys_only() -> None:
    from cluster.dedup import DedupClient
    from cluster.sharding import shard_of

    class Method:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    class Shard:
        def __init__(self, window: Window | None) -> None:
            async def first_seen(keys: Sequence[str]) -> list[bool]:
                if window is None:
                    raise ConnectionError("actor died")
                return window.first_seen(keys, 0.0)

            self.first_seen = Method(first_seen)

    client = DedupClient.__new__(DedupClient)
    client.n = 2
    client.actors = [Shard(Window(60.0)), Shard(None)]
    keys = [f"k{i}" for i in range(8)]
    await client.first_seen(keys)
    again = await client.first_seen(keys)
    # Keys of the live shard are duplicates now; those of the dead one are unchecked
    # (None), which the stage lets through as new and reports as an outage.
    assert again == [None if shard_of(k, 2) == 1 else False for k in keys]
    assert {shard_of(k, 2) for k in keys} == {0, 1}
    outages = FakeOutages()
    envs = [Envelope(type="signal", id=k, sender="alice") for k in keys]
    client.first_seen = lambda _keys: asyncio.sleep(0, again)  # type: ignore[method-assign]
    marked = [o.envelope for o in await DedupSignal(client, outages).process(envs)]
    assert [e.meta["duplicate"] for e in marked] == [a is False for a in again]
    assert outages.reports == [("dedup", "dedup_signal", again.count(None))]


async def test_a_reaped_gateways_users_go_offline_at_the_next_pull() -> None:
    from cluster.hub import OFFLINE, ConnectionHub

    hub = ConnectionHub.__ray_metadata__.modified_class(0, gateway_ttl_s=0.2)
    await hub.attach("ghost", [("c1", "alice"), ("c2", "bob"), ("c3", "bob")])
    await hub.attach("live", [("c4", "carol")])
    assert await hub.pull("live", 0.0) is None  # a gateway's first pull: attach everything
    await asyncio.sleep(0.3)
    hub._reaped_at = 0.0  # reaping is rate-limited to once a second
    await hub.attach("live", [("c5", "bob")])  # bob came back on another replica
    got = await hub.pull("live", 0.5)
    assert got == [Delivery(["alice"], {"type": OFFLINE, "lastSeen": {"alice": hub.last_seen["alice"]}})]
    assert await hub.pull("ghost", 0.0) is None  # the dead replica must attach again
    assert [u for u, online, _ in await hub.presence(["alice", "bob"]) if online] == ["bob"]
    assert await hub.pull("live", 0.05) == []  # handed out once


async def test_a_full_hub_mailbox_sheds_the_oldest_frames_and_counts_them_by_type() -> None:
    from cluster.hub import RESYNC, ConnectionHub

    hub = ConnectionHub.__ray_metadata__.modified_class(0, mailbox_limit=2)
    assert await hub.pull("g", 0.0) is None  # a gateway's first pull: attach everything
    await hub.attach("g", [("c1", "bob")])
    await hub.publish([Delivery(["bob"], {"type": "signal", "id": "1"}),
                       Delivery(["bob"], {"type": "message", "seq": 1}),
                       Delivery(["bob"], {"type": "message", "seq": 2})])
    stats = await hub.stats()
    assert stats["shed"] == 1 and stats["shed_by_type"] == {"signal": 1}
    got = await hub.pull("g", 0.0)
    assert got is not None and got[0] == RESYNC and len(got) == 3


async def test_presence_goes_to_everyone_sharing_a_chat_but_the_user() -> None:
    class Contacts:
        async def contacts(self, user_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
            return {"alice": frozenset({"alice", "bob", "carol"})}

    hub = FakeHub()
    env = Envelope(type="presence", id="p", sender="alice",
                   fields={"online": True, "lastSeen": "2026-01-01T00:00:00Z"})
    lonely = Envelope(type="presence", id="q", sender="dave", fields={"online": False})
    out = await FanoutPresence(Contacts(), hub).process([env, lonely])
    assert all(o.verdict is Verdict.DONE for o in out)
    assert hub.published == [Delivery(["bob", "carol"], {
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


async def test_the_hub_leaves_out_the_replica_that_delivers_locally() -> None:
    from cluster.hub import ConnectionHub

    hub = ConnectionHub.__ray_metadata__.modified_class(0)
    await hub.attach("gw-1", [("c1", "bob")])
    await hub.attach("gw-2", [("c2", "bob")])
    for gw in ("gw-1", "gw-2"):
        assert await hub.pull(gw, 0.0) is None  # a gateway's first pull: attach everything
    await hub.publish([Delivery(["bob"], {"type": "message", "seq": 1}, local="gw-1")])
    assert await hub.pull("gw-1", 0.0) == []
    (got,) = await hub.pull("gw-2", 0.0)
    assert got.users == ["bob"] and got.frame["seq"] == 1
