"""Chats and their members: creation, the chat list, membership, contacts, and each
member's delivered/read pointers (``Directory``, ``Contacts`` and ``ChatStore`` ports)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from adapters.postgres.rows import json_value
from stages.ports import Pointer


class PostgresChats:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def create_chat(self, creator: str, members: Sequence[str], title: str | None) -> str:
        chat_id = str(uuid.uuid4())
        everyone = sorted({creator, *members})
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO chats(id, title, created_by) VALUES ($1, $2, $3)", chat_id, title, creator
            )
            await conn.executemany(
                "INSERT INTO chat_members(chat_id, user_id) VALUES ($1, $2)",
                [(chat_id, m) for m in everyone],
            )
        return chat_id

    async def chats_of(self, user_id: str, unread: bool = True) -> list[dict[str, Any]]:
        """``unread=False`` leaves out the unread count (``unreadCount`` is None): the
        chat cache supplies it when warm, sparing a count over each chat's messages."""
        count = ("(SELECT count(*) FROM messages m WHERE m.chat_id = c.id"
                 " AND m.seq > cm.read_seq AND m.sender_id <> $1"
                 " AND m.kind IN ('text', 'attachment'))") if unread else "NULL::bigint"
        rows = await self.pool.fetch(
            f"""
            SELECT c.id, c.title, c.last_seq, cm.delivered_seq, cm.read_seq,
                   (SELECT array_agg(user_id ORDER BY user_id) FROM chat_members
                     WHERE chat_id = c.id) AS members,
                   (SELECT json_agg(json_build_object('userId', p.user_id,
                           'deliveredSeq', p.delivered_seq, 'readSeq', p.read_seq)
                           ORDER BY p.user_id)
                      FROM chat_members p WHERE p.chat_id = c.id AND p.user_id <> $1) AS peers,
                   {count} AS unread
              FROM chat_members cm JOIN chats c ON c.id = cm.chat_id
             WHERE cm.user_id = $1
             ORDER BY c.created_at, c.id
            """,
            user_id,
        )
        return [
            {
                "chatId": r["id"],
                "title": r["title"],
                "members": list(r["members"] or []),
                "lastSeq": r["last_seq"],
                "deliveredSeq": r["delivered_seq"],
                "readSeq": r["read_seq"],
                "unreadCount": r["unread"],
                "peers": json_value(r["peers"]) or [],
            }
            for r in rows
        ]

    async def members(self, chat_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        rows = await self.pool.fetch(
            "SELECT chat_id, array_agg(user_id) AS users FROM chat_members"
            " WHERE chat_id = ANY($1::text[]) GROUP BY chat_id",
            list(chat_ids),
        )
        return {r["chat_id"]: frozenset(r["users"]) for r in rows}

    async def contacts(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """Everyone sharing at least one chat with each user (``Contacts`` port)."""
        rows = await self.pool.fetch(
            "SELECT a.user_id AS who, array_agg(DISTINCT b.user_id) AS peers"
            " FROM chat_members a JOIN chat_members b ON a.chat_id = b.chat_id"
            " WHERE a.user_id = ANY($1::text[]) GROUP BY a.user_id",
            list(user_ids),
        )
        return {r["who"]: frozenset(r["peers"]) for r in rows}

    async def share_chat(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The pairs whose users are members of one chat at least (``Contacts`` port): one
        query, each pair an index probe (``chat_members_by_user`` for the first user's
        chats, the primary key for the second's membership of one of them)."""
        if not pairs:
            return set()
        rows = await self.pool.fetch(
            "SELECT p.a, p.b FROM unnest($1::text[], $2::text[]) AS p(a, b)"
            " WHERE EXISTS (SELECT 1 FROM chat_members x JOIN chat_members y"
            " ON y.chat_id = x.chat_id AND y.user_id = p.b WHERE x.user_id = p.a)",
            [a for a, _ in pairs], [b for _, b in pairs],
        )
        return {(r["a"], r["b"]) for r in rows}

    async def pointers(self, user_id: str, chat_id: str | None = None) -> list[Pointer]:
        rows = await self.pool.fetch(
            "SELECT cm.chat_id, cm.delivered_seq, cm.read_seq, c.last_seq"
            " FROM chat_members cm JOIN chats c ON c.id = cm.chat_id"
            " WHERE cm.user_id = $1 AND ($2::text IS NULL OR cm.chat_id = $2)",
            user_id,
            chat_id,
        )
        return [Pointer(r["chat_id"], r["delivered_seq"], r["read_seq"], r["last_seq"]) for r in rows]


    async def delivery_backlog(self) -> tuple[int, float]:
        """(messages stored and not yet receipted, summed over members, online or not;
        age in seconds of the oldest of them). One pass over ``chat_members``: read at
        scrape time, not per message."""
        row = await self.pool.fetchrow(
            "SELECT coalesce(sum(c.last_seq - cm.delivered_seq), 0) AS n,"
            " coalesce(extract(epoch FROM now() - min(m.created_at)), 0) AS age"
            " FROM chat_members cm JOIN chats c ON c.id = cm.chat_id"
            " LEFT JOIN messages m ON m.chat_id = cm.chat_id AND m.seq = cm.delivered_seq + 1"
            " WHERE cm.delivered_seq < c.last_seq"
        )
        assert row is not None
        return int(row["n"]), float(row["age"])
