"""The event bus against a real Kafka-protocol broker and PostgreSQL: events are appended
in the committing transaction, published by the relay, and marked published only after
the broker's ack; a broker restart mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from adapters import event_outbox
from adapters.event_outbox import EventOutbox
from adapters.event_relay import EventRelay, RelayState
from adapters.kafka_events import EventPublisher, notification_event
from adapters.postgres.notifications import NotificationsStore
from stages.notifications import Attempt, FinalState, NotificationDraft, RoundResult, SendStatus
from stages.ports import ChatDraft, Receipt
from tests.integration.kafka_helpers import make_topics, read_topic, topic_name, values
from tests.integration.pg import PostgresStore

pytestmark = pytest.mark.timeout(180)
ROUNDS = 50


def draft(chat: str, sender: str = "alice", body: str = "hi", **kw: Any) -> ChatDraft:
    return ChatDraft(chat_id=chat, sender_id=sender, client_id=uuid.uuid4().hex, body=body, **kw)


@pytest.fixture
async def topic(kafka_broker: Any) -> str:
    name = topic_name("conveyor.events")
    await make_topics(kafka_broker.bootstrap, name)
    return name


@pytest.fixture
async def publisher(kafka_broker: Any, topic: str) -> Any:
    pub = EventPublisher(kafka_broker.bootstrap, topic, timeout_s=3.0)
    yield pub
    await pub.stop()


async def drained(outbox: EventOutbox, timeout_s: float) -> None:
    """Waits (bounded) until the relay emptied the outbox."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.2) + 1):
        if not (await outbox.stats()).pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert (await outbox.stats()).pending == 0


class GatedPublisher:
    """Holds every publish until ``gate`` opens: lets a test look at the outbox while the
    broker has not acknowledged yet."""

    def __init__(self, inner: EventPublisher) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def publish(self, records: Sequence[tuple[str, bytes]]) -> None:
        self.entered.set()
        await asyncio.wait_for(self.gate.wait(), 20)
        await self.inner.publish(records)


async def test_chat_events_reach_the_topic_only_after_commit_and_leave_the_outbox_after_the_ack(
        db_pool: Any, kafka_broker: Any, topic: str, publisher: EventPublisher) -> None:
    store = PostgresStore(db_pool, events_enabled=True)
    outbox = EventOutbox(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)

    # An uncommitted event is invisible to the relay; a rolled-back batch leaves none.
    relay = EventRelay(outbox, publisher, batch=100, lease_s=30)
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await event_outbox.append(conn, [notification_event("n-1", "accepted")])
        assert await relay.run_once() == 0
        assert (await outbox.stats()).pending == 0
        await tx.rollback()
    with pytest.raises(LookupError):
        await store.persist([draft(chat), draft("no-such-chat")])
    assert (await outbox.stats()).pending == 0

    stored = await store.persist([draft(chat, body="one"), draft(chat, body="two")])
    edit = await store.persist([ChatDraft(chat_id="", sender_id="alice", client_id="e1", body="one!",
                                          kind="edit", target=stored[0].message_id)])
    react = await store.persist([ChatDraft(chat_id="", sender_id="bob", client_id="r1", body=None,
                                           kind="react", target=stored[1].message_id, emoji="👍")])
    assert react[0].error is None
    assert len(await store.apply_receipts([Receipt("bob", stored[1].message_id, "read")])) == 1
    dup = await store.persist([ChatDraft(chat_id=chat, sender_id="alice", client_id="e1", body="x")])
    assert dup[0].duplicate
    assert (await outbox.stats()).pending == 6  # 2 messages, edit, react, delivered + read

    # Leased and in flight: still pending until the broker acknowledged.
    gated = GatedPublisher(publisher)
    relay = EventRelay(outbox, gated, batch=100, lease_s=30)
    run = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(gated.entered.wait(), 10)
    assert (await outbox.stats()).pending == 6
    assert await outbox.claim(100, 30) == []  # leased: nobody else takes them meanwhile
    gated.gate.set()
    assert await run == 6
    assert (await outbox.stats()).pending == 0

    got = values(await read_topic(kafka_broker.bootstrap, topic, 6))
    assert [v["type"] for v in got] == ["message", "message", "command", "command", "receipt", "receipt"]
    m1, m2, ed, rx, delivered, read = got
    assert (m2["seq"], m2["body"]) == (2, "two")
    assert (m1["eventId"], m1["messageId"], m1["seq"], m1["body"], m1["senderId"], m1["kind"]) == (
        stored[0].message_id, stored[0].message_id, 1, "one", "alice", "text")
    assert m1["chatId"] == chat and m1["createdAt"] == stored[0].created_at and m1["at"]
    assert (ed["op"], ed["messageId"], ed["body"], ed["by"], ed["seq"], ed["eventId"]) == (
        "edit", stored[0].message_id, "one!", "alice", 3, edit[0].message_id)
    assert (rx["op"], rx["emoji"], rx["messageId"], rx["by"]) == ("react", "👍", stored[1].message_id, "bob")
    assert (delivered["status"], delivered["upToSeq"], delivered["userId"], delivered["chatId"]) == (
        "delivered", 2, "bob", chat)
    assert (read["status"], read["upToSeq"]) == ("read", 2)
    assert len({v["eventId"] for v in got}) == 6


