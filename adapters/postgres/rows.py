"""Rows to domain values: how the tables' columns become ``StoredMessage`` and friends."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg

from stages.ports import AttachmentRecord, StoredMessage

MESSAGE_COLUMNS = ("chat_id, seq, id, sender_id, kind, body, attachment, created_at, edited_at,"
                   " deleted_at, target_id, data")


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_value(value: Any) -> Any:
    """A jsonb column as read by asyncpg (text unless a codec is set) as a Python value."""
    return json.loads(value) if isinstance(value, str) else value


def message_of(row: asyncpg.Record, reactions: dict[str, int] | None = None) -> StoredMessage:
    return StoredMessage(
        message_id=row["id"],
        chat_id=row["chat_id"],
        seq=row["seq"],
        sender_id=row["sender_id"],
        kind=row["kind"],
        body=row["body"],
        created_at=rfc3339(row["created_at"]),
        attachment=json_value(row["attachment"]),
        edited_at=rfc3339(row["edited_at"]) if row["edited_at"] else None,
        deleted=row["deleted_at"] is not None,
        reactions=reactions or {},
        target=row["target_id"],
        data=json_value(row["data"]),
    )


def attachment_of(r: asyncpg.Record) -> AttachmentRecord:
    return AttachmentRecord(
        id=r["id"], chat_id=r["chat_id"], uploader=r["uploader"], client_id=r["client_id"],
        object_key=r["object_key"], file_name=r["file_name"], content_type=r["content_type"],
        size=r["size"], state=r["state"], upload_token=r["upload_token"],
        expires_at=rfc3339(r["expires_at"]), message_id=r["message_id"], claim=r["claim"])
