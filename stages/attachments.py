"""The attachment route, in two phases.

Phase 1 (client frame ``attachment``): validate → create the record and an upload URL →
ack (``attachmentId, uploadUrl, uploadToken, expiresAt``). The client uploads the bytes
straight to object storage.

Phase 2 (type ``attachment_uploaded``, created by the server when storage reports the
upload, or on ``POST /v1/attachments/{id}/complete``): verify the object (exists, size and
type as declared) → scan (real type from the first bytes; ClamAV when configured) →
persist the technical chat message (``kind: attachment``) → finalize → deliver. A refused
file never reaches the chat: the record becomes ``rejected``, the object is deleted, and the
uploader gets a ``system`` ``attachment_rejected`` frame. Repeated storage events are
harmless: only a ``pending`` record is processed, and the message's dedup key is the
attachment id.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from stages.chat import MAX_ID_CHARS
from stages.model import Envelope, Outcome
from stages.ports import AttachmentRecord, AttachmentStore, DeliveryHub, Directory, ObjectStore
from stages.sniff import matches

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
HEAD_BYTES = 4096


class VirusScanner(Protocol):
    async def scan(self, data: bytes) -> str | None:
        """None if clean, else the signature found."""
        ...


def content_path(attachment_id: str) -> str:
    return f"/v1/attachments/{attachment_id}/content"


class ValidateAttachment:
    name = "validate_attachment"

    def __init__(self, directory: Directory, max_bytes: int, types: Sequence[str]) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.types = frozenset(types)

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        shaped: list[Outcome] = []
        for env in batch:
            f = env.fields
            chat, name, ctype, size = f.get("chatId"), f.get("fileName"), f.get("contentType"), \
                f.get("size")
            if not isinstance(chat, str) or not 0 < len(chat) <= MAX_ID_CHARS:
                shaped.append(Outcome.reject(env, "invalid", "'chatId' must be a chat id"))
            elif not isinstance(name, str) or not 0 < len(name) <= 255:
                shaped.append(Outcome.reject(env, "invalid", "'fileName' must be 1..255 characters"))
            elif not isinstance(ctype, str) or ctype not in self.types:
                shaped.append(Outcome.reject(env, "invalid",
                                             f"'contentType' must be one of {sorted(self.types)}"))
            elif isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                shaped.append(Outcome.reject(env, "invalid", "'size' must be a positive integer"))
            elif size > self.max_bytes:
                shaped.append(Outcome.reject(env, "invalid",
                                             f"'size' exceeds the limit of {self.max_bytes} bytes"))
            else:
                shaped.append(Outcome.ok(env))
        chats = sorted({o.envelope.fields["chatId"] for o in shaped if not o.settled})
        members = await self.directory.members(chats) if chats else {}
        out = []
        for o in shaped:
            if o.settled:
                out.append(o)
                continue
            chat_members = members.get(o.envelope.fields["chatId"])
            if chat_members is None:
                out.append(Outcome.reject(o.envelope, "not_found", "no such chat"))
            elif o.envelope.sender not in chat_members:
                out.append(Outcome.reject(o.envelope, "forbidden", "not a member of this chat"))
            else:
                out.append(o)
        return out


class CreateUpload:
    """Creates the record (idempotent per client id) and a fresh upload URL."""

    name = "create_upload"

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore, ttl_s: int) -> None:
        self.attachments = attachments
        self.objects = objects
        self.ttl_s = ttl_s

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        expires = datetime.fromtimestamp(time.time() + self.ttl_s, UTC)
        drafts = []
        for env in batch:
            aid = str(uuid.uuid4())
            safe = SAFE_NAME.sub("_", env.fields["fileName"])[-100:] or "file"
            drafts.append(AttachmentRecord(
                id=aid, chat_id=env.fields["chatId"], uploader=env.sender, client_id=env.id,
                object_key=f"{env.fields['chatId']}/{aid}/{safe}",
                file_name=env.fields["fileName"], content_type=env.fields["contentType"],
                size=env.fields["size"], state="pending",
                upload_token=secrets.token_urlsafe(24),
                expires_at=expires.isoformat(timespec="milliseconds").replace("+00:00", "Z")))
        created = await self.attachments.create(drafts)
        out = []
        for env, (rec, duplicate) in zip(batch, created, strict=True):
            if rec.state != "pending":
                out.append(Outcome.reject(env, "invalid", f"attachment is already {rec.state}"))
                continue
            left = int(datetime.fromisoformat(rec.expires_at.replace("Z", "+00:00")).timestamp()
                       - time.time())
            if left <= 0:
                out.append(Outcome.reject(env, "invalid", "the upload window has expired"))
                continue
            url = await self.objects.upload_url(rec.object_key, rec.content_type, rec.size, left)
            env.meta.update(duplicate=duplicate, chatId=rec.chat_id, ack={
                "attachmentId": rec.id, "uploadUrl": url, "uploadToken": rec.upload_token,
                "expiresAt": rec.expires_at})
            out.append(Outcome.ok(env))
        return out


class _Refusals:
    """Shared by phase-2 stages: refuse a file for good and tell the uploader why."""

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore,
                 hub: DeliveryHub) -> None:
        self.attachments = attachments
        self.objects = objects
        self.hub = hub

    async def refuse(self, env: Envelope, rec: AttachmentRecord, code: str, reason: str
                     ) -> Outcome:
        if await self.attachments.finish(rec.id, "rejected", reason):
            await self.objects.delete(rec.object_key)
            await self.hub.publish([([rec.uploader], {
                "type": "system", "event": "attachment_rejected",
                "data": {"attachmentId": rec.id, "chatId": rec.chat_id, "code": code,
                         "reason": reason}})])
        return Outcome.reject(env, code, reason)


class VerifyUpload(_Refusals):
    """The object exists and has the declared size and type. Sets up the chat message."""

    name = "verify_upload"

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore, hub: DeliveryHub,
                 directory: Directory) -> None:
        super().__init__(attachments, objects, hub)
        self.directory = directory

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        records = await self.attachments.get([e.fields.get("attachmentId", "") for e in batch])
        chats = sorted({r.chat_id for r in records.values()})
        members = await self.directory.members(chats) if chats else {}
        out: list[Outcome] = []
        for env in batch:
            rec = records.get(env.fields.get("attachmentId", ""))
            if rec is None or rec.uploader != env.sender:
                out.append(Outcome.reject(env, "not_found", "no such attachment"))
                continue
            env.meta["attachmentState"] = rec.state
            if rec.state != "pending":
                out.append(Outcome.done(env))  # already finished: a repeated event
                continue
            info = await self.objects.stat(rec.object_key)
            if info is None:
                out.append(Outcome.reject(env, "not_uploaded", "the file has not been uploaded"))
                continue
            if info.size > rec.size:
                out.append(await self.refuse(env, rec, "too_large",
                                             f"uploaded {info.size} bytes, declared {rec.size}"))
                continue
            if info.size != rec.size:
                out.append(await self.refuse(env, rec, "size_mismatch",
                                             f"uploaded {info.size} bytes, declared {rec.size}"))
                continue
            if info.content_type and info.content_type.split(";")[0] != rec.content_type:
                out.append(await self.refuse(env, rec, "type_mismatch",
                                             f"uploaded as {info.content_type}, "
                                             f"declared {rec.content_type}"))
                continue
            attachment: dict[str, Any] = {
                "attachmentId": rec.id, "fileName": rec.file_name,
                "contentType": rec.content_type, "size": rec.size,
                "url": content_path(rec.id)}
            env.fields.update(chatId=rec.chat_id, body=rec.file_name)
            env.meta.update(kind="attachment", attachment=attachment, record=rec,
                            members=sorted(members.get(rec.chat_id, ())))
            out.append(Outcome.ok(env))
        return out


class ScanAttachment(_Refusals):
    """Sniffs the real type from the first bytes; runs ClamAV when one is configured."""

    name = "scan_attachment"

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore, hub: DeliveryHub,
                 scanner: VirusScanner | None, max_bytes: int) -> None:
        super().__init__(attachments, objects, hub)
        self.scanner = scanner
        self.max_bytes = max_bytes

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out: list[Outcome] = []
        for env in batch:
            rec: AttachmentRecord = env.meta["record"]
            head = await self.objects.head(rec.object_key, HEAD_BYTES)
            ok, found = matches(rec.content_type, head)
            if not ok:
                out.append(await self.refuse(
                    env, rec, "type_mismatch",
                    f"declared {rec.content_type}, the content is {found or 'unrecognised'}"))
                continue
            if self.scanner is not None:
                data = await self.objects.head(rec.object_key, self.max_bytes)
                signature = await self.scanner.scan(data)
                if signature is not None:
                    out.append(await self.refuse(env, rec, "infected",
                                                 f"malware found: {signature}"))
                    continue
            out.append(Outcome.ok(env))
        return out


class FinalizeAttachment:
    """Marks the attachment ready with its message (once)."""

    name = "finalize_attachment"

    def __init__(self, attachments: AttachmentStore) -> None:
        self.attachments = attachments

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        for env in batch:
            await self.attachments.finish(env.fields["attachmentId"], "ready",
                                          message_id=env.meta.get("messageId"))
            env.meta["attachmentState"] = "ready"
        return [Outcome.ok(e) for e in batch]
