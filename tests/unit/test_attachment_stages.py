"""Phase-2 attachment stages with in-memory fakes for their ports."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from stages.attachments import (
    FinalizeAttachment,
    LinkAttachment,
    ScanAttachment,
    VerifyUpload,
    ready_key,
)
from stages.model import Envelope, Outcome, Verdict
from stages.ports import AttachmentRecord, ObjectInfo, ScanLimitExceeded
from tests.fakes import FakeHub

PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)


class FakeObjects:
    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, str | None]] = {}
        self.streamed: list[str] = []

    async def upload_url(self, key: str, content_type: str, size: int, expires_s: int) -> str:
        return f"http://store/{key}"

    async def download_url(self, key: str, expires_s: int, file_name: str | None = None) -> str:
        return f"http://store/{key}"

    async def stat(self, key: str) -> ObjectInfo | None:
        got = self.data.get(key)
        return ObjectInfo(len(got[0]), got[1]) if got else None

    async def head(self, key: str, n: int) -> bytes:
        return self.data[key][0][:n]

    async def chunks(self, key: str, chunk_size: int = 4) -> AsyncIterator[bytes]:
        self.streamed.append(key)
        body = self.data[key][0]
        for i in range(0, len(body), chunk_size):
            yield body[i:i + chunk_size]

    async def copy(self, src: str, dst: str) -> bool:
        if src not in self.data:
            return False
        self.data[dst] = self.data[src]
        return True

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)


class FakeAttachments:
    def __init__(self, *records: AttachmentRecord) -> None:
        self.rows = {r.id: r for r in records}

    async def create(self, records: Sequence[AttachmentRecord]) -> list[tuple[AttachmentRecord, bool]]:
        raise NotImplementedError

    async def get(self, ids: Sequence[str]) -> dict[str, AttachmentRecord]:
        return {i: self.rows[i] for i in ids if i in self.rows}

    async def claim(self, attachment_id: str, lease_s: float) -> AttachmentRecord | None:
        rec = self.rows.get(attachment_id)
        if rec is None or rec.state != "pending":
            return None
        rec = self.rows[attachment_id] = replace(rec, state="verifying", claim=uuid.uuid4().hex)
        return rec

    async def release(self, attachment_id: str, claim: str) -> bool:
        rec = self.rows[attachment_id]
        if rec.state != "verifying" or rec.claim != claim:
            return False
        self.rows[attachment_id] = replace(rec, state="pending", claim=None)
        return True

    async def finish(self, attachment_id: str, claim: str, state: str,
                     reason: str | None = None) -> bool:
        rec = self.rows[attachment_id]
        if rec.state != "verifying" or rec.claim != claim:
            return False
        self.rows[attachment_id] = replace(rec, state=state, claim=None)
        return True

    async def link(self, attachment_id: str, message_id: str) -> None:
        rec = self.rows[attachment_id]
        if rec.message_id is None:
            self.rows[attachment_id] = replace(rec, message_id=message_id)


class FakeDirectory:
    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        return {c: frozenset({"alice", "bob"}) for c in chat_ids}


class FakeScanner:
    def __init__(self, answer: str | Exception | None = None) -> None:
        self.answer = answer
        self.seen: list[bytes] = []

    async def scan(self, chunks: AsyncIterable[bytes]) -> str | None:
        self.seen.append(b"".join([c async for c in chunks]))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def record(ctype: str = "image/png", size: int = len(PNG), state: str = "pending"
           ) -> AttachmentRecord:
    aid = uuid.uuid4().hex
    return AttachmentRecord(id=aid, chat_id="c1", uploader="alice", client_id="a-1",
                            object_key=f"c1/{aid}/cat.png", file_name="cat.png",
                            content_type=ctype, size=size, state=state, upload_token="t",
                            expires_at="2030-01-01T00:00:00.000Z")


def event(rec: AttachmentRecord, sender: str = "alice") -> Envelope:
    return Envelope(type="attachment_uploaded", id=f"attachment:{rec.id}", sender=sender,
                    fields={"attachmentId": rec.id})


class Phase2:
    def __init__(self, rec: AttachmentRecord, scanner: FakeScanner | None = None) -> None:
        self.objects, self.store, self.hub = FakeObjects(), FakeAttachments(rec), FakeHub()
        self.verify = VerifyUpload(self.store, self.objects, self.hub, FakeDirectory())
        self.scan = ScanAttachment(self.store, self.objects, self.hub, scanner)
        self.finalize = FinalizeAttachment(self.store, self.objects)

    async def run(self, env: Envelope) -> tuple[str, Outcome]:
        for stage in (self.verify, self.scan, self.finalize):
            (out,) = await stage.process([env])
            if out.verdict is not Verdict.CONTINUE:
                return stage.name, out
        return "persist", out


async def test_the_checked_copy_is_what_is_kept_and_a_later_upload_is_never_used() -> None:
    rec = record()
    p = Phase2(rec, FakeScanner())
    p.objects.data[rec.object_key] = (PNG, "image/png")
    stage, out = await p.run(event(rec))
    assert stage == "persist" and out.envelope.meta["attachmentState"] == "ready"
    assert p.store.rows[rec.id].state == "ready"
    assert p.objects.data[ready_key(rec)] == (PNG, "image/png")
    assert rec.object_key not in p.objects.data  # the upload itself is gone
    assert p.objects.streamed == [ready_key(rec)]  # the scanner read the copy
    # Someone PUTs other bytes to the (still valid) upload URL and storage reports it.
    p.objects.data[rec.object_key] = (b"<html><script>alert(1)</script>", "text/html")
    (again,) = await p.verify.process([event(rec)])
    assert again.verdict is Verdict.CONTINUE and again.envelope.meta["resumed"]  # no message yet
    assert rec.object_key not in p.objects.data  # the new bytes are thrown away
    assert p.objects.data[ready_key(rec)] == (PNG, "image/png")
    await LinkAttachment(p.store).process([replace_meta(again.envelope, messageId="m1")])
    (done,) = await p.verify.process([event(rec)])
    assert done.verdict is Verdict.DONE and done.envelope.meta["messageId"] == "m1"


def replace_meta(env: Envelope, **meta: Any) -> Envelope:
    env.meta.update(meta)
    return env


async def test_a_claimed_record_is_not_processed_twice_and_not_uploaded_releases_it() -> None:
    rec = record()
    p = Phase2(rec)
    (out,) = await p.verify.process([event(rec)])
    assert (out.verdict, out.code) == (Verdict.REJECT, "not_uploaded")
    assert p.store.rows[rec.id].state == "pending"  # released: a later event may try again
    p.objects.data[rec.object_key] = (PNG, "image/png")
    first = event(rec)
    (claimed,) = await p.verify.process([first])
    assert claimed.verdict is Verdict.CONTINUE and p.store.rows[rec.id].state == "verifying"
    (second,) = await p.verify.process([event(rec)])
    assert (second.verdict, second.code) == (Verdict.REJECT, "in_progress")


async def test_refusals_delete_both_objects_and_tell_the_uploader() -> None:
    rec = record()
    p = Phase2(rec)
    p.objects.data[rec.object_key] = (b"MZ" + bytes(len(PNG) - 2), "image/png")
    stage, out = await p.run(event(rec))
    assert (stage, out.code) == ("scan_attachment", "type_mismatch")
    assert p.store.rows[rec.id].state == "rejected" and p.objects.data == {}
    (sent,) = p.hub.published
    to, frame = sent.users, sent.frame
    assert to == ["alice"] and frame["event"] == "attachment_rejected"
    assert frame["data"]["code"] == "type_mismatch" and "x-msdownload" in frame["data"]["reason"]


async def test_malware_too_large_to_scan_and_a_failing_scanner() -> None:
    for answer, code, state in [("Eicar-Signature", "infected", "rejected"),
                                (ScanLimitExceeded("INSTREAM size limit exceeded"),
                                 "too_large_to_scan", "rejected"),
                                (ConnectionRefusedError(111, "refused"), "scan_failed", "pending")]:
        rec = record()
        scanner = FakeScanner(answer)
        p = Phase2(rec, scanner)
        p.objects.data[rec.object_key] = (PNG, "image/png")
        stage, out = await p.run(event(rec))
        assert (stage, out.code) == ("scan_attachment", code), answer
        assert p.store.rows[rec.id].state == state
        assert scanner.seen == [PNG]
        assert bool(p.hub.published) is (state == "rejected")


async def test_a_type_with_a_signature_needs_it() -> None:
    rec = record(size=100)
    p = Phase2(rec)
    p.objects.data[rec.object_key] = (bytes(100), "image/png")
    stage, out = await p.run(event(rec))
    assert (stage, out.code) == ("scan_attachment", "type_mismatch")


async def test_finalize_posts_nothing_when_the_claim_was_lost() -> None:
    rec = record()
    p = Phase2(rec)
    p.objects.data[rec.object_key] = (PNG, "image/png")
    env = event(rec)
    (out,) = await p.verify.process([env])
    (out,) = await p.scan.process([out.envelope])
    # Meanwhile the record was expired (say, the check outlived its lease).
    p.store.rows[rec.id] = replace(p.store.rows[rec.id], state="expired", claim=None)
    (out,) = await p.finalize.process([out.envelope])
    assert (out.verdict, out.code) == (Verdict.REJECT, "conflict")
    assert out.envelope.meta["attachmentState"] == "expired"


async def test_expired_or_deleted_attachments_are_gone_and_strangers_find_nothing() -> None:
    for state in ("expired", "deleted"):
        rec = record(state=state)
        p = Phase2(rec)
        p.objects.data[rec.object_key] = (PNG, "image/png")
        (out,) = await p.verify.process([event(rec)])
        assert (out.verdict, out.code) == (Verdict.REJECT, state)
    rec = record()
    (out,) = await Phase2(rec).verify.process([event(rec, sender="mallory")])
    assert out.code == "not_found"


async def test_a_failing_object_store_gives_the_claim_back() -> None:
    rec = record()
    p = Phase2(rec)
    p.objects.data[rec.object_key] = (PNG, "image/png")

    async def broken(key: str, n: int) -> bytes:
        raise OSError("storage unreachable")

    (out,) = await p.verify.process([event(rec)])
    assert p.store.rows[rec.id].state == "verifying"
    p.objects.head = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="unreachable"):  # the batch fails (and is retried)...
        await p.scan.process([out.envelope])
    assert p.store.rows[rec.id].state == "pending"  # a retried event can claim it at once
