"""The PostgreSQL adapter against a real PostgreSQL, checked against the MessageStore text."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from adapters.cached_directory import CachedDirectory
from adapters.postgres.attachments import PostgresAttachments
from adapters.postgres.migrations import migrate
from stages.ports import AttachmentRecord, ChatDraft, PointerMove, Receipt
from tests.integration.pg import PostgresStore


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
    assert await store.apply_receipts([Receipt("bob", ids[3], "delivered")]) == [
        PointerMove(chat, "bob", 4, 0)]
    moved = await store.apply_receipts([Receipt("bob", ids[1], "read"), Receipt("eve", ids[4], "read"),
                                        Receipt("bob", "no-such-message", "read")])
    assert moved == [PointerMove(chat, "bob", 4, 2)]
    # A repeat moves nothing.
    assert await store.apply_receipts([Receipt("bob", ids[1], "read")]) == []
    (peer,) = (await store.chats_of("alice"))[0]["peers"]
    assert peer == {"userId": "bob", "deliveredSeq": 4, "readSeq": 2}
    (p,) = await store.pointers("bob", chat)
    assert (p.delivered_seq, p.read_seq, p.last_seq) == (4, 2, 5)
    assert await store.pointers("eve", chat) == []


async def test_delivery_backlog_counts_every_member_behind_and_the_oldest_age(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    assert await store.delivery_backlog() == (0, 0.0)
    chat = await store.create_chat("alice", ["bob", "carol"], None)
    stored = await store.persist([draft(chat, str(i)) for i in range(4)])
    await db_pool.execute("UPDATE messages SET created_at = now() - interval '90 seconds'"
                          " WHERE chat_id = $1 AND seq = 1", chat)
    # Nobody receipted: the sender has her own four; Bob and Carol are four behind each,
    # and the oldest is seq 1.
    pending, age = await store.delivery_backlog()
    assert pending == 8 and 89 < age < 300
    await store.apply_receipts([Receipt("alice", stored[3].message_id, "delivered"),
                                Receipt("bob", stored[1].message_id, "delivered")])
    # Bob is two behind (from seq 3), Carol four (from seq 1, still the oldest).
    pending, age = await store.delivery_backlog()
    assert pending == 6 and 89 < age < 300
    await store.apply_receipts([Receipt("carol", stored[3].message_id, "read")])
    pending, age = await store.delivery_backlog()
    assert pending == 2 and age < 60  # only Bob's seq 3 and 4, stored just now


async def test_outbox_entries_left_behind_are_claimed_once_and_then_leased(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    done = await store.persist([draft(chat, "delivered")])
    await store.outbox.done([done[0].outbox_id or 0])
    await store.persist([draft(chat, "stuck-1"), draft(chat, "stuck-2")])
    assert await store.outbox.claim(grace_s=60, limit=10) == []  # still within the grace period
    claimed = await store.outbox.claim(grace_s=0, limit=10)
    assert len(claimed) == 1 and [m.seq for m in claimed[0][1]] == [2, 3]
    assert await store.outbox.claim(grace_s=0, limit=10) == []  # leased
    n, age = await store.outbox.stats()
    assert n == 1 and age >= 0


async def test_directory_caches_members(db_pool: asyncpg.Pool) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    directory = CachedDirectory(store, ttl_s=60)
    assert await directory.members([chat, "missing"]) == {chat: frozenset({"alice", "bob"})}
    await db_pool.execute("INSERT INTO chat_members(chat_id, user_id) VALUES ($1, 'carol')", chat)
    assert await directory.members([chat]) == {chat: frozenset({"alice", "bob"})}
    assert (await CachedDirectory(store.chats, ttl_s=0).members([chat]))[chat] == {"alice", "bob", "carol"}


async def test_embedded_postgres_default_starts_and_keeps_data(tmp_path: Any) -> None:
    from adapters.postgres.connect import open_pool, resolve_dsn

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


def command(sender: str, client: str, op: str, target: str, body: str | None = None,
            emoji: str | None = None) -> ChatDraft:
    return ChatDraft(chat_id="", sender_id=sender, client_id=client, body=body, kind=op,
                     target=target, emoji=emoji)


async def test_unread_count_counts_messages_from_others_not_command_events(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    m1, _ = await store.persist([draft(chat, "1"), draft(chat, "2")])
    reacted = await store.persist([command("bob", "r1", "react", m1.message_id, emoji="👍")])
    assert reacted[0].error is None and reacted[0].seq == 3
    await store.persist([command("alice", "e1", "edit", m1.message_id, body="edited")])
    unread = {c["chatId"]: c["unreadCount"] for c in await store.chats_of("alice")}
    assert unread[chat] == 0  # bob's reaction is an event, not a message
    (mine,) = await store.chats_of("bob")
    assert mine["unreadCount"] == 2 and mine["lastSeq"] == 4  # alice's edit is not counted


async def test_delete_leaves_no_body_in_edit_events_and_marks_its_attachment_deleted(
    db_pool: asyncpg.Pool,
) -> None:
    store, attachments = PostgresStore(db_pool), PostgresAttachments(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    (text,) = await store.persist([draft(chat, "t", body="my secret")])
    for i, body in enumerate(["secret 2", "secret 3"]):
        await store.persist([command("alice", f"e{i}", "edit", text.message_id, body=body)])
    rec = attachment(chat)
    await attachments.create([rec])
    held = await attachments.claim(rec.id, 60)
    assert held is not None and held.claim is not None
    assert await attachments.finish(rec.id, held.claim, "ready")
    (att,) = await store.persist([ChatDraft(
        chat_id=chat, sender_id="alice", client_id=f"attachment:{rec.id}", body="cat.png",
        kind="attachment", attachment={"attachmentId": rec.id, "fileName": "cat.png"})])
    await attachments.link(rec.id, att.message_id)
    for target in (text.message_id, att.message_id):
        (gone,) = await store.persist([command("alice", f"d-{target}", "delete", target)])
        assert gone.error is None
    rows = await store.messages_after(chat, 0, 100)
    assert [r.kind for r in rows] == ["text", "edit", "edit", "attachment", "delete", "delete"]
    assert all(r.body is None for r in rows), [(r.kind, r.body) for r in rows]
    assert all("secret" not in str(r.frame()) for r in rows)
    assert rows[3].attachment is None and rows[3].deleted
    now = (await attachments.get([rec.id]))[rec.id]
    assert now.state == "deleted" and now.message_id == att.message_id
    assert [r.id for r in await attachments.deleted()] == [rec.id]
    await attachments.removed([rec.id])
    assert await attachments.deleted() == []


def attachment(chat: str, client: str = "a-1", expires_at: str = "2030-01-01T00:00:00.000Z"
               ) -> AttachmentRecord:
    aid = f"att-{chat[:8]}-{client}"
    return AttachmentRecord(id=aid, chat_id=chat, uploader="alice", client_id=client,
                            object_key=f"{chat}/{aid}/cat.png", file_name="cat.png",
                            content_type="image/png", size=10, state="pending",
                            upload_token="token", expires_at=expires_at)


async def test_claims_are_exclusive_and_only_the_holder_finishes(db_pool: asyncpg.Pool) -> None:
    store, attachments = PostgresStore(db_pool), PostgresAttachments(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    rec = attachment(chat)
    ((created, dup),) = await attachments.create([rec])
    assert not dup and created.state == "pending"
    got = await asyncio.gather(*(attachments.claim(rec.id, 60) for _ in range(8)))
    winners = [g for g in got if g is not None]
    assert len(winners) == 1 and winners[0].state == "verifying"
    claim = winners[0].claim
    assert claim is not None
    assert not await attachments.finish(rec.id, "someone-else", "ready")
    assert await attachments.release(rec.id, claim)
    assert not await attachments.release(rec.id, claim)  # released once
    again = await attachments.claim(rec.id, 60)
    assert again is not None and again.claim not in (None, claim)
    assert not await attachments.finish(rec.id, claim, "ready")  # the old claim is void
    # A claim older than the lease is presumed dead and may be taken over.
    await db_pool.execute("UPDATE attachments SET claimed_at = now() - interval '2 minutes'"
                          " WHERE id = $1", rec.id)
    taken = await attachments.claim(rec.id, 60)
    assert taken is not None and taken.claim != again.claim
    assert await attachments.finish(rec.id, taken.claim or "", "rejected", "too big")
    assert await attachments.claim(rec.id, 0) is None  # finished for good


async def test_expiry_takes_only_unclaimed_records_past_the_grace(db_pool: asyncpg.Pool) -> None:
    store, attachments = PostgresStore(db_pool), PostgresAttachments(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    past = "2020-01-01T00:00:00.000Z"
    never = attachment(chat, "never", past)
    checking = attachment(chat, "checking", past)
    recent = attachment(chat, "recent", "2030-01-01T00:00:00.000Z")
    await attachments.create([never, checking, recent])
    held = await attachments.claim(checking.id, 300)
    assert held is not None
    await db_pool.execute("UPDATE attachments SET expires_at = now() - interval '30 seconds'"
                          " WHERE id = $1", recent.id)
    expired = await attachments.expire(grace_s=60, lease_s=300)
    assert [r.id for r in expired] == [never.id]  # recent is within the grace, checking is held
    assert await attachments.claim(never.id, 60) is None  # an upload event after expiry
    state = {r.id: r.state for r in (await attachments.get(
        [never.id, checking.id, recent.id])).values()}
    assert state == {never.id: "expired", checking.id: "verifying", recent.id: "pending"}
    assert await attachments.finish(checking.id, held.claim or "", "ready")
    # A check that died (claim older than the lease) does not keep its record forever.
    dead = attachment(chat, "dead", past)
    await attachments.create([dead])
    assert await attachments.claim(dead.id, 300) is not None
    await db_pool.execute("UPDATE attachments SET claimed_at = now() - interval '1 hour'"
                          " WHERE id = $1", dead.id)
    assert [r.id for r in await attachments.expire(grace_s=60, lease_s=300)] == [dead.id]


async def test_a_senders_own_messages_move_its_pointer_in_the_persist_transaction(
    db_pool: asyncpg.Pool,
) -> None:
    store = PostgresStore(db_pool)
    chat = await store.create_chat("alice", ["bob"], None)
    await store.persist([draft(chat, "a1"), draft(chat, "a2")])
    (p,) = await store.pointers("alice", chat)
    assert p.delivered_seq == 2  # her own, nothing in between: no receipt needed
    (b,) = await store.pointers("bob", chat)
    assert b.delivered_seq == 0  # the recipient's pointer waits for his receipt
    await store.persist([ChatDraft(chat, "bob", "b1", "hi"), draft(chat, "a3")])
    (p,) = await store.pointers("alice", chat)
    assert p.delivered_seq == 2  # Bob's seq 3 lies between: her seq 4 waits for a receipt
    (b,) = await store.pointers("bob", chat)
    assert b.delivered_seq == 0  # his own seq 3 follows seq 2, which he has not received
