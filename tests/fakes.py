"""In-memory fakes of the ports (``stages.ports``), shared by the unit tests.

Each follows its port's stated guarantee closely enough for the stage under test (a
fake store numbers per chat and dedupes on (sender, client id); a fake hub records what
was published), and records what it was asked so tests can assert on it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from stages.notifications import (
    Attempt,
    ContactProgress,
    ContactStatus,
    Job,
    ResultCallback,
    RoundResult,
    SendResult,
    SendStatus,
    adopt_recorded,
)
from stages.notifications import Delivery as Send
from stages.ports import (
    AttachmentRecord,
    ChatDraft,
    Debit,
    Delivery,
    ObjectInfo,
    PointerMove,
    Receipt,
    Stored,
)


class FakeDirectory:
    def __init__(self, chats: dict[str, set[str]]) -> None:
        self.chats = chats
        self.calls: list[list[str]] = []

    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        self.calls.append(list(chat_ids))
        return {c: frozenset(self.chats[c]) for c in chat_ids if c in self.chats}


class FakeContacts:
    """``Contacts`` from a table of chats and their members; records every query (each
    call is what one indexed read would be)."""

    def __init__(self, chats: dict[str, set[str]]) -> None:
        self.chats = chats
        self.contact_calls: list[list[str]] = []
        self.share_calls: list[list[tuple[str, str]]] = []

    async def contacts(self, user_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        self.contact_calls.append(list(user_ids))
        out: dict[str, frozenset[str]] = {}
        for u in user_ids:
            peers = frozenset().union(*(m for m in self.chats.values() if u in m))
            if peers:
                out[u] = peers
        return out

    async def share_chat(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        self.share_calls.append(list(pairs))
        return {(a, b) for a, b in pairs
                if any(a in m and b in m for m in self.chats.values())}


class FakeMessages:
    """``MessageStore``: seq per chat, idempotent on (sender, client id)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], Stored] = {}
        self.seq: dict[str, int] = {}
        self.receipts: list[Receipt] = []

    async def persist(self, drafts: Sequence[ChatDraft]) -> list[Stored]:
        out = []
        for d in drafts:
            key = (d.sender_id, d.client_id)
            if key in self.by_key:
                old = self.by_key[key]
                out.append(Stored(old.message_id, old.chat_id, old.seq, old.created_at, True))
                continue
            self.seq[d.chat_id] = self.seq.get(d.chat_id, 0) + 1
            s = Stored(f"m-{d.client_id}", d.chat_id, self.seq[d.chat_id], "t", False, 7)
            self.by_key[key] = s
            out.append(s)
        return out

    async def messages_after(self, chat_id: str, after_seq: int, limit: int) -> list[Any]:
        return []

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
        self.receipts.extend(receipts)
        return []


class FakeOutbox:
    def __init__(self) -> None:
        self.done_ids: list[int] = []

    async def done(self, outbox_ids: Sequence[int]) -> None:
        self.done_ids.extend(outbox_ids)


class FakeHub:
    """``DeliveryHub``: records every delivery published."""

    def __init__(self) -> None:
        self.published: list[Delivery] = []

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        self.published.extend(deliveries)


class FakeBank:
    """``CreditBank`` answering from a script (or failing, as an unreachable bank)."""

    def __init__(self, answers: list[Debit] | None = None, fail: bool = False) -> None:
        self.answers = answers or []
        self.fail = fail
        self.calls: list[list[tuple[str, int]]] = []

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        self.calls.append(list(requests))
        if self.fail:
            raise ConnectionError("bank is gone")
        return self.answers


class FakeNotices:
    def __init__(self) -> None:
        self.sent: list[tuple[str | None, str, dict[str, Any]]] = []

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None:
        self.sent.append((connection, event, dict(data)))


class FakeDedup:
    """``DedupWindow`` with an unbounded memory."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def first_seen(self, keys: Sequence[str]) -> list[bool | None]:
        out: list[bool | None] = []
        for k in keys:
            out.append(k not in self.seen)
            self.seen.add(k)
        return out


class FakeOutages:
    """``Outages``: records every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, int]] = []

    def unavailable(self, dependency: str, stage: str, items: int) -> None:
        self.reports.append((dependency, stage, items))


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
    """``AttachmentStore`` in memory; while ``down`` is set, ``finish`` and ``release``
    raise as an unreachable database would."""

    def __init__(self, *records: AttachmentRecord) -> None:
        self.rows = {r.id: r for r in records}
        self.down = False

    def _reachable(self) -> None:
        if self.down:
            raise ConnectionError("the attachment store cannot be reached")

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
        self._reachable()
        rec = self.rows[attachment_id]
        if rec.state != "verifying" or rec.claim != claim:
            return False
        self.rows[attachment_id] = replace(rec, state="pending", claim=None)
        return True

    async def finish(self, attachment_id: str, claim: str, state: str,
                     reason: str | None = None) -> bool:
        self._reachable()
        rec = self.rows[attachment_id]
        if rec.state != "verifying" or rec.claim != claim:
            return False
        self.rows[attachment_id] = replace(rec, state=state, claim=None)
        return True

    async def link(self, attachment_id: str, message_id: str) -> None:
        rec = self.rows[attachment_id]
        if rec.message_id is None:
            self.rows[attachment_id] = replace(rec, message_id=message_id)