async def accepted_and_claimed(store: NotificationsStore) -> tuple[str, Any]:
    """One immediate e-mail notification, accepted and claimed for a round."""
    nid = str(uuid.uuid4())
    await store.accept([NotificationDraft(
        id=nid, subject_id="billing", subject_name=None, message="paid", is_immediate=True,
        contacts=[{"type": "email", "value": "a@example.com"}], strategy="send_to_first_available",
        created_at=time.time())])
    (job,) = await store.claim_ids([nid], 30)
    return nid, job


async def test_notification_status_changes_are_appended_in_the_transactions_that_make_them(
        db_pool: Any) -> None:
    store = NotificationsStore(db_pool, events_enabled=True)
    outbox = EventOutbox(db_pool)
    nid, job = await accepted_and_claimed(store)
    await store.finish_round([RoundResult(job, [Attempt(nid, 0, "email", 1, SendStatus.TRANSIENT,
                                                        "451 busy", 0.1)], None, 1.0)])
    await store.finish_round([RoundResult(job, [Attempt(nid, 0, "email", 2, SendStatus.DELIVERED,
                                                        None, 0.1)], FinalState.DELIVERED)])
    assert await NotificationsStore(db_pool).claim_ids([nid], 30) == []  # final: nothing more
    got = [orjson.loads(p.value) for p in await outbox.claim(100, 30)]
    assert [(v["status"], v.get("channel"), v.get("attempt"), v.get("error")) for v in got] == [
        ("accepted", None, None, None), ("processing", None, None, None),
        ("processing", "email", 1, "451 busy"), ("delivered", "email", 2, None)]
    assert all(v["type"] == "notification" and v["notificationId"] == nid for v in got)
    assert got[2]["attemptStatus"] == "transient" and len({v["eventId"] for v in got}) == 4


async def appended(db_pool: Any, key: str) -> list[dict[str, Any]]:
    """The events appended under ``key``, in order (read directly: a claim would lease)."""
    rows = await db_pool.fetch("SELECT value FROM event_outbox WHERE key = $1 ORDER BY id", key)
    return [orjson.loads(r["value"]) for r in rows]


async def test_a_delivery_recorded_as_it_happens_has_its_event_once(db_pool: Any) -> None:
    """``record_delivered`` appends the attempt's event in its own commit (a dispatcher
    killed before the round ends loses no event); a repeat appends none, and the round's
    end adds only the final state, not the attempt again."""
    store = NotificationsStore(db_pool, events_enabled=True)
    nid, job = await accepted_and_claimed(store)
    sent = Attempt(nid, 0, "email", 1, SendStatus.DELIVERED, "250 queued", 0.1)
    await store.record_delivered(sent)
    await store.record_delivered(sent)  # a repeat: no second event
    assert [v["status"] for v in await appended(db_pool, nid)] == [
        "accepted", "processing", "processing"]
    job.progress[0].status = job.progress[0].status.DELIVERED
    await store.finish_round([RoundResult(job, [sent], FinalState.DELIVERED)])
    got = await appended(db_pool, nid)
    assert [(v["status"], v.get("channel"), v.get("attempt"), v.get("attemptStatus"))
            for v in got] == [("accepted", None, None, None), ("processing", None, None, None),
                              ("processing", "email", 1, "delivered"),
                              ("delivered", None, None, None)]


