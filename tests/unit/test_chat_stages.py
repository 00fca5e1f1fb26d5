"""Chat stages with in-memory fakes for their ports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stages.chat import ApplyReceipts, DeliverChat, PersistChat, ValidateChat
from stages.model import Envelope, Verdict
from stages.ports import ChatDraft, Receipt, Stored


class FakeDirectory:
    def __init__(self, chats: dict[str, set[str]]) -> None:
        self.chats = chats
        self.calls: list[list[str]] = []

    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        self.calls.append(list(chat_ids))
        return {c: frozenset(self.chats[c]) for c in chat_ids if c in self.chats}


class FakeStore:
    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], Stored] = {}
        self.seq: dict[str, int] = {}
        self.done: list[int] = []
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

    async def outbox_done(self, ids: Sequence[int]) -> None:
        self.done.extend(ids)

    async def messages_after(self, chat_id: str, after_seq: int, limit: int) -> list[Any]:
        return []

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> int:
        self.receipts.extend(receipts)
        return len(receipts)


class FakeHub:
    def __init__(self) -> None:
        self.published: list[tuple[Sequence[str], dict[str, Any]]] = []

    async def publish(self, deliveries: Sequence[tuple[Sequence[str], dict[str, Any]]]) -> None:
        self.published.extend(deliveries)


def chat(i: str, chat_id: str = "c1", body: Any = "hi", sender: str = "alice") -> Envelope:
    return Envelope(type="chat", id=i, sender=sender, connection="conn-1",
                    fields={"chatId": chat_id, "body": body})


async def test_validation_checks_shape_membership_and_existence_in_one_lookup() -> None:
    d = FakeDirectory({"c1": {"alice", "bob"}, "c2": {"bob"}})
    out = await ValidateChat(d, max_body_chars=10).process([
        chat("1"), chat("2", body=""), chat("3", body=5), chat("4", body="x" * 11),
        chat("5", chat_id="c2"), chat("6", chat_id="nope"), chat("7", chat_id=None),
    ])
    assert [(o.verdict, o.code) for o in out] == [
        (Verdict.CONTINUE, None), (Verdict.REJECT, "invalid"), (Verdict.REJECT, "invalid"),
        (Verdict.REJECT, "invalid"), (Verdict.REJECT, "forbidden"), (Verdict.REJECT, "not_found"),
        (Verdict.REJECT, "invalid"),
    ]
    assert out[0].envelope.meta["members"] == ["alice", "bob"]
    assert d.calls == [["c1", "c2", "nope"]]


async def test_persist_then_deliver_skips_duplicates_and_clears_outbox() -> None:
    store, hub = FakeStore(), FakeHub()
    first = [chat("a"), chat("b")]
    for e in first:
        e.meta["members"] = ["alice", "bob"]
    persisted = await PersistChat(store).process(first)
    assert [o.envelope.meta["seq"] for o in persisted] == [1, 2]
    await DeliverChat(hub, store).process([o.envelope for o in persisted])
    assert [f["seq"] for _, f in hub.published] == [1, 2]
    assert hub.published[0][0] == ["alice", "bob"]
    assert hub.published[0][1]["_origin"] == "conn-1"
    assert store.done == [7]
    resent = (await PersistChat(store).process([chat("a")]))[0].envelope
    assert resent.meta["duplicate"] and resent.meta["seq"] == 1
    out = await DeliverChat(hub, store).process([resent])
    assert out[0].verdict is Verdict.DONE and len(hub.published) == 2


async def test_receipts_are_validated_and_applied_in_one_call() -> None:
    store = FakeStore()
    good = Envelope(type="receipt", id="", sender="bob",
                    fields={"messageIds": ["m1", "m2"], "status": "read"})
    bad_ids = Envelope(type="receipt", id="", sender="bob", fields={"messageIds": "m1"})
    bad_status = Envelope(type="receipt", id="", sender="bob",
                          fields={"messageIds": ["m1"], "status": "seen"})
    out = await ApplyReceipts(store).process([good, bad_ids, bad_status])
    assert [o.verdict for o in out] == [Verdict.DONE, Verdict.REJECT, Verdict.REJECT]
    assert store.receipts == [Receipt("bob", "m1", "read"), Receipt("bob", "m2", "read")]