class EveryoneDirectory:
    """``Directory`` where every chat has alice and bob."""

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


class FakeNotificationStore:
    """``NotificationStore``: records what was accepted."""

    def __init__(self) -> None:
        self.accepted: list[Any] = []

    async def accept(self, drafts: Any, idempotency: Any = None) -> None:
        self.accepted.extend(drafts)


class FakeKick:
    def __init__(self) -> None:
        self.kicked: list[str] = []

    def kick(self, ids: Any) -> None:
        self.kicked.extend(ids)


class BrokenChannel:
    """An e-mail channel whose batch fails with ``error`` once it has reported its first
    ``reported`` deliveries delivered (``on_result``)."""

    kind = "email"

    def __init__(self, error: Exception, reported: int = 0) -> None:
        self.error = error
        self.reported = reported

    def available(self) -> bool:
        return True

    async def send(self, deliveries: Sequence[Send],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        for k in range(min(self.reported, len(deliveries))):
            assert on_result is not None
            await on_result(k, SendResult.ok("250"))
        raise self.error


class ScriptedChannel:
    """A channel whose answers per address are scripted (a list, consumed in order).

    Sends one delivery after another and reports each result (``on_result``) before the
    next, as a one-lane channel does; ``sent`` lists every delivery it attempted."""

    def __init__(self, kind: str, script: dict[object, list[SendResult]], up: bool = True) -> None:
        self.kind = kind
        self.script = script
        self.up = up
        self.sent: list[Send] = []
        self.batches = 0

    def available(self) -> bool:
        return self.up

    async def send(self, deliveries: Sequence[Send],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        self.batches += 1
        out: list[SendResult] = []
        for i, d in enumerate(deliveries):
            self.sent.append(d)
            result = self.script[d.address].pop(0) if self.script.get(d.address) else SendResult.ok("id")
            out.append(result)
            if on_result is not None:
                await on_result(i, result)
        return out


class FakeDispatchQueue:
    """``DispatchQueue`` in memory: notifications by id with their stored progress.

    ``record_delivered`` and ``finish_round`` follow the port: a contact recorded delivered
    stays delivered, a repeat changes nothing, an attempt is stored once. ``claim_*`` hand
    out every unfinished notification (leases are not modelled) as a fresh ``Job`` built
    from the stored state, as a dispatcher claiming after a crash would see it."""

    def __init__(self, jobs: Sequence[Job] = ()) -> None:
        self.jobs: dict[str, Job] = {}
        self.attempts: list[Attempt] = []
        self.recorded: list[Attempt] = []  # every record_delivered call, repeats included
        self.finished: dict[str, str] = {}  # id → final state
        self.fail_records = False  # record_delivered raises (the database is unreachable)
        for job in jobs:
            self.add(job)

    def add(self, job: Job) -> None:
        self.jobs[job.id] = Job(job.id, list(job.contacts), job.message, job.strategy,
                                job.subject_name, job.round, _copy(job.progress))

    def _stored(self, a: Attempt) -> bool:
        return a.status is SendStatus.DELIVERED and any(
            (b.notification_id, b.contact_index, b.attempt, b.status)
            == (a.notification_id, a.contact_index, a.attempt, a.status) for b in self.attempts)

    async def record_delivered(self, attempt: Attempt) -> None:
        self.recorded.append(attempt)
        if self.fail_records:
            raise ConnectionError("the database is unreachable")
        job = self.jobs[attempt.notification_id]
        prog = job.progress[attempt.contact_index]
        if prog.status is not ContactStatus.DELIVERED:
            job.progress[attempt.contact_index] = ContactProgress(ContactStatus.DELIVERED,
                                                                  attempt.attempt)
        if not self._stored(attempt):
            self.attempts.append(attempt)

    def unfinished(self) -> list[Job]:
        return [Job(j.id, list(j.contacts), j.message, j.strategy, j.subject_name, j.round,
                    _copy(j.progress)) for j in self.jobs.values() if j.id not in self.finished]

    async def claim_ids(self, ids: Sequence[str], lease_s: float) -> list[Job]:
        return [j for j in self.unfinished() if j.id in set(ids)]

    async def claim_urgent(self, limit: int, lease_s: float) -> list[Job]:
        return self.unfinished()[:limit]

    async def claim_queued(self, limit: int, lease_s: float) -> list[Job]:
        return self.unfinished()[:limit]

    async def finish_round(self, results: Sequence[RoundResult]) -> None:
        for r in results:
            stored = self.jobs[r.job.id]
            r = adopt_recorded(r, stored.progress)
            self.attempts.extend(a for a in r.attempts if not self._stored(a))
            self.jobs[r.job.id] = Job(r.job.id, list(r.job.contacts), r.job.message,
                                      r.job.strategy, r.job.subject_name, r.job.round,
                                      _copy(r.job.progress))
            if r.final is not None:
                self.finished[r.job.id] = r.final.value

    async def release(self, ids: Sequence[str]) -> None:
        return None

    async def purge_expired(self) -> int:
        return 0

    async def stats(self) -> dict[str, float]:
        return {"pending": float(len(self.jobs) - len(self.finished))}


def _copy(progress: Sequence[ContactProgress]) -> list[ContactProgress]:
    return [ContactProgress(p.status, p.attempts, p.last_error) for p in progress]
