"""Commands (edit, react, delete) applied to their target message inside the persist
transaction: finding and locking targets, refusing bad ones, changing the target."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from stages.ports import COMMAND_KINDS, ChatDraft


async def command_targets(conn: asyncpg.Connection, drafts: Sequence[ChatDraft]
                   ) -> dict[str, asyncpg.Record]:
    ids = sorted({d.target for d in drafts if d.kind in COMMAND_KINDS and d.target})
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT id, chat_id, sender_id, kind, deleted_at FROM messages"
        " WHERE id = ANY($1::text[]) FOR UPDATE", ids)
    return {r["id"]: r for r in rows}

def command_error(d: ChatDraft, target: asyncpg.Record | None) -> str | None:
    if target is None or target["kind"] in COMMAND_KINDS:
        return "not_found"
    if d.kind in ("edit", "delete") and target["sender_id"] != d.sender_id:
        return "forbidden"
    if target["deleted_at"] is not None and d.kind != "delete":
        return "not_found"
    return None

async def apply_command(conn: asyncpg.Connection, d: ChatDraft, now: datetime
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
