"""In-memory fakes of the ports (``stages.ports``), shared by the unit tests.

Each follows its port's stated guarantee closely enough for the stage under test (a
fake store numbers per chat and dedupes on (sender, client id); a fake hub records what
was published), and records what it was asked so tests can assert on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stages.ports import ChatDraft, Debit, Delivery, Receipt, Stored


class FakeDirectory:
    def __init__(self, chats: dict[str, set[str]]) -> None:
        self.chats = chats
        self.calls: list[list[str]] = []

    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        self.calls.append(list(chat_ids))
        return {c: frozenset(self.chats[c]) for c in chat_ids if c in self.chats}


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

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> int:
        self.receipts.extend(receipts)
        return len(receipts)


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
