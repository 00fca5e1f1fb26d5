"""Phase-2 attachment stages with in-memory fakes for their ports."""

from __future__ import annotations

import asyncio
import uuid
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
from stages.ports import AttachmentRecord, ScanLimitExceeded
from tests.fakes import EveryoneDirectory, FakeAttachments, FakeHub, FakeObjects, FakeScanner

PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)


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
        self.verify = VerifyUpload(self.store, self.objects, self.hub, EveryoneDirectory())
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


async def test_a_claim_held_by_a_batch_that_failed_on_the_store_is_given_back_once_it_returns(
        ) -> None:
    """The store goes away between the check and ``finalize``: the batch fails, its claim
    cannot be released then, and is released in the background as soon as the store
    answers again (not only after the claim's lease), so the next event finishes it."""
    rec = record()
    p = Phase2(rec, FakeScanner())
    p.objects.data[rec.object_key] = (PNG, "image/png")
    env = event(rec)
    for stage in (p.verify, p.scan):
        (out,) = await stage.process([env])
        assert out.verdict is Verdict.CONTINUE
    p.store.down = True
    with pytest.raises(ConnectionError):
        await p.finalize.process([env])
    await asyncio.sleep(0.7)  # a retry or two while the store is still away
    assert p.store.rows[rec.id].state == "verifying"
    p.store.down = False
    for _ in range(60):
        if p.store.rows[rec.id].state == "pending":
            break
        await asyncio.sleep(0.1)
    assert p.store.rows[rec.id].state == "pending" and p.store.rows[rec.id].claim is None
    stage, out = await p.run(event(rec))  # the client's next /complete
    assert stage == "persist" and p.store.rows[rec.id].state == "ready"
