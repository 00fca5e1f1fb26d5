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

from stages.notifications import Delivery as Send
from stages.notifications import SendResult
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


class ScriptedChannel:
    """A channel whose answers per address are scripted (a list, consumed in order)."""

    def __init__(self, kind: str, script: dict[object, list[SendResult]], up: bool = True) -> None:
        self.kind = kind
        self.script = script
        self.up = up
        self.sent: list[Send] = []
        self.batches = 0

    def available(self) -> bool:
        return self.up

    async def send(self, deliveries: Sequence[Send]) -> list[SendResult]:
        self.batches += 1
        self.sent.extend(deliveries)
        return [self.script[d.address].pop(0) if self.script.get(d.address) else SendResult.ok("id")
                for d in deliveries]
