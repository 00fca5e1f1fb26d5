"""The chat cache against a real redis-server and PostgreSQL: after a random mix of
messages, edits, deletes, reactions and read receipts the cache answers exactly what the
database answers (or nothing); Redis down fails fast and the cache comes back clean."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import pytest

from adapters.kafka_events import stored_row
from adapters.redis_cache import CacheUnavailable, ChatCache
from stages.ports import ChatDraft, Receipt, StoredMessage
from tests.integration.pg import PostgresStore

pytestmark = pytest.mark.timeout(120)
MEMBERS = ["alice", "bob", "carol"]
EMOJI = ["👍", "🎉", "❤"]


@pytest.fixture
async def cache(redis_server: Any) -> Any:
    c = ChatCache(redis_server.url, max_messages=40, ttl_s=600)
    yield c
    await c.close()


async def persist(store: PostgresStore, cache: ChatCache | None, drafts: list[ChatDraft]
                  ) -> list[StoredMessage]:
    stored = await store.persist(drafts)
    rows = [stored_row(d, s) for d, s in zip(drafts, stored, strict=True)
            if not s.duplicate and s.error is None]
    if cache is not None:
        await cache.append(rows)
    return rows


def text(chat: str, sender: str, body: str) -> ChatDraft:
    return ChatDraft(chat_id=chat, sender_id=sender, client_id=uuid.uuid4().hex, body=body)


def command(op: str, sender: str, target: str, body: str | None = None,
            emoji: str | None = None) -> ChatDraft:
    return ChatDraft(chat_id="", sender_id=sender, client_id=uuid.uuid4().hex, body=body, kind=op,
                     target=target, emoji=emoji)


@pytest.mark.parametrize("seed", [20261130, 7, 99])
async def test_cache_equals_postgres_after_a_random_mix_of_commands(
        db_pool: Any, cache: ChatCache, seed: int) -> None:
    rng = random.Random(seed)
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob", "carol"], None)
    for user in MEMBERS:  # warm counters from the database, as a first chat-list read would
        await cache.fill_unread(user, [c for c in await store.chats_of(user) if c["chatId"] == chat])
    messages: list[StoredMessage] = []  # text messages, to aim commands at
    deleted: set[str] = set()
    counts = {"message": 0, "edit": 0, "delete": 0, "react": 0, "read": 0, "repeat": 0}
    held: list[StoredMessage] = []  # rows appended late and out of order
    unread_answers = 0  # counters the cache could answer (checked equal each time)

    for step in range(300):
        op = rng.choices(["message", "edit", "delete", "react", "read", "repeat"],
                         [40, 15, 8, 25, 10, 2])[0]
        live = [m for m in messages if m.message_id not in deleted]
        if op == "message" or not messages:
            sender = rng.choice(MEMBERS)
            drafts = [text(chat, sender, f"m{step}.{k}") for k in range(rng.choice([1, 1, 2, 3]))]
            rows = await persist(store, cache, drafts)
            messages += rows
            op = "message"
        elif op == "edit" and live:
            target = rng.choice(live)
            await persist(store, cache, [command("edit", target.sender_id, target.message_id,
                                                 body=f"edited {step}")])
        elif op == "delete":
            target = rng.choice(messages)  # deleting twice is allowed
            await persist(store, cache, [command("delete", target.sender_id, target.message_id)])
            deleted.add(target.message_id)
        elif op == "react" and live:
            target = rng.choice(live)
            await persist(store, cache, [command("react", rng.choice(MEMBERS), target.message_id,
                                                 emoji=rng.choice(EMOJI))])
        elif op == "read":
            user = rng.choice(MEMBERS)
            upto = rng.choice(messages)
            await store.apply_receipts([Receipt(user, upto.message_id, "read")])
            (pointer,) = await store.pointers(user, chat)
            await cache.mark_read(chat, user, pointer.read_seq)
        elif op == "repeat":  # the same rows again, and late: must change nothing
            stale = (await store.messages_after(chat, max(0, messages[-1].seq - 5), 3))
            held.extend(stale)
            await cache.append(held)
        else:
            continue
        counts[op] += 1

        if step % 25 == 24:
            unread_answers += await compare(store, cache, chat, rng)
    unread_answers += await compare(store, cache, chat, rng)
    assert min(counts.values()) > 0, counts

    # The whole window is warm at the end. A counter whose reader jumped past rows no
    # longer cached went cold; warmed again from the database it is exact, and stays so.
    last = (await store.pointers("alice", chat))[0].last_seq
    window = await cache.recent(chat, last - 40, 40)
    assert window == await store.messages_after(chat, last - 40, 40)
    assert unread_answers > 0
    await persist(store, cache, [text(chat, "carol", "last one")])
    for user in MEMBERS:
        expected = {c["chatId"]: c["unreadCount"] for c in await store.chats_of(user)}
        if await cache.unread(user, [chat]) is None:
            await cache.fill_unread(user, await store.chats_of(user))
        assert await cache.unread(user, [chat]) == expected
    await persist(store, cache, [text(chat, "carol", "after the warm-up")])
    for user in MEMBERS:
        expected = {c["chatId"]: c["unreadCount"] for c in await store.chats_of(user)}
        assert await cache.unread(user, [chat]) == expected


async def compare(store: PostgresStore, cache: ChatCache, chat: str, rng: random.Random) -> int:
    """Cache and database agree wherever the cache answers; returns how many unread
    counters it answered."""
    last = (await store.pointers("alice", chat))[0].last_seq
    answered = 0
    for after in {0, max(0, last - 40), max(0, last - 10), rng.randint(0, last), last}:
        limit = rng.choice([5, 20, 50])
        cached = await cache.recent(chat, after, limit)
        if cached is not None:
            answered += 1
            assert cached == await store.messages_after(chat, after, limit), (after, limit)
    assert answered >= 2  # the recent window is warm
    warm = 0
    for user in MEMBERS:
        got = await cache.unread(user, [chat])
        if got is not None:
            warm += 1
            assert got == {c["chatId"]: c["unreadCount"] for c in await store.chats_of(user)
                           if c["chatId"] == chat}, user
    return warm


async def test_reads_are_cold_until_filled_and_a_fill_never_overwrites_a_warm_window(
        db_pool: Any, cache: ChatCache) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    first = await persist(store, None, [text(chat, "alice", f"b{i}") for i in range(5)])
    assert await cache.recent(chat, 0, 50) is None
    assert await cache.unread("bob", [chat]) is None
    snapshot = await store.messages_after(chat, 0, 50)
    await cache.fill(chat, snapshot)
    assert await cache.recent(chat, 0, 50) == snapshot
    await persist(store, cache, [command("edit", "alice", first[0].message_id, body="new")])
    await cache.fill(chat, snapshot)  # an older read arriving late: ignored
    assert await cache.recent(chat, 0, 50) == await store.messages_after(chat, 0, 50)
    assert (await cache.recent(chat, 0, 1))[0].body == "new"
    assert await cache.recent(chat, 6, 10) == []


async def test_redis_down_fails_fast_and_the_cache_comes_back_clean(
        db_pool: Any, cache: ChatCache, redis_server: Any) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    await cache.fill_unread("bob", [c for c in await store.chats_of("bob") if c["chatId"] == chat])
    rows = await persist(store, cache, [text(chat, "alice", "before")])
    await cache.ping()
    assert await cache.unread("bob", [chat]) == {chat: 1}

    # A write that times out (Redis paused) may still land later: the chat is dropped
    # before the cache serves anything again, so no stale row survives.
    await cache.redis.execute_command("CLIENT", "PAUSE", "700", "WRITE")
    lost = await store.persist([command("edit", "alice", rows[0].message_id, body="changed")])
    t0 = time.monotonic()
    with pytest.raises(CacheUnavailable):
        await cache.append([stored_row(command("edit", "alice", rows[0].message_id, body="changed"),
                                       lost[0])])
    assert time.monotonic() - t0 < 1.0
    await asyncio.sleep(1.0)  # the pause ends; the timed-out script runs now
    assert await cache.recent(chat, 0, 10) is None  # healed: cold, not stale
    assert await cache.unread("bob", [chat]) is None

    # Redis stopped: every method fails fast with the typed error.
    redis_server.stop()
    try:
        calls = [cache.ping(), cache.recent(chat, 0, 10), cache.unread("bob", [chat]),
                 cache.append(rows), cache.mark_read(chat, "bob", 1),
                 cache.fill(chat, rows)]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(CacheUnavailable):
                await call
            assert time.monotonic() - t0 < 1.0
    finally:
        redis_server.start()
    for _ in range(20):  # back: bounded wait for the first answer
        try:
            await cache.ping()
            break
        except CacheUnavailable:
            await asyncio.sleep(0.1)
    assert await cache.recent(chat, 0, 10) is None  # cold: the caller reads PostgreSQL
    await cache.fill(chat, await store.messages_after(chat, 0, 50))
    assert await cache.recent(chat, 0, 10) == await store.messages_after(chat, 0, 10)
