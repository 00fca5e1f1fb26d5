"""The chaos history checker (tests/chaos/history.py) on hand-made histories: a clean run
passes, and each rule catches the violation it is about."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tests.chaos.history import History, body_for, check, recovery_s

CHAT = "c1"


class Run:
    """A history written by hand: alice sends to a chat with bob and carol."""

    def __init__(self) -> None:
        ticks = itertools.count()
        self.h = History(clock=lambda: float(next(ticks)))
        self.h.members[CHAT] = {"alice", "bob", "carol"}
        self.stored: list[dict[str, Any]] = []
        self.h.stored[CHAT] = self.stored
        for user in ("alice", "bob", "carol"):
            self.connect(user)

    def connect(self, user: str) -> None:
        self.h.record(user, "in", {"type": "system", "event": "connected", "data": {"userId": user}})

    def send(self, cid: str, sender: str = "alice", chat: str = CHAT) -> None:
        self.h.record(sender, "out", {"type": "chat", "id": cid, "chatId": chat,
                                      "body": body_for(cid, "hi")})

    def ack(self, cid: str, mid: str, seq: int, status: str = "accepted",
            sender: str = "alice") -> None:
        self.h.record(sender, "in", {"type": "ack", "id": cid, "status": status,
                                     "messageId": mid, "chatId": CHAT, "seq": seq})

    def refuse(self, cid: str, sender: str = "alice") -> None:
        self.h.record(sender, "in", {"type": "ack", "id": cid, "status": "rejected",
                                     "error": {"code": "credits_exhausted", "retryAfter": 1}})

    def row(self, cid: str, mid: str, seq: int, sender: str = "alice") -> dict[str, Any]:
        return {"type": "message", "messageId": mid, "chatId": CHAT, "seq": seq,
                "senderId": sender, "kind": "text", "body": body_for(cid, "hi")}

    def store(self, cid: str, mid: str, seq: int, sender: str = "alice") -> None:
        self.stored.append(self.row(cid, mid, seq, sender))

    def deliver(self, user: str, cid: str, mid: str, seq: int, sender: str = "alice") -> None:
        self.h.record(user, "in", self.row(cid, mid, seq, sender))

    def sync(self, user: str, rows: list[dict[str, Any]]) -> None:
        self.h.record(user, "in", {"type": "sync", "id": "s", "chatId": CHAT,
                                   "messages": rows, "hasMore": False})

    def message(self, cid: str, mid: str, seq: int) -> None:
        """The whole happy path of one message: sent, acked, stored, delivered to both."""
        self.send(cid)
        self.ack(cid, mid, seq)
        self.store(cid, mid, seq)
        self.deliver("bob", cid, mid, seq)
        self.deliver("carol", cid, mid, seq)

    def announce(self, cid: str, aid: str, sender: str = "alice") -> None:
        """An ``attachment`` frame and its accepted ack."""
        self.h.record(sender, "out", {"type": "attachment", "id": cid, "chatId": CHAT,
                                      "fileName": "cat.png", "contentType": "image/png", "size": 9})
        self.h.record(sender, "in", {"type": "ack", "id": cid, "status": "accepted",
                                     "attachmentId": aid, "uploadUrl": "u", "uploadToken": "t"})

    def attachment_row(self, aid: str, mid: str, seq: int, sender: str = "alice") -> dict[str, Any]:
        return {"type": "message", "messageId": mid, "chatId": CHAT, "seq": seq,
                "senderId": sender, "kind": "attachment", "body": "cat.png",
                "attachment": {"attachmentId": aid, "fileName": "cat.png"}}

    def receipt_frame(self, viewer: str, who: str, delivered: int, read: int) -> None:
        self.h.record(viewer, "in", {"type": "system", "event": "receipt", "data": {
            "chatId": CHAT, "userId": who, "deliveredSeq": delivered, "readSeq": read}})


def violations(run: Run, rule: int) -> list[str]:
    return [x for x in check(run.h).violations if x.startswith(f"rule {rule}:")]


def test_a_clean_run_passes_with_its_figures() -> None:
    run = Run()
    for i in range(1, 4):
        run.message(f"a{i}", f"m{i}", i)
    run.send("a4")
    run.refuse("a4")
    run.receipt_frame("alice", "bob", 1, 0)
    run.receipt_frame("alice", "bob", 3, 2)
    run.h.pointers[(CHAT, "bob")] = (3, 2)
    verdict = check(run.h)
    assert verdict.violations == []
    assert verdict.row() == {"offered": 4, "accepted": 3, "delivered": 3, "lost": 0,
                             "duplicates": 0, "refused": 1, "unsettled": 0, "violations": 0}


def test_a_lost_ack_then_duplicate_on_resend_is_allowed() -> None:
    run = Run()
    run.send("a1")
    run.store("a1", "m1", 1)
    run.deliver("bob", "a1", "m1", 1)
    run.connect("alice")  # the ack was lost with the connection
    run.send("a1")
    run.ack("a1", "m1", 1, status="duplicate")
    run.connect("carol")
    run.sync("carol", [run.row("a1", "m1", 1)])  # carol catches up after her reconnect
    assert check(run.h).violations == []


def test_a_frame_given_up_without_any_answer_may_be_stored_and_counts_as_accepted() -> None:
    run = Run()
    run.send("a1")  # never answered: alice gave up
    run.store("a1", "m1", 1)
    run.deliver("bob", "a1", "m1", 1)
    run.deliver("carol", "a1", "m1", 1)
    verdict = check(run.h)
    assert verdict.violations == []
    assert (verdict.accepted, verdict.unsettled) == (1, 0)


def test_rule1_an_acked_message_missing_from_storage() -> None:
    run = Run()
    run.send("a1")
    run.ack("a1", "m1", 1)
    run.deliver("bob", "a1", "m1", 1)
    run.deliver("carol", "a1", "m1", 1)
    assert any("stored 0 times" in x for x in violations(run, 1))
    assert check(run.h).lost == 1


def test_rule1_one_client_id_stored_under_two_ids_is_an_undetectable_duplicate() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.store("a1", "m9", 2)  # the resend was stored again under a new id
    assert any("stored under 2 ids" in x for x in violations(run, 1))
    assert check(run.h).duplicates >= 1


def test_rule1_acks_of_one_client_id_naming_two_messages() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.send("a1")
    run.ack("a1", "m2", 2, status="duplicate")
    assert any("acked under two ids" in x for x in violations(run, 1))


def test_rule1_a_message_stored_with_another_seq_than_acked() -> None:
    run = Run()
    run.send("a1")
    run.ack("a1", "m1", 2)
    run.store("a1", "m1", 1)
    run.deliver("bob", "a1", "m1", 1)
    run.deliver("carol", "a1", "m1", 1)
    assert any("acked as seq 2" in x for x in violations(run, 1))


def test_rule2_an_acked_message_a_member_never_got() -> None:
    run = Run()
    run.send("a1")
    run.ack("a1", "m1", 1)
    run.store("a1", "m1", 1)
    run.deliver("bob", "a1", "m1", 1)
    assert violations(run, 2) == ["rule 2: acked message m1 (alice's a1) never reached ['carol']"]
    verdict = check(run.h)
    assert (verdict.lost, verdict.delivered) == (1, 0)


def test_rule3_a_hole_in_the_stored_seqs() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.message("a2", "m2", 3)
    assert any("stores seqs [1, 3]" in x for x in violations(run, 3))


def test_rule3_one_message_seen_with_two_seqs() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.deliver("bob", "a1", "m1", 2)  # a redelivery with another seq
    assert any("message m1 seen with seqs" in x for x in violations(run, 3))


def test_rule3_one_seq_given_to_two_messages() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.send("a2")
    run.ack("a2", "m2", 1)
    assert any("seq 1 of chat c1 seen as ['m1', 'm2']" in x for x in violations(run, 3))


def test_rule3_a_connection_skipping_a_seq_that_is_not_its_own() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.send("c2", sender="carol")
    run.ack("c2", "m2", 2, sender="carol")
    run.store("c2", "m2", 2, sender="carol")
    run.deliver("alice", "c2", "m2", 2, sender="carol")
    run.message("a3", "m3", 3)  # bob got 1 then 3: seq 2 (carol's) skipped on his socket
    run.sync("bob", [run.row("c2", "m2", 2, sender="carol")])
    # Bob skipped 2; Carol's socket skipped 2 too, but it is her own message.
    assert violations(run, 3) == [
        "rule 3: bob's connection 1 got seq 3 of chat c1 after 1, skipping [2]"]


def test_rule4_a_delivered_message_nobody_sent() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.store("zz", "m2", 2)
    run.deliver("bob", "zz", "m2", 2)
    assert any("was never sent" in x for x in violations(run, 4))


def test_rule4_a_message_whose_every_attempt_was_refused_is_delivered() -> None:
    run = Run()
    run.send("a1")
    run.refuse("a1")
    run.deliver("bob", "a1", "m1", 1)
    assert any("was refused" in x for x in violations(run, 4))


def test_rule4_a_delivery_under_another_id_than_acked() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.deliver("bob", "a1", "m7", 2)
    assert any("was acked as m1" in x for x in violations(run, 4))


def test_rule5_a_receipt_going_backwards_on_one_connection() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.message("a2", "m2", 2)
    run.receipt_frame("alice", "bob", 2, 1)
    run.receipt_frame("alice", "bob", 1, 1)
    assert any("back to (1, 1)" in x for x in violations(run, 5))


def test_rule5_final_pointers_below_announced_or_past_the_last_seq() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    run.receipt_frame("alice", "bob", 1, 1)
    run.h.pointers[(CHAT, "bob")] = (1, 0)
    run.h.pointers[(CHAT, "carol")] = (5, 0)
    found = violations(run, 5)
    assert any("below the announced (1, 1)" in x for x in found)
    assert any("pass its last seq 1" in x for x in found)


def attachments_run() -> Run:
    """Three attachments uploaded: at1 ready (stored as seq 1, delivered), at2 refused, at3
    still to settle."""
    run = Run()
    for i in (1, 2, 3):
        run.announce(f"x{i}", f"at{i}")
    run.h.uploaded.update({"at1", "at2", "at3"})
    run.h.attachments.update({"at1": "ready", "at2": "type_mismatch", "at3": "ready"})
    run.stored.append(run.attachment_row("at1", "m1", 1))
    run.stored.append(run.attachment_row("at3", "m2", 2))
    for user in ("bob", "carol"):
        run.h.record(user, "in", run.attachment_row("at1", "m1", 1))
        run.h.record(user, "in", run.attachment_row("at3", "m2", 2))
    return run


def test_rule6_settled_attachments_pass() -> None:
    assert check(attachments_run().h).violations == []


@pytest.mark.parametrize("state", ["verifying", "pending", None])
def test_rule6_an_uploaded_attachment_left_unsettled(state: str | None) -> None:
    run = attachments_run()
    run.stored.pop()  # at3's message was never stored: it did not become ready
    run.h.attachments.pop("at3")
    if state is not None:
        run.h.attachments["at3"] = state
    assert violations(run, 6) == [f"rule 6: attachment at3 ended {state!r}, neither ready nor "
                                  "refused with a code"]


def test_rule6_a_ready_attachment_stored_twice_missing_or_undelivered() -> None:
    run = attachments_run()
    run.stored.append(run.attachment_row("at1", "m3", 3))
    assert any("at1 is stored as 2 messages" in x for x in violations(run, 6))
    assert check(run.h).duplicates == 1
    run = attachments_run()
    run.stored.pop()
    assert any("at3 is ready but its message is not stored" in x for x in violations(run, 6))
    run = attachments_run()
    run.h.events = [e for e in run.h.events
                    if not (e.user == "carol" and e.frame.get("messageId") == "m2")]
    assert violations(run, 6) == ["rule 6: attachment at3's message never reached ['carol']"]
    assert check(run.h).lost == 1


def test_rule6_a_refused_attachment_in_the_chat() -> None:
    run = attachments_run()
    run.stored.append(run.attachment_row("at2", "m3", 3))
    assert any("at2 was refused (type_mismatch) but is in the chat" in x for x in violations(run, 6))


def test_rule4_an_attachment_message_never_acked_to_its_sender() -> None:
    run = attachments_run()
    run.stored.append(run.attachment_row("at9", "m3", 3))
    assert any("attachment at9" in x and "never acked" in x for x in violations(run, 4))


def test_rule6_a_refusal_frame_without_a_known_code() -> None:
    run = Run()
    run.h.record("alice", "in", {"type": "system", "event": "attachment_rejected",
                                 "data": {"attachmentId": "at1", "code": "nope"}})
    assert len(violations(run, 6)) == 1


def test_recovery_is_counted_from_the_fault_to_the_first_later_send_accepted() -> None:
    run = Run()
    run.message("a1", "m1", 1)
    fault_at = run.h.fault("test")  # the clock ticks once per recorded event
    run.send("a2")
    run.connect("alice")
    run.send("a2")
    run.ack("a2", "m2", 2)
    assert recovery_s(run.h, fault_at) == 4.0