async def test_events_are_not_marked_published_while_the_broker_is_down(
        db_pool: Any, kafka_broker: Any, topic: str) -> None:
    store = PostgresStore(db_pool, events_enabled=True)
    outbox = EventOutbox(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    await store.persist([draft(chat, body=f"m{i}") for i in range(3)])
    publisher = EventPublisher(kafka_broker.bootstrap, topic, timeout_s=1.5)
    relay = EventRelay(outbox, publisher, batch=100, lease_s=30, backoff_base_s=0.2, backoff_max_s=0.5)
    try:
        await asyncio.to_thread(kafka_broker.stop)
        t0 = time.monotonic()
        assert await relay.run_once() == 0
        assert time.monotonic() - t0 < 5  # fails fast, never hangs
        status = await relay.status()
        assert status.state is RelayState.DEGRADED and status.pending == 3
        assert "broker" in status.detail()["error"]
        assert (await outbox.stats()).pending == 3
    finally:
        await asyncio.to_thread(kafka_broker.start)
    for _ in range(100):  # bounded: 100 attempts, backoff ≤ 0.5 s
        if not (await outbox.stats()).pending:
            break
        if not await relay.run_once():
            await asyncio.sleep(0.3)
    assert (await outbox.stats()).pending == 0
    assert relay.state is RelayState.OK
    got = values(await read_topic(kafka_broker.bootstrap, topic, 3))
    assert sorted({v["body"] for v in got}) == ["m0", "m1", "m2"]
    await publisher.stop()


async def test_broker_restart_mid_stream_loses_nothing_and_repeats_carry_the_same_event_id(
        db_pool: Any, kafka_broker: Any, topic: str) -> None:
    store = PostgresStore(db_pool, events_enabled=True)
    outbox = EventOutbox(db_pool)
    chats = [await store.create_chat("alice", ["bob"], None) for _ in range(4)]
    publisher = EventPublisher(kafka_broker.bootstrap, topic, timeout_s=1.5)
    relay = EventRelay(outbox, publisher, batch=50, lease_s=20, idle_s=0.05,
                       backoff_base_s=0.2, backoff_max_s=1.0)
    states: list[str] = []

    async def watch() -> None:
        while True:
            s = relay.state.value
            if not states or states[-1] != s:
                states.append(s)
            await asyncio.sleep(0.02)

    runner = asyncio.create_task(relay.run())
    watcher = asyncio.create_task(watch())
    expected: dict[str, int] = {}  # eventId -> seq
    try:
        restart = None
        for round_ in range(ROUNDS):
            stored = await store.persist([draft(c, body=f"r{round_}") for c in chats])
            expected.update({s.message_id: s.seq for s in stored})
            if round_ == 10:  # down for 2 s while messages keep coming
                restart = asyncio.create_task(asyncio.to_thread(kafka_broker.restart, 2.0))
            await asyncio.sleep(0.1)
        assert restart is not None
        await asyncio.wait_for(restart, 30)
        await drained(outbox, 60)
    finally:
        relay.stop()
        await asyncio.wait_for(runner, 10)
        watcher.cancel()
        await publisher.stop()
    assert "degraded" in states and states[-1] == "ok", states

    records = await read_topic(kafka_broker.bootstrap, topic, len(expected), timeout_s=30)
    got = values(records)
    assert {v["eventId"] for v in got} == set(expected)  # nothing lost
    first_bytes: dict[str, bytes] = {}
    for r, v in zip(records, got, strict=True):  # a repeat is the very same record
        assert first_bytes.setdefault(v["eventId"], r.value) == r.value
        assert r.key.decode() == v["chatId"]
    for chat in chats:  # first occurrences in seq order per chat
        seqs: list[int] = []
        seen: set[str] = set()
        for v in got:
            if v["chatId"] == chat and v["eventId"] not in seen:
                seen.add(v["eventId"])
                seqs.append(v["seq"])
        assert seqs == list(range(1, ROUNDS + 1))

