"""Messages: persisting a batch (with per-chat seq, dedup and outbox entries, in one
transaction), history reads, and receipts moving members' pointers (``MessageStore``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from adapters import event_outbox
from adapters.kafka_events import chat_events, receipt_events
from adapters.postgres.commands import apply_command, command_error, command_targets
from adapters.postgres.retry import retried
from adapters.postgres.rows import MESSAGE_COLUMNS, message_of, rfc3339
from stages.ports import COMMAND_KINDS, ChatDraft, PointerMove, Receipt, Stored, StoredMessage


class _Race(Exception):
    """Another transaction stored one of our (sender, client id) pairs meanwhile."""


class PostgresMessages:
    def __init__(self, pool: asyncpg.Pool, events_enabled: bool = False) -> None:
        self.pool = pool
        self.events_enabled = events_enabled  # append event-bus events in each commit

    @retried(_Race, asyncpg.DeadlockDetectedError)
    async def persist(self, drafts: Sequence[ChatDraft]) -> list[Stored]:
        return await self._persist_once(drafts)

    async def _persist_once(self, drafts: Sequence[ChatDraft]) -> list[Stored]:
        now = datetime.now(UTC)
        created = rfc3339(now)
        results: list[Stored | None] = [None] * len(drafts)
        chat_of = [d.chat_id for d in drafts]
        async with self.pool.acquire() as conn, conn.transaction():
            # Commands name a target message, not a chat: find it (and refuse bad ones).
            targets = await command_targets(conn, drafts)
            for i, d in enumerate(drafts):
                if d.kind in COMMAND_KINDS:
                    t = targets.get(d.target or "")
                    error = command_error(d, t)
                    if error is not None:
                        results[i] = Stored("", t["chat_id"] if t else "", 0, created, False,
                                            error=error)
                    else:
                        chat_of[i] = t["chat_id"]
            live = [i for i in range(len(drafts)) if results[i] is None]
            chat_ids = sorted({chat_of[i] for i in live})
            # Lock the chats in a fixed order: seq allocation is serialised per chat, and a
            # later transaction on the same chat sees every message committed before it.
            last = {
                r["id"]: r["last_seq"]
                for r in await conn.fetch(
                    "SELECT id, last_seq FROM chats WHERE id = ANY($1::text[])"
                    " ORDER BY id FOR UPDATE",
                    chat_ids,
                )
            }
            missing = [c for c in chat_ids if c not in last]
            if missing:
                raise LookupError(f"unknown chats: {missing}")
            if any(drafts[i].kind in COMMAND_KINDS for i in live):
                members = {(r["chat_id"], r["user_id"]) for r in await conn.fetch(
                    "SELECT chat_id, user_id FROM chat_members WHERE chat_id = ANY($1::text[])",
                    chat_ids)}
                for i in live:
                    if drafts[i].kind in COMMAND_KINDS and (chat_of[i], drafts[i].sender_id) \
                            not in members:
                        results[i] = Stored("", chat_of[i], 0, created, False, error="forbidden")
                live = [i for i in live if results[i] is None]
            existing = {
                (r["sender_id"], r["client_id"]): r
                for r in await conn.fetch(
                    "SELECT m.sender_id, m.client_id, m.id, m.chat_id, m.seq, m.created_at"
                    " FROM messages m JOIN unnest($1::text[], $2::text[]) AS k(s, c)"
                    " ON m.sender_id = k.s AND m.client_id = k.c",
                    [drafts[i].sender_id for i in live],
                    [drafts[i].client_id for i in live],
                )
            }
            first_in_batch: dict[tuple[str, str], int] = {}
            new_rows: list[tuple[Any, ...]] = []
            ranges: dict[str, list[int]] = {}
            for i in live:
                d = drafts[i]
                key = (d.sender_id, d.client_id)
                old = existing.get(key)
                if old is not None:
                    results[i] = Stored(old["id"], old["chat_id"], old["seq"],
                                        rfc3339(old["created_at"]), True)
                    continue
                if key in first_in_batch:
                    continue  # filled from the first occurrence below
                first_in_batch[key] = i
                chat = chat_of[i]
                last[chat] += 1
                seq = last[chat]
                mid = str(uuid.uuid4())
                data = await apply_command(conn, d, now) if d.kind in COMMAND_KINDS else None
                att = json.dumps(d.attachment) if d.attachment is not None else None
                new_rows.append((chat, seq, mid, d.sender_id, d.client_id, d.kind, d.body, att,
                                 d.target, json.dumps(data) if data is not None else None))
                ranges.setdefault(chat, [seq, seq])[1] = seq
                results[i] = Stored(mid, chat, seq, created, False, data=data)
            if new_rows:
                cols = list(zip(*new_rows, strict=True))
                inserted = await conn.fetch(
                    "INSERT INTO messages(chat_id, seq, id, sender_id, client_id, kind, body,"
                    " attachment, target_id, data, created_at)"
                    " SELECT c, s, i, se, cl, k, b, a::jsonb, tg, dt::jsonb, $11"
                    " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
                    " $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])"
                    " AS t(c, s, i, se, cl, k, b, a, tg, dt)"
                    " ON CONFLICT (sender_id, client_id) DO NOTHING RETURNING id",
                    *[list(c) for c in cols],
                    now,
                )
                if len(inserted) != len(new_rows):
                    raise _Race()
                chats = sorted(ranges)
                await conn.execute(
                    "UPDATE chats SET last_seq = v.s FROM unnest($1::text[], $2::bigint[])"
                    " AS v(id, s) WHERE chats.id = v.id",
                    chats,
                    [last[c] for c in chats],
                )
                outbox = await conn.fetch(
                    "INSERT INTO outbox(chat_id, from_seq, to_seq) SELECT * FROM"
                    " unnest($1::text[], $2::bigint[], $3::bigint[]) RETURNING id, chat_id",
                    chats,
                    [ranges[c][0] for c in chats],
                    [ranges[c][1] for c in chats],
                )
                box = {r["chat_id"]: r["id"] for r in outbox}
                await self._sender_has_own(conn, new_rows)
                for i, r in enumerate(results):
                    if r is not None and not r.duplicate and r.error is None:
                        results[i] = Stored(r.message_id, r.chat_id, r.seq, r.created_at, False,
                                            box[r.chat_id], data=r.data)
                if self.events_enabled:
                    # A sender's pointer moving over its own messages is no receipt event:
                    # a sender has its own messages by definition.
                    new = sorted(first_in_batch.values())
                    await event_outbox.append(conn, chat_events(
                        [drafts[i] for i in new], [r for i in new if (r := results[i]) is not None]))
        for key, i in first_in_batch.items():
            first = results[i]
            assert first is not None
            for j, d in enumerate(drafts):
                if results[j] is None and (d.sender_id, d.client_id) == key:
                    results[j] = Stored(first.message_id, first.chat_id, first.seq,
                                        first.created_at, True)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    @staticmethod
    async def _sender_has_own(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """A sender has its own messages: its delivered pointer moves over them in this
        transaction when nothing of others lies in between (its first run of consecutive
        seqs follows the pointer), so no receipt round trip is needed for them. Otherwise
        the sender's connection receipts them once the gap before them is filled."""
        runs: dict[tuple[str, str], list[int]] = {}
        for chat, seq, _, sender, *_ in rows:  # in seq order per chat
            run = runs.get((chat, sender))
            if run is None:
                runs[(chat, sender)] = [seq, seq]
            elif run[1] == seq - 1 and len(run) == 2:
                run[1] = seq
            else:
                run.append(0)  # the first run ended; later own messages wait for receipts
        keys = sorted(runs)
        await conn.execute(
            "UPDATE chat_members cm SET delivered_seq = v.t"
            " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS v(c, u, f, t)"
            " WHERE cm.chat_id = v.c AND cm.user_id = v.u AND cm.delivered_seq = v.f - 1",
            [c for c, _ in keys], [u for _, u in keys],
            [runs[k][0] for k in keys], [runs[k][1] for k in keys])

    async def messages_after(self, chat_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Rows in seq order: messages in their current state (edited body, tombstone,
        reaction counts) and command events."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND seq > $2"
                " ORDER BY seq LIMIT $3",
                chat_id, after_seq, limit,
            )
            counts: dict[str, dict[str, int]] = {}
            ids = [r["id"] for r in rows if r["kind"] not in COMMAND_KINDS]
            if ids:
                for r in await conn.fetch(
                    "SELECT message_id, emoji, count(*) AS n FROM reactions"
                    " WHERE message_id = ANY($1::text[]) GROUP BY message_id, emoji"
                    " ORDER BY emoji", ids):
                    counts.setdefault(r["message_id"], {})[r["emoji"]] = r["n"]
        return [message_of(r, counts.get(r["id"])) for r in rows]

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
        if not receipts:
            return []
        return await self._apply_receipts_once(receipts)

    @retried(asyncpg.DeadlockDetectedError)
    async def _apply_receipts_once(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await self._move_pointers(conn, receipts)
            if self.events_enabled:
                await event_outbox.append(conn, receipt_events(rows))
        return [PointerMove(r["chat_id"], r["user_id"], r["delivered_seq"], r["read_seq"])
                for r in rows]

    @staticmethod
    async def _move_pointers(conn: asyncpg.Connection, receipts: Sequence[Receipt]
                             ) -> list[asyncpg.Record]:
        return await conn.fetch(
            """
            WITH r AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS r(user_id, mid, status)
            ), m AS (
                SELECT r.user_id, msg.chat_id, max(msg.seq) AS seq,
                       coalesce(max(msg.seq) FILTER (WHERE r.status = 'read'), 0) AS read_seq
                  FROM r JOIN messages msg ON msg.id = r.mid
                 GROUP BY r.user_id, msg.chat_id
            ), locked AS (
                SELECT cm.chat_id, cm.user_id, cm.delivered_seq AS was_delivered,
                       cm.read_seq AS was_read FROM chat_members cm
                  JOIN m ON m.chat_id = cm.chat_id AND m.user_id = cm.user_id
                 WHERE cm.delivered_seq < m.seq OR cm.read_seq < m.read_seq
                 ORDER BY cm.chat_id, cm.user_id FOR UPDATE OF cm
            )
            UPDATE chat_members cm
               SET delivered_seq = greatest(cm.delivered_seq, m.seq),
                   read_seq = greatest(cm.read_seq, m.read_seq)
              FROM m JOIN locked l ON l.chat_id = m.chat_id AND l.user_id = m.user_id
             WHERE cm.chat_id = m.chat_id AND cm.user_id = m.user_id
            RETURNING cm.chat_id, cm.user_id, l.was_delivered, l.was_read,
                      cm.delivered_seq, cm.read_seq
            """,
            [r.user_id for r in receipts],
            [r.message_id for r in receipts],
            [r.status for r in receipts],
        )
