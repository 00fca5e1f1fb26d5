"""Chat stages with in-memory fakes for their ports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stages.chat import ApplyReceipts, DeliverChat, PersistChat, ValidateChat
from stages.model import Envelope, Verdict
from stages.ports import Receipt
from tests.fakes import FakeDirectory, FakeHub, FakeMessages, FakeOutbox


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
    store, outbox, hub = FakeMessages(), FakeOutbox(), FakeHub()
    first = [chat("a"), chat("b")]
    for e in first:
        e.meta["members"] = ["alice", "bob"]
    persisted = await PersistChat(store).process(first)
    assert [o.envelope.meta["seq"] for o in persisted] == [1, 2]
    await DeliverChat(hub, outbox).process([o.envelope for o in persisted])
    assert [d.frame["seq"] for d in hub.published] == [1, 2]
    assert hub.published[0].users == ["alice", "bob"]
    # The sender's connection is skipped by the gateway; the frame itself stays clean.
    assert hub.published[0].skip == "conn-1" and "_origin" not in hub.published[0].frame
    assert outbox.done_ids == [7]
    resent = (await PersistChat(store).process([chat("a")]))[0].envelope
    assert resent.meta["duplicate"] and resent.meta["seq"] == 1
    out = await DeliverChat(hub, outbox).process([resent])
    assert out[0].verdict is Verdict.CONTINUE and len(hub.published) == 2


async def test_receipts_are_validated_and_applied_in_one_call() -> None:
    store = FakeMessages()
    good = Envelope(type="receipt", id="", sender="bob",
                    fields={"messageIds": ["m1", "m2"], "status": "read"})
    bad_ids = Envelope(type="receipt", id="", sender="bob", fields={"messageIds": "m1"})
    bad_status = Envelope(type="receipt", id="", sender="bob",
                          fields={"messageIds": ["m1"], "status": "seen"})
    out = await ApplyReceipts(store).process([good, bad_ids, bad_status])
    assert [o.verdict for o in out] == [Verdict.DONE, Verdict.REJECT, Verdict.REJECT]
    assert store.receipts == [Receipt("bob", "m1", "read"), Receipt("bob", "m2", "read")]


async def test_receipts_move_pointers_and_the_other_members_hear_where_they_stand() -> None:
    from stages.ports import PointerMove

    class Moving(FakeMessages):
        async def apply_receipts(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
            await super().apply_receipts(receipts)
            return [PointerMove("c1", "bob", 3, 2)]

    store, hub = Moving(), FakeHub()
    env = Envelope(type="receipt", id="", sender="bob",
                   fields={"messageIds": ["m-1", "m-2"], "status": "read"})
    (out,) = await ApplyReceipts(store, hub, FakeDirectory({"c1": {"alice", "bob", "carol"}})
                                 ).process([env])
    assert out.verdict is Verdict.DONE and [r.message_id for r in store.receipts] == ["m-1", "m-2"]
    (sent,) = hub.published
    assert sent.users == ["alice", "carol"]  # not the reader
    assert sent.frame == {"type": "system", "event": "receipt", "data": {
        "chatId": "c1", "userId": "bob", "deliveredSeq": 3, "readSeq": 2}}
    # Nothing moved (a repeat): nobody is told anything.
    hub.published.clear()
    await ApplyReceipts(FakeMessages(), hub, FakeDirectory({})).process([env])
    assert hub.published == []


async def test_receipt_frames_within_the_window_are_coalesced_per_member() -> None:
    import asyncio

    from stages.ports import PointerMove

    moves = iter([[PointerMove("c1", "bob", 3, 0)], [PointerMove("c1", "bob", 5, 2)],
                  [PointerMove("c1", "carol", 4, 4)]])

    class Moving(FakeMessages):
        async def apply_receipts(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
            return next(moves)

    hub = FakeHub()
    stage = ApplyReceipts(Moving(), hub, FakeDirectory({"c1": {"alice", "bob", "carol"}}),
                          announce_s=0.05)
    env = Envelope(type="receipt", id="", sender="bob", fields={"messageIds": ["m-1"]})
    for _ in range(3):
        await stage.process([env])
    assert hub.published == []  # nothing before the window closes
    await asyncio.sleep(0.15)
    frames = {d.frame["data"]["userId"]: (d.users, d.frame["data"]) for d in hub.published}
    assert frames == {
        "bob": (["alice", "carol"],
                {"chatId": "c1", "userId": "bob", "deliveredSeq": 5, "readSeq": 2}),
        "carol": (["alice", "bob"],
                  {"chatId": "c1", "userId": "carol", "deliveredSeq": 4, "readSeq": 4}),
    }


async def test_local_delivery_leaves_the_senders_replica_to_itself() -> None:
    from stages.chat import DeliverLocal

    class Sockets:
        def __init__(self) -> None:
            self.got: list[Any] = []

        def deliver(self, deliveries: Sequence[Any]) -> None:
            self.got.extend(deliveries)

    store, outbox, hub, sockets = FakeMessages(), FakeOutbox(), FakeHub(), Sockets()
    env = chat("a")
    env.gateway, env.meta["members"] = "gw-1", ["alice", "bob"]
    (persisted,) = await PersistChat(store).process([env])
    await DeliverChat(hub, outbox, local=True).process([persisted.envelope])
    await DeliverLocal(sockets).process([persisted.envelope])
    (published,) = hub.published
    (local,) = sockets.got
    # The hub routes to every replica but gw-1; gw-1 writes the same frame itself.
    assert published.local == "gw-1" and published.frame == local.frame
    assert local.users == ["alice", "bob"] and local.skip == "conn-1"


async def test_a_hub_outage_leaves_delivery_to_the_outbox_without_failing_the_batch() -> None:
    from tests.fakes import FakeOutages

    class DeadHub:
        async def publish(self, deliveries: Sequence[Any]) -> None:
            raise ConnectionError("hub actor died")

    store, outbox, outages = FakeMessages(), FakeOutbox(), FakeOutages()
    env = chat("a")
    env.meta["members"] = ["alice", "bob"]
    (persisted,) = await PersistChat(store).process([env])
    (out,) = await DeliverChat(DeadHub(), outbox, outages=outages).process([persisted.envelope])
    # The batch goes on to its ack; the entry stays for the relay to deliver.
    assert out.verdict is Verdict.CONTINUE and outbox.done_ids == []
    assert outages.reports == [("hub", "deliver_chat", 1)]


async def test_detached_delivery_returns_before_the_hub_and_keeps_the_batches_order() -> None:
    import asyncio

    gate = asyncio.Event()

    class SlowHub(FakeHub):
        """Takes each call in order (as an actor does) but answers only when let."""

        async def publish(self, deliveries: Sequence[Any]) -> None:
            self.published.extend(deliveries)
            await gate.wait()

    store, outbox, hub = FakeMessages(), FakeOutbox(), SlowHub()
    stage = DeliverChat(hub, outbox, detached=True, max_detached=2)
    batches = []
    for name in ("a", "b", "c"):
        env = chat(name)
        env.meta["members"] = ["alice", "bob"]
        (persisted,) = await PersistChat(store).process([env])
        batches.append(persisted.envelope)
    # Two batches go on without waiting for the hub; the third is over the bound and
    # waits for its own delivery.
    for env in batches[:2]:
        (out,) = await asyncio.wait_for(stage.process([env]), 1)
        assert out.verdict is Verdict.CONTINUE
    third = asyncio.create_task(stage.process([batches[2]]))
    await asyncio.sleep(0.05)
    assert not third.done() and outbox.done_ids == []
    gate.set()
    await asyncio.wait_for(third, 1)
    await asyncio.sleep(0)
    assert [d.frame["seq"] for d in hub.published] == [1, 2, 3]
    assert sorted(outbox.done_ids) == sorted(e.meta["outboxId"] for e in batches)
