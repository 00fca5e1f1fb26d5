"""The PostgreSQL adapter against a real PostgreSQL, checked against the MessageStore text."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from adapters.postgres import CachedDirectory, PostgresStore, migrate
from stages.ports import ChatDraft, Receipt


def draft(chat: str, client: str, sender: str = "alice", body: str = "hi") -> ChatDraft:
    return ChatDraft(chat_id=chat, sender_id=sender, client_id=client, body=body)


async def test_migrations_are_idempotent(db_pool: asyncpg.Pool) -> None:
    assert await migrate(db_pool) == []
    versions = await db_pool.fetch("SELECT version FROM schema_migrations")
    assert "001_messenger" in {r["version"] for r in versions}


async def test_persist_numbers_per_chat_and_writes_one_outbox_entry_per_chat(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    c1 = await store.create_chat("alice", ["bob"], "one")
    c2 = await store.create_chat("alice", ["carol"], None)
    stored = await store.persist([draft(c1, "a"), draft(c2, "b"), draft(c1, "c")])
    assert [(s.chat_id, s.seq, s.duplicate) for s in stored] == [(c1, 1, False), (c2, 1, False),
                                                                (c1, 2, False)]
    assert stored[0].outbox_id == stored[2].outbox_id != stored[1].outbox_id
    rows = await db_pool.fetch("SELECT chat_id, from_seq, to_seq FROM outbox ORDER BY chat_id")
    assert sorted((r["chat_id"], r["from_seq"], r["to_seq"]) for r in rows) == sorted(
        [(c1, 1, 2), (c2, 1, 1)])
    assert [m.body for m in await store.messages_after(c1, 0, 10)] == ["hi", "hi"]


async def test_duplicates_in_and_across_batches_keep_the_original(db_pool: asyncpg.Pool) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    first = await store.persist([draft(chat, "x"), draft(chat, "x")])
    assert [s.duplicate for s in first] == [False, True]
    assert first[0].message_id == first[1].message_id and first[0].seq == first[1].seq == 1
    again = await store.persist([draft(chat, "x"), draft(chat, "y")])
    assert again[0].duplicate and again[0].message_id == first[0].message_id
    assert not again[1].duplicate and again[1].seq == 2
    assert await db_pool.fetchval("SELECT count(*) FROM messages") == 2


async def test_concurrent_batches_give_gap_free_seqs_and_no_duplicates(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    other = await store.create_chat("bob", ["alice"], None)

    async def writer(w: int) -> list[Any]:
        out = []
        for b in range(10):
            # Every writer also resends ids another writer uses: the unique key decides.
            batch = [draft(chat, f"w{w}-{b}-{i}") for i in range(5)]
            batch.append(draft(chat, f"shared-{b}"))
            batch.append(draft(other, f"o{w}-{b}", sender="bob"))
            out.extend(await store.persist(batch))
        return out

    results = [s for part in await asyncio.gather(*(writer(w) for w in range(6))) for s in part]
    seqs = await db_pool.fetch("SELECT seq FROM messages WHERE chat_id=$1 ORDER BY seq", chat)
    assert [r["seq"] for r in seqs] == list(range(1, 6 * 10 * 5 + 10 + 1))
    shared = {s.message_id for s in results if s.chat_id == chat and s.duplicate}
    assert len(shared) == 10  # each shared id stored once, the other writers got duplicates
    assert await db_pool.fetchval("SELECT max(last_seq) FROM chats WHERE id=$1", chat) == 310


async def test_receipts_are_cumulative_and_never_move_back(db_pool: asyncpg.Pool) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    stored = await store.persist([draft(chat, str(i)) for i in range(5)])
    ids = [s.message_id for s in stored]
    assert await store.apply_receipts([Receipt("bob", ids[3], "delivered")]) == 1
    await store.apply_receipts([Receipt("bob", ids[1], "read"), Receipt("eve", ids[4], "read"),
                                Receipt("bob", "no-such-message", "read")])
    (p,) = await store.pointers("bob", chat)
    assert (p.delivered_seq, p.read_seq, p.last_seq) == (4, 2, 5)
    assert await store.pointers("eve", chat) == []


async def test_outbox_entries_left_behind_are_claimed_once_and_then_leased(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    done = await store.persist([draft(chat, "delivered")])
    await store.outbox_done([done[0].outbox_id or 0])
    await store.persist([draft(chat, "stuck-1"), draft(chat, "stuck-2")])
    assert await store.claim_outbox(grace_s=60, limit=10) == []  # still within the grace period
    claimed = await store.claim_outbox(grace_s=0, limit=10)
    assert len(claimed) == 1 and [m.seq for m in claimed[0][1]] == [2, 3]
    assert await store.claim_outbox(grace_s=0, limit=10) == []  # leased
    n, age = await store.outbox_stats()
    assert n == 1 and age >= 0


async def test_directory_caches_members(db_pool: asyncpg.Pool) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    directory = CachedDirectory(store, ttl_s=60)
    assert await directory.members([chat, "missing"]) == {chat: frozenset({"alice", "bob"})}
    await db_pool.execute("INSERT INTO chat_members(chat_id, user_id) VALUES ($1, 'carol')", chat)
    assert await directory.members([chat]) == {chat: frozenset({"alice", "bob"})}
    assert (await CachedDirectory(store, ttl_s=0).members([chat]))[chat] == {"alice", "bob", "carol"}


async def test_embedded_postgres_default_starts_and_keeps_data(tmp_path: Any) -> None:
    from adapters.postgres import open_pool, resolve_dsn

    dsn = await resolve_dsn(None, tmp_path)
    pool = await open_pool(dsn)
    await migrate(pool)
    store = PostgresStore(pool)
    chat = await store.create_chat("alice", ["bob"], "kept")
    await pool.close()
    pool = await open_pool(await resolve_dsn(None, tmp_path))
    assert [c["title"] for c in await PostgresStore(pool).chats_of("bob")] == ["kept"]
    assert chat
    await pool.close()
