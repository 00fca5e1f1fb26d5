"""The attachment route, in two phases.

Phase 1 (client frame ``attachment``): validate → create the record and an upload URL →
ack (``attachmentId, uploadUrl, uploadToken, expiresAt``). The client uploads the bytes
straight to object storage.

Phase 2 (type ``attachment_uploaded``, created by the server when storage reports the
upload, or on ``POST /v1/attachments/{id}/complete``): verify → scan → finalize → persist
the technical chat message (``kind: attachment``) → link → deliver.

- ``verify_upload`` claims the record (``pending`` → ``verifying``, atomically: a repeated
  or concurrent event finds it claimed, and expiry never takes a claimed record), then
  copies the uploaded object to a key only the server writes (``ready/<id>/<name>``).
  Everything after looks at that copy only: size and type as declared, real type sniffed
  from its first bytes, ClamAV when configured, and it is the copy members download. The
  upload URL may stay valid for a while, but bytes put there after the copy are never
  served.
- ``finalize_attachment`` moves the claimed record to ``ready`` before the message is
  stored: if the claim was lost meanwhile, no message is posted.
- A refused file never reaches the chat: the record becomes ``rejected``, both objects are
  deleted, and the uploader gets a ``system`` ``attachment_rejected`` frame. The message's
  dedup key is ``attachment:<id>`` (client frames may not use that prefix), so a record
  left ``ready`` without its message (a crash in between) gets it on the next event.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from stages.chat import MAX_ID_CHARS
from stages.model import Envelope, Outcome
from stages.ports import (
    AttachmentRecord,
    AttachmentStore,
    Delivery,
    DeliveryHub,
    Directory,
    ObjectStore,
    ScanLimitExceeded,
    VirusScanner,
)
from stages.sniff import matches

__all__ = ["ScanLimitExceeded", "VirusScanner"]

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
HEAD_BYTES = 4096
SCAN_CHUNK_BYTES = 256 * 1024


def content_path(attachment_id: str) -> str:
    return f"/v1/attachments/{attachment_id}/content"


def ready_key(rec: AttachmentRecord) -> str:
    """Where the checked copy lives: a key no upload URL is ever signed for."""
    return f"ready/{rec.id}/{rec.object_key.rsplit('/', 1)[-1]}"


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
            safe = SAFE_NAME.sub("_", env.fields["fileName"])[-100:].lstrip(".") or "file"
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


RELEASE_RETRY_S = 120.0  # how long a claim whose release failed is offered back again
RELEASE_BACKOFF_MAX_S = 8.0


class _Claims:
    """Shared by phase-2 stages: the claims a failed batch holds are given back.

    A release that fails (the store unreachable: the very failure that often failed the
    batch) is tried again in the background, with backoff, for ``RELEASE_RETRY_S``: the
    record is claimable again soon after the store is back, not only once its claim's
    lease (``attachment_claim_lease_s``) runs out. A release names its claim, so a late
    one never touches a record claimed anew or finished meanwhile."""

    def __init__(self, attachments: AttachmentStore) -> None:
        self.attachments = attachments
        self._later: set[asyncio.Task[None]] = set()

    async def release_all(self, batch: Sequence[Envelope]) -> None:
        """The batch failed: give back every claim it holds (those already finished are
        not affected), so a later event can try again at once instead of after the lease."""
        for env in batch:
            claim = env.meta.get("claim")
            if not claim:
                continue
            aid = env.fields["attachmentId"]
            try:
                await self.attachments.release(aid, claim)
            except Exception:
                task = asyncio.get_running_loop().create_task(self._release_later(aid, claim))
                self._later.add(task)
                task.add_done_callback(self._later.discard)

    async def _release_later(self, attachment_id: str, claim: str) -> None:
        deadline = time.monotonic() + RELEASE_RETRY_S
        delay = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self.attachments.release(attachment_id, claim)
                return
            except Exception:
                delay = min(delay * 2, RELEASE_BACKOFF_MAX_S)


class _Refusals(_Claims):
    """Shared by phase-2 stages: refuse a file for good and tell the uploader why."""

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore,
                 hub: DeliveryHub) -> None:
        super().__init__(attachments)
        self.objects = objects
        self.hub = hub

    async def refuse(self, env: Envelope, rec: AttachmentRecord, code: str, reason: str
                     ) -> Outcome:
        env.meta["attachmentState"] = "rejected"
        if await self.attachments.finish(rec.id, env.meta["claim"], "rejected", reason):
            await self.objects.delete(ready_key(rec))
            await self.objects.delete(rec.object_key)
            await self.hub.publish([Delivery([rec.uploader], {
                "type": "system", "event": "attachment_rejected",
                "data": {"attachmentId": rec.id, "chatId": rec.chat_id, "code": code,
                         "reason": reason}})])
        return Outcome.reject(env, code, reason)

    async def release(self, env: Envelope, rec: AttachmentRecord, code: str, reason: str
                      ) -> Outcome:
        """Not refused, just not possible now: back to ``pending`` for a later event."""
        await self.attachments.release(rec.id, env.meta["claim"])
        env.meta["attachmentState"] = "pending"
        return Outcome.reject(env, code, reason)



class VerifyUpload(_Refusals):
    """Claims the record, snapshots the upload to the server's own key, and checks that
    copy has the declared size and type. Sets up the chat message."""

    name = "verify_upload"

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore, hub: DeliveryHub,
                 directory: Directory, lease_s: float = 300.0) -> None:
        super().__init__(attachments, objects, hub)
        self.directory = directory
        self.lease_s = lease_s

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        records = await self.attachments.get([e.fields.get("attachmentId", "") for e in batch])
        chats = sorted({r.chat_id for r in records.values()})
        members = await self.directory.members(chats) if chats else {}
        out: list[Outcome] = []
        try:
            for env in batch:
                rec = records.get(env.fields.get("attachmentId", ""))
                if rec is None or rec.uploader != env.sender:
                    out.append(Outcome.reject(env, "not_found", "no such attachment"))
                    continue
                out.append(await self._one(env, rec, sorted(members.get(rec.chat_id, ()))))
        except Exception:
            await self.release_all(batch)
            raise
        return out

    def _prepare(self, env: Envelope, rec: AttachmentRecord, members: list[str]) -> None:
        attachment: dict[str, Any] = {
            "attachmentId": rec.id, "fileName": rec.file_name,
            "contentType": rec.content_type, "size": rec.size,
            "url": content_path(rec.id)}
        env.fields.update(chatId=rec.chat_id, body=rec.file_name)
        env.meta.update(kind="attachment", attachment=attachment, record=rec, members=members)

    async def _one(self, env: Envelope, rec: AttachmentRecord, members: list[str]) -> Outcome:
        env.meta["attachmentState"] = rec.state
        if rec.state in ("ready", "rejected", "expired"):
            # Bytes put at the upload key after the check are never served: remove them.
            await self.objects.delete(rec.object_key)
        if rec.state == "ready":
            if rec.message_id is not None:
                env.meta["messageId"] = rec.message_id
                return Outcome.done(env)  # a repeated event
            self._prepare(env, rec, members)  # ready, its message not stored yet: store it
            env.meta["resumed"] = True
            return Outcome.ok(env)
        if rec.state == "rejected":
            return Outcome.done(env)
        if rec.state in ("expired", "deleted"):
            # Too late: the upload window closed, or the message was deleted.
            return Outcome.reject(env, rec.state, f"the attachment is {rec.state}")
        claimed = await self.attachments.claim(rec.id, self.lease_s)
        if claimed is None or claimed.claim is None:
            env.meta["attachmentState"] = "verifying"
            return Outcome.reject(env, "in_progress", "the upload is being checked")
        rec = claimed
        env.meta.update(claim=rec.claim, attachmentState="verifying")
        copy = ready_key(rec)
        if not await self.objects.copy(rec.object_key, copy):
            return await self.release(env, rec, "not_uploaded", "the file has not been uploaded")
        info = await self.objects.stat(copy)
        if info is None:
            return await self.release(env, rec, "not_uploaded", "the file has not been uploaded")
        if info.size > rec.size:
            return await self.refuse(env, rec, "too_large",
                                     f"uploaded {info.size} bytes, declared {rec.size}")
        if info.size != rec.size:
            return await self.refuse(env, rec, "size_mismatch",
                                     f"uploaded {info.size} bytes, declared {rec.size}")
        if info.content_type and info.content_type.split(";")[0].strip() != rec.content_type:
            return await self.refuse(env, rec, "type_mismatch",
                                     f"uploaded as {info.content_type}, declared {rec.content_type}")
        self._prepare(env, rec, members)
        return Outcome.ok(env)


class ScanAttachment(_Refusals):
    """Sniffs the real type from the first bytes of the checked copy; streams it through
    ClamAV when one is configured. A scanner that cannot run leaves the record pending."""

    name = "scan_attachment"

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore, hub: DeliveryHub,
                 scanner: VirusScanner | None) -> None:
        super().__init__(attachments, objects, hub)
        self.scanner = scanner

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        try:
            return await self._scan(batch)
        except Exception:
            await self.release_all(batch)
            raise

    async def _scan(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out: list[Outcome] = []
        for env in batch:
            if env.meta.get("resumed"):
                out.append(Outcome.ok(env))
                continue
            rec: AttachmentRecord = env.meta["record"]
            key = ready_key(rec)
            head = await self.objects.head(key, HEAD_BYTES)
            ok, found = matches(rec.content_type, head)
            if not ok:
                out.append(await self.refuse(
                    env, rec, "type_mismatch",
                    f"declared {rec.content_type}, the content is {found or 'unrecognised'}"))
                continue
            if self.scanner is not None:
                try:
                    signature = await self.scanner.scan(self.objects.chunks(key, SCAN_CHUNK_BYTES))
                except ScanLimitExceeded as exc:
                    out.append(await self.refuse(
                        env, rec, "too_large_to_scan",
                        f"the virus scanner refused a file this large ({exc})"))
                    continue
                except Exception as exc:
                    out.append(await self.release(env, rec, "scan_failed",
                                                  f"the virus scan could not run: {exc!r}"[:300]))
                    continue
                if signature is not None:
                    out.append(await self.refuse(env, rec, "infected",
                                                 f"malware found: {signature}"))
                    continue
            out.append(Outcome.ok(env))
        return out


class FinalizeAttachment(_Claims):
    """Marks the claimed attachment ready before its message is stored; a claim lost
    meanwhile (the record expired or was taken over) stops the item: no message. A batch
    that fails (the store unreachable) gives its claims back (``_Claims``)."""

    name = "finalize_attachment"

    def __init__(self, attachments: AttachmentStore, objects: ObjectStore) -> None:
        super().__init__(attachments)
        self.objects = objects

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        try:
            return await self._finalize(batch)
        except Exception:
            await self.release_all(batch)
            raise

    async def _finalize(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out: list[Outcome] = []
        for env in batch:
            if env.meta.get("resumed"):
                out.append(Outcome.ok(env))
                continue
            rec: AttachmentRecord = env.meta["record"]
            if not await self.attachments.finish(rec.id, env.meta["claim"], "ready"):
                now = (await self.attachments.get([rec.id])).get(rec.id)
                env.meta["attachmentState"] = now.state if now else "gone"
                out.append(Outcome.reject(env, "conflict",
                                          "the attachment changed state while it was checked"))
                continue
            await self.objects.delete(rec.object_key)  # only the checked copy is kept
            env.meta["attachmentState"] = "ready"
            out.append(Outcome.ok(env))
        return out


class LinkAttachment:
    """Records the stored chat message on the attachment (after ``persist_chat``)."""

    name = "link_attachment"

    def __init__(self, attachments: AttachmentStore) -> None:
        self.attachments = attachments

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        for env in batch:
            if env.meta.get("messageId"):
                await self.attachments.link(env.fields["attachmentId"], env.meta["messageId"])
        return [Outcome.ok(e) for e in batch]
