"""Attachment records: created with the upload URL, claimed while an upload is checked,
finished, linked to their message, expired, and cleared when their message is deleted."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from adapters.postgres.rows import attachment_of
from stages.ports import AttachmentRecord


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
                    out.append((attachment_of(row), False))
                    continue
                old = await conn.fetchrow(
                    "SELECT * FROM attachments WHERE uploader = $1 AND client_id = $2",
                    rec.uploader, rec.client_id)
                assert old is not None
                out.append((attachment_of(old), True))
        return out

    async def get(self, ids: Sequence[str]) -> dict[str, AttachmentRecord]:
        # An id with U+0000 names nothing (PostgreSQL text cannot hold one): not a query error.
        storable = [i for i in ids if "\x00" not in i]
        rows = await self.pool.fetch("SELECT * FROM attachments WHERE id = ANY($1::text[])",
                                     storable)
        return {r["id"]: attachment_of(r) for r in rows}

    async def by_key(self, key: str) -> AttachmentRecord | None:
        if "\x00" in key:  # no object key holds one
            return None
        row = await self.pool.fetchrow("SELECT * FROM attachments WHERE object_key = $1", key)
        return attachment_of(row) if row else None

    async def claim(self, attachment_id: str, lease_s: float) -> AttachmentRecord | None:
        row = await self.pool.fetchrow(
            "UPDATE attachments SET state = 'verifying', claim = $2, claimed_at = now()"
            " WHERE id = $1 AND (state = 'pending' OR (state = 'verifying'"
            " AND claimed_at < now() - make_interval(secs => $3))) RETURNING *",
            attachment_id, uuid.uuid4().hex, float(lease_s))
        return attachment_of(row) if row else None

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
        return [attachment_of(r) for r in rows]

    async def deleted(self, limit: int = 100) -> list[AttachmentRecord]:
        """Attachments whose message was deleted and whose bytes are not removed yet."""
        rows = await self.pool.fetch(
            "SELECT * FROM attachments WHERE state = 'deleted' AND removed_at IS NULL"
            " ORDER BY created_at LIMIT $1", limit)
        return [attachment_of(r) for r in rows]

    async def removed(self, ids: Sequence[str]) -> None:
        await self.pool.execute(
            "UPDATE attachments SET removed_at = now() WHERE id = ANY($1::text[])", list(ids))
